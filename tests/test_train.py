"""The training loop: AdamW, schedules, exact accumulation, resume, data handling, faults (spec/training.md)."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minipeft as mp
from minipeft.data import collate, prepare
from minipeft.nn.optim import AdamW, lr_at
from minipeft.train import TrainingConfig
from tests.helpers import assert_close, tiny_llama

QUIET = dict(progress=False)


def token_data(n, seed=0, lo=4, hi=12, vocab=48):
    r = np.random.default_rng(seed)
    return [{"input_ids": [int(t) for t in r.integers(0, vocab, r.integers(lo, hi))]} for _ in range(n)]


def lora_model(seed=0, **kw):
    m = tiny_llama(seed)
    m.apply_lora(mp.LoRAConfig(rank=4, alpha=8, target_modules="all-linear", **kw))
    return m


def trainable(m):
    return {n: p.numpy().copy() for n, p in m.net.named_parameters() if p.requires_grad}


@pytest.mark.spec("TRAIN-1")
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), wd=st.sampled_from([0.0, 0.1]), steps=st.integers(1, 4))
def test_adamw_follows_its_formula(seed, wd, steps):
    r = np.random.default_rng(seed)
    W = mp.Tensor(r.standard_normal((3, 4)), requires_grad=True)  # decayed (ndim 2)
    b = mp.Tensor(r.standard_normal(4), requires_grad=True)  # not decayed
    opt = AdamW({"W": W, "b": b}, lr=0.01, weight_decay=wd)
    ref = {"W": W.numpy().copy(), "b": b.numpy().copy()}
    m = {k: 0.0 for k in ref}
    v = {k: 0.0 for k in ref}
    for t in range(1, steps + 1):
        grads = {"W": r.standard_normal((3, 4)), "b": r.standard_normal(4)}
        W.grad, b.grad = grads["W"], grads["b"]
        opt.step()
        for k in ref:
            if k == "W":
                ref[k] = ref[k] * (1 - 0.01 * wd)
            m[k] = 0.9 * m[k] + 0.1 * grads[k]
            v[k] = 0.999 * v[k] + 0.001 * grads[k] ** 2
            ref[k] = ref[k] - 0.01 * (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.999 ** t)) + 1e-8)
    assert_close(W, ref["W"], rtol=1e-12, label="W")
    assert_close(b, ref["b"], rtol=1e-12, label="b")


@pytest.mark.oracle
@pytest.mark.spec("TRAIN-1")
def test_adamw_equals_torch():
    torch = pytest.importorskip("torch")
    r = np.random.default_rng(1)
    w0 = r.standard_normal((5, 3))
    W = mp.Tensor(w0.copy(), requires_grad=True)
    tw = torch.nn.Parameter(torch.tensor(w0.copy()))
    opt = AdamW({"W": W}, lr=0.003, weight_decay=0.05)
    topt = torch.optim.AdamW([tw], lr=0.003, weight_decay=0.05)
    for _ in range(5):
        g = r.standard_normal((5, 3))
        W.grad, tw.grad = g, torch.tensor(g)
        opt.step()
        topt.step()
    assert_close(W, tw.detach().numpy(), rtol=1e-12, label="AdamW vs torch")


@pytest.mark.spec("TRAIN-2")
@settings(max_examples=30, deadline=None)
@given(warmup=st.integers(0, 10), total=st.integers(11, 50), kind=st.sampled_from(["linear", "cosine", "constant"]))
def test_schedule_formula(warmup, total, kind):
    for s in range(total):
        got = lr_at(s, 1.0, warmup, total, kind)
        if s < warmup:
            want = s / warmup
        else:
            p = (s - warmup) / (total - warmup)
            want = {"linear": max(0.0, 1 - p), "cosine": max(0.0, 0.5 * (1 + math.cos(math.pi * p))),
                    "constant": 1.0}[kind]
        assert abs(got - want) < 1e-12


@pytest.mark.oracle
@pytest.mark.spec("TRAIN-2")
def test_schedule_equals_transformers():
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    for kind, make in (("linear", tf.get_linear_schedule_with_warmup), ("cosine", tf.get_cosine_schedule_with_warmup)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        sched = make(opt, 7, 40)
        for s in range(40):
            assert abs(opt.param_groups[0]["lr"] - lr_at(s, 0.5, 7, 40, kind)) < 1e-12
            opt.step()
            sched.step()


@pytest.mark.spec("TRAIN-3")
def test_accumulating_four_micro_batches_equals_one_batch_of_four():
    data = token_data(4, seed=3)  # different lengths: token weighting matters
    a, b = lora_model(), lora_model()
    base = dict(learning_rate=1e-2, epochs=1, shuffle=False, max_grad_norm=0.5, **QUIET)
    ha = a.train(data, TrainingConfig(batch_size=4, gradient_accumulation_steps=1, **base))
    hb = b.train(data, TrainingConfig(batch_size=1, gradient_accumulation_steps=4, **base))
    assert len(ha["loss"]) == len(hb["loss"]) == 1
    assert abs(ha["loss"][0] - hb["loss"][0]) < 1e-6
    assert abs(ha["grad_norm"][0] - hb["grad_norm"][0]) < 1e-5 * ha["grad_norm"][0]
    # Adam's first step is lr * g / (|g| + eps) elementwise, which turns float-summation noise in
    # near-zero gradient entries into O(lr * noise / eps) differences; a wrong token weighting
    # would instead flip signs (2 lr) and move the loss and grad norm checked above.
    pa, pb = trainable(a), trainable(b)
    for n in pa:
        assert_close(pb[n], pa[n], rtol=0.0, atol=1e-4 * 1e-2, label=n)


@pytest.mark.spec("BACKEND-7")
def test_train_gives_the_kept_heap_back_when_it_ends(monkeypatch):
    """The allocator tuning keeps freed buffers for the next step; once training ends they go back."""
    from minipeft import backend
    calls = []
    monkeypatch.setattr(backend, "release_host_memory", lambda: calls.append(1) or True)
    model = lora_model()
    model.train(token_data(4, seed=1), TrainingConfig(learning_rate=1e-3, batch_size=2, epochs=1, **QUIET))
    assert calls == [1]


@pytest.mark.spec("TRAIN-4")
def test_resume_continues_the_same_loss_curve_bit_for_bit(tmp_path):
    data = token_data(24, seed=5)
    cfg = dict(learning_rate=5e-3, batch_size=4, epochs=2, warmup_steps=2, **QUIET)
    full = lora_model(dropout=0.1).train(data, TrainingConfig(output_dir=str(tmp_path / "a"), save_steps=4, **cfg))
    assert (tmp_path / "a" / "checkpoint-4" / "adapter" / "adapter_model.safetensors").exists()
    resumed_model = lora_model(dropout=0.1)
    resumed = resumed_model.train(data, TrainingConfig(resume_from=str(tmp_path / "a" / "checkpoint-4"), **cfg))
    assert len(full["loss"]) == 12
    assert resumed["loss"] == full["loss"]  # every value, bit for bit
    state = json.loads((tmp_path / "a" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["step"] == 8


@pytest.mark.spec("TRAIN-5")
def test_prompt_tokens_and_pads_carry_no_loss():
    class CharTok:  # a stand-in tokenizer: one id per character, 1 = BOS
        def encode(self, text, add_special_tokens=True):
            return ([1] if add_special_tokens else []) + [3 + ord(c) % 40 for c in text]

    ex = prepare([{"prompt": "ab", "completion": "cde"}, "xy"], CharTok(), 2, 48, 64)
    (ids0, lab0), (ids1, lab1) = ex
    assert lab0 == [-100, -100, -100] + ids0[3:] and ids0[-1] == 2  # BOS + 2 prompt chars masked, EOS kept
    assert lab1 == ids1 and ids1[0] == 1 and ids1[-1] == 2
    ids, mask, labels = collate(ex, pad_id=0)
    assert ids.shape == (2, 7) and mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert labels[1, 4:].tolist() == [-100] * 3


@pytest.mark.spec("TRAIN-5")
def test_right_padding_leaves_real_positions_unchanged():
    m = tiny_llama(2)
    ids = np.array([[5, 6, 7, 8, 9, 10]])
    alone = m(ids[:, :4]).numpy()
    padded = m(ids, attention_mask=np.array([[1, 1, 1, 1, 0, 0]])).numpy()
    assert_close(padded[:, :4], alone, rtol=1e-6, label="padded vs alone")


@pytest.mark.spec("TRAIN-5")
def test_bad_data_is_refused_before_training(tmp_path):
    m = lora_model()
    cases = [([], "empty"), ([{"input_ids": list(range(65))}], "longer than the model's context"),
             ([{"input_ids": [1, 99]}], "token ids"), ([{"foo": 1}], "needs 'text'"), (["text"], "tokenizer"),
             (str(tmp_path / "none.jsonl"), "does not exist"), ("plain string", "list of strings")]
    for data, words in cases:
        with pytest.raises(mp.ConfigError, match=words):
            m.train(data, TrainingConfig(**QUIET))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\nnot json\n')
    with pytest.raises(mp.ConfigError, match="bad.jsonl:2"):
        m.train(str(bad), TrainingConfig(**QUIET))
    with pytest.raises(mp.ConfigError, match="batch_size"):
        TrainingConfig(batch_size=0)
    with pytest.raises(mp.ConfigError, match="no trainable parameters"):
        tiny_llama().train(token_data(2), TrainingConfig(**QUIET))


@pytest.mark.spec("TRAIN-5")
def test_truncation_with_max_length():
    m = lora_model()
    h = m.train([{"input_ids": list(range(40)) * 2}], TrainingConfig(max_length=16, **QUIET))
    assert len(h["loss"]) == 1 and math.isfinite(h["loss"][0])


@pytest.mark.spec("TRAIN-6")
def test_nan_loss_stops_training_naming_the_step(tmp_path):
    m = lora_model()
    layer = m.net.get_submodule("model.layers.0.self_attn.q_proj")
    before = layer.adapters["default"].lora_A.weight.numpy().copy()
    layer.base_layer.weight.data = layer.base_layer.weight.data * np.nan
    with pytest.raises(mp.TrainingError, match=r"step 1: the loss is nan.*Last good checkpoint: none"):
        m.train(token_data(4), TrainingConfig(**QUIET))
    assert np.array_equal(layer.adapters["default"].lora_A.weight.numpy(), before)  # no update applied


@pytest.mark.spec("TRAIN-7", "AG-21")
def test_gradient_checkpointing_gives_the_same_training():
    data = token_data(8, seed=9)
    cfg = dict(learning_rate=5e-3, batch_size=4, epochs=1, **QUIET)
    a = lora_model(dropout=0.2)
    b = lora_model(dropout=0.2)
    ha = a.train(data, TrainingConfig(**cfg))
    hb = b.train(data, TrainingConfig(gradient_checkpointing=True, **cfg))
    assert np.allclose(ha["loss"], hb["loss"], rtol=1e-6, atol=0)
    pa, pb = trainable(a), trainable(b)
    for n in pa:
        assert_close(pb[n], pa[n], rtol=1e-5, label=n)


def test_eval_loss_per_epoch_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    m = lora_model()
    h = m.train(token_data(8), TrainingConfig(epochs=2, batch_size=4, eval_data=token_data(3, seed=1),
                                              plot_path=str(tmp_path / "loss.png"), **QUIET))
    assert [s for s, _ in h["eval_loss"]] == [2, 4]
    assert (tmp_path / "loss.png").stat().st_size > 1000


@pytest.mark.spec("TRAIN-14")
def test_resume_with_a_different_rank_stops_before_any_step(tmp_path):
    data = token_data(8, seed=5)
    cfg = dict(learning_rate=5e-3, batch_size=4, epochs=1, **QUIET)
    lora_model().train(data, TrainingConfig(output_dir=str(tmp_path / "a"), save_steps=1, **cfg))
    m = tiny_llama(0)
    m.apply_lora(mp.LoRAConfig(rank=8, alpha=8, target_modules="all-linear"))
    before = trainable(m)
    with pytest.raises(mp.ConfigError, match=r"checkpoint-2.*'r'.* 4 in the checkpoint but 8 now"):
        m.train(data, TrainingConfig(resume_from=str(tmp_path / "a"), **cfg))
    assert all(np.array_equal(before[n], v) for n, v in trainable(m).items())  # no step was taken


@pytest.mark.spec("TRAIN-15")
def test_train_keywords_override_the_config_and_unknown_ones_are_errors():
    data = token_data(8, seed=5)
    hist = lora_model().train(data, TrainingConfig(batch_size=2, **QUIET), max_steps=3)
    assert len(hist["loss"]) == 3  # was 4: max_steps next to a config was dropped
    with pytest.raises(mp.ConfigError, match=r"no field 'max_step'; did you mean max_steps or "):
        lora_model().train(data, TrainingConfig(**QUIET), max_step=3)
    with pytest.raises(mp.ConfigError, match=r"no field 'lr'"):
        lora_model().train(data, lr=1e-3)
