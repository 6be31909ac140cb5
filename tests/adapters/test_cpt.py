"""spec/cpt.md (CPT-n) on the tiny random Llama built in process. Each claim is rebuilt independently in
NumPy: the forward against the base model on inputs_embeds [E[c] + D; E[ids]], the projection against its
formula row by row, the loss against a per-token loop over log-softmax with the weights counted out by hand."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft
from helpers import assert_close, tiny_llama
from minipeft import CPTConfig, TrainingConfig, TrainingHook
from minipeft.adapters.cpt import cpt_loss
from minipeft.cli import main
from minipeft.errors import CheckpointError, ConfigError
from minipeft.safetensors_io import read_safetensors, write_safetensors
from test_prompt_tuning import SETTINGS, base_on_embeds, ids_of, prompt_module, trainable_names

V, d = 48, 32
CTX = dict(cpt_token_ids=[5, 6, 7, 8, 9, 10, 11, 12], cpt_tokens_type_mask=[1, 2, 3, 4, 5, 6, 7, 8])


def types_st(T):
    """T token types >= 0 whose largest is a label type (a multiple of 4), as a context of examples has."""
    return st.lists(st.integers(0, 11), min_size=T, max_size=T).map(lambda k: k[:-1] + [4 * (max(k) // 4 + 1)])


def perturbed(model, seed=0, scale=0.3):
    D = prompt_module(model).delta_embedding.weight
    D.data = (np.random.default_rng(seed).standard_normal(D.shape) * scale).astype(np.float32)
    return D


@pytest.mark.spec("CPT-1", "CPT-6")
def test_prompt_is_the_context_embeddings_and_only_d_trains():
    m = tiny_llama().apply_cpt(**CTX)
    E = m.net.model.embed_tokens.weight.data
    enc = prompt_module(m)
    assert np.array_equal(enc.embedding.weight.data, E[CTX["cpt_token_ids"]])
    assert not np.any(enc.delta_embedding.weight.data)
    assert trainable_names(m) == ["prompt_encoder.default.delta_embedding.weight"]
    assert m.parameter_counts()[0] == 8 * d == m.peft_configs["default"].trainable_count({}, m.config)
    D = perturbed(m)
    cpt_loss(m(ids_of(2, 5)), ids_of(2, 5, seed=1), m.peft_configs["default"]).backward()
    g = D.grad
    assert np.abs(g[[0, 1, 2, 4, 5, 6]]).max(axis=1).min() > 0 and not np.any(g[[3, 7]])  # labels (4, 8) stay
    assert enc.embedding.weight.grad is None
    assert all(p.grad is None for n, p in m.net.named_parameters() if not n.startswith("prompt_encoder"))


@pytest.mark.spec("CPT-1", "CPT-2")
@SETTINGS
@given(T=st.integers(1, 6), B=st.integers(1, 3), n=st.integers(1, 6), seed=st.integers(0, 99), data=st.data())
def test_forward_is_base_on_context_plus_delta(T, B, n, seed, data):
    k = data.draw(types_st(T))
    c = data.draw(st.lists(st.integers(0, V - 1), min_size=T, max_size=T))
    m = tiny_llama().apply_cpt(cpt_token_ids=c, cpt_tokens_type_mask=k)
    D = perturbed(m, seed).data  # label rows too: they enter the forward with their values
    ids = ids_of(B, n, seed)
    E = m.net.model.embed_tokens.weight.data
    x = np.concatenate([np.broadcast_to(E[c] + D, (B, T, d)), E[ids]], axis=1)
    out = m(ids).data
    assert out.shape == (B, T + n, V)
    assert_close(out, base_on_embeds(x), rtol=1e-6, label="CPT logits")


def ball(k, d, eps_in, eps_fmt):
    """eps_t rebuilt from the spec (CPT-3)."""
    s = np.sqrt(d / 2048)
    return np.array([eps_fmt * s if t > 0 and t % 4 in (1, 3) else eps_in * s if t > 0 and t % 4 == 2 else 1e-10
                     for t in k])


@pytest.mark.spec("CPT-3")
@SETTINGS
@given(T=st.integers(1, 8), seed=st.integers(0, 99), scale=st.floats(1e-4, 1.0),
       eps_in=st.one_of(st.just(0.0), st.floats(1e-4, 0.5)), eps_fmt=st.one_of(st.just(0.0), st.floats(1e-4, 0.5)),
       data=st.data())
def test_projection_puts_every_row_in_its_ball(T, seed, scale, eps_in, eps_fmt, data):
    k = data.draw(types_st(T))
    m = tiny_llama().apply_cpt(cpt_token_ids=[1] * T, cpt_tokens_type_mask=k, opt_projection_epsilon=eps_in,
                               opt_projection_format_epsilon=eps_fmt)
    before = perturbed(m, seed, scale).data.astype(np.float64)
    before[0] = 0.0 if T > 1 else before[0]  # a zero row stays zero
    prompt_module(m).delta_embedding.weight.data = before.astype(np.float32)
    prompt_module(m).project()
    after = prompt_module(m).delta_embedding.weight.data.astype(np.float64)
    eps = ball(k, d, eps_in, eps_fmt)
    norm = np.linalg.norm(before, axis=1)
    assert np.all(np.linalg.norm(after, axis=1) <= eps * (1 + 1e-5) + 1e-12)
    inside = norm <= eps
    assert_close(after[inside], before[inside], rtol=1e-6, label="rows inside their ball")
    out = ~inside & (eps > 0)
    assert_close(after[out], before[out] * (eps[out] / norm[out])[:, None], rtol=1e-5, label="rows on the sphere")


class Norms(TrainingHook):
    key = "norms"

    def __init__(self, model):
        self.D, self.seen = prompt_module(model).delta_embedding.weight, []

    def after_step(self, step):  # runs after the adapter's own hook (hooks.py's order)
        self.seen.append(np.linalg.norm(self.D.data.astype(np.float64), axis=1))


@pytest.mark.spec("CPT-3", "CPT-6")
def test_model_train_keeps_every_row_in_its_ball_after_every_step():
    m = tiny_llama().apply_cpt(**CTX, opt_projection_epsilon=0.4, opt_projection_format_epsilon=0.2)
    rows = [{"input_ids": ids_of(1, 6, seed=s)[0].tolist()} for s in range(4)]
    h = Norms(m)
    hist = m.train(rows, TrainingConfig(learning_rate=0.05, batch_size=4, max_steps=4, schedule="constant",
                                        progress=False, hooks=[h]))
    eps = ball(CTX["cpt_tokens_type_mask"], d, 0.4, 0.2)
    assert len(h.seen) == 4 and all(np.all(n <= eps * (1 + 1e-5) + 1e-12) for n in h.seen)
    assert np.allclose(h.seen[-1][[0, 1, 2, 4, 5, 6]], eps[[0, 1, 2, 4, 5, 6]], rtol=1e-5)  # they reach the sphere
    assert np.all(h.seen[-1][[3, 7]] == 0) and hist["loss"][-1] < hist["loss"][0]
    perturbed(m)
    m.update_and_allocate(0)  # a loop of one's own projects the same way
    assert np.all(np.linalg.norm(prompt_module(m).delta_embedding.weight.data, axis=1) <= eps * (1 + 1e-5) + 1e-12)


def reference_loss(logits, y, c, k, f=1.0, decay=False, u=None):
    """CPT-4 and CPT-5 from the spec, one token at a time in float64."""
    z = np.asarray(logits, np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    B, n = y.shape
    u = np.full((B, n), 4) if u is None else u
    total, N = 0.0, 0
    for b in range(B):
        s = list(k) + [t + max(k) if t > 0 else t for t in u[b]]
        lab = list(c) + list(y[b])
        kinds = sorted({t for t in s[1:] if t > 0 and t % 4 == 0}, reverse=True)
        for i in range(len(s) - 1):
            t = s[i + 1]
            if t > 0 and t % 4 == 0 and lab[i + 1] != -100:
                w = f ** kinds.index(t) if decay else 1.0
                total -= w * logp[b, i, lab[i + 1]]
                N += 1
    return total / N


@pytest.mark.spec("CPT-4", "CPT-5")
@SETTINGS
@given(T=st.integers(1, 8), B=st.integers(1, 3), n=st.integers(2, 6), seed=st.integers(0, 99),
       f=st.floats(0.0, 1.0), decay=st.booleans(), given_types=st.booleans(), data=st.data())
def test_loss_is_the_weighted_mean_over_label_tokens(T, B, n, seed, f, decay, given_types, data):
    k = data.draw(types_st(T))
    c = data.draw(st.lists(st.integers(0, V - 1), min_size=T, max_size=T))
    m = tiny_llama().apply_cpt(cpt_token_ids=c, cpt_tokens_type_mask=k, opt_loss_decay_factor=f,
                               opt_weighted_loss_type="decay" if decay else "none")
    perturbed(m, seed)
    ids = ids_of(B, n, seed)
    y = np.where(np.random.default_rng(seed).random((B, n)) < 0.3, -100, ids)
    y[:, -1] = ids[:, -1]  # one target at least
    u = np.random.default_rng(seed + 1).choice([0, 1, 2, 3, 4, 8], (B, n)) if given_types else None
    if u is not None:
        u[:, -1] = 4
    logits = m(ids)
    want = reference_loss(logits.data, y, c, k, f, decay, u)
    assert abs(cpt_loss(logits, y, m.peft_configs["default"], u).item() - want) <= 1e-5 * max(1.0, abs(want))


@pytest.mark.spec("CPT-5")
def test_decay_weights_count_back_from_the_query():
    """Two context examples (labels at types 4 and 8) and the query (type 12): weights f^2, f, 1. With only
    the labels' logits different from zero the loss is an exact sum of known terms."""
    f = 0.5
    cfg = tiny_llama().apply_cpt(**CTX, opt_weighted_loss_type="decay", opt_loss_decay_factor=f).peft_configs["default"]
    y = np.array([[-100, 3]])  # the query: one label, at its position 1
    logits = np.zeros((1, 8 + 2, V), np.float32)
    for i, (pos, tok, lift) in enumerate([(2, 8, 1.0), (6, 12, 2.0), (8, 3, 3.0)]):  # position i predicts i + 1
        logits[0, pos, tok] = lift
    ce = [np.log(V - 1 + np.exp(a)) - a for a in (1.0, 2.0, 3.0)]
    loss = cpt_loss(minipeft.Tensor(logits), y, cfg).item()
    assert abs(loss - (f ** 2 * ce[0] + f * ce[1] + ce[2]) / 3) < 1e-6
    flat = cpt_loss(minipeft.Tensor(logits), y, CPTConfig(**CTX)).item()
    assert abs(flat - sum(ce) / 3) < 1e-6


@pytest.mark.spec("CPT-6")
def test_cli_trains_cpt(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"next {w} =", "completion": " " + w}) + "\n" for w in ["ab", "cd"]))
    base = ["train", "--model", minipeft.DEMO_MODEL, "--data", str(data), "--method", "cpt", "--max-steps", "2",
            "--lr", "0.05"]
    ctx = ["--set", "cpt_token_ids=[3, 4, 5, 6]", "--set", "cpt_tokens_type_mask=[1, 2, 3, 4]"]
    assert main(base + ctx + ["--output", str(tmp_path / "out")]) == 0
    m = minipeft.load_model(minipeft.DEMO_MODEL)
    m.load_adapters(str(tmp_path / "out"))
    D = prompt_module(m).delta_embedding.weight.data
    assert type(m.peft_configs["default"]) is CPTConfig and np.any(D[:3]) and not np.any(D[3])
    capsys.readouterr()
    assert main(base + ["--output", str(tmp_path / "bad")]) == 2  # PEFT's default types: no label type
    assert "cpt_tokens_type_mask's largest type is 1" in capsys.readouterr().err


@pytest.mark.spec("CPT-7")
def test_save_load_round_trip_and_peft_style_file(tmp_path):
    m = tiny_llama().apply_cpt(**CTX, opt_weighted_loss_type="decay", opt_loss_decay_factor=0.7)
    perturbed(m)
    ids = ids_of(2, 4)
    m.save_adapters(str(tmp_path / "a"))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "CPT" and cfg["cpt_tokens_type_mask"] == CTX["cpt_tokens_type_mask"]
    assert cfg["opt_weighted_loss_type"] == "decay" and cfg["num_virtual_tokens"] == 8 and cfg["token_dim"] == d
    t, _ = read_safetensors(str(tmp_path / "a" / "adapter_model.safetensors"))
    enc = prompt_module(m)
    assert sorted(t) == ["prompt_embeddings", "prompt_encoder.delta_embedding.weight",
                         "prompt_encoder.embedding.weight"]
    assert np.array_equal(t["prompt_embeddings"], enc.output().data)
    again = tiny_llama()
    again.load_adapters(str(tmp_path / "a"))
    assert np.array_equal(again(ids).data, m(ids).data)
    assert np.array_equal(prompt_module(again).delta_embedding.weight.data, enc.delta_embedding.weight.data)
    (tmp_path / "p").mkdir()  # PEFT's file: prompt_embeddings alone
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(cfg))
    write_safetensors(str(tmp_path / "p" / "adapter_model.safetensors"), {"prompt_embeddings": t["prompt_embeddings"]})
    peft_style = tiny_llama()
    peft_style.load_adapters(str(tmp_path / "p"))
    p = prompt_module(peft_style)
    assert np.array_equal(p.embedding.weight.data, t["prompt_embeddings"]) and not np.any(p.delta_embedding.weight.data)
    assert trainable_names(peft_style) == ["prompt_encoder.default.delta_embedding.weight"]
    assert_close(peft_style(ids), m(ids), rtol=1e-6, label="PEFT-style file")
    write_safetensors(str(tmp_path / "p" / "adapter_model.safetensors"),
                      {"prompt_embeddings": t["prompt_embeddings"][:5]})
    with pytest.raises(CheckpointError, match=r"prompt_embeddings has shape \(5, 32\)"):
        tiny_llama().load_adapters(str(tmp_path / "p"))


@pytest.mark.spec("CPT-8")
@pytest.mark.parametrize("kw, field", [
    (dict(cpt_token_ids=[]), "cpt_token_ids"), (dict(cpt_token_ids=[1, -2]), "cpt_token_ids"),
    (dict(cpt_token_ids=[1, 2.5]), "cpt_token_ids"), (dict(cpt_token_ids=[1, 2], cpt_mask=[1]), "cpt_mask"),
    (dict(cpt_token_ids=[1, 2], cpt_tokens_type_mask=[1, 2, 3]), "cpt_tokens_type_mask"),
    (dict(cpt_token_ids=[1, 2], cpt_tokens_type_mask=[1, -4]), "cpt_tokens_type_mask"),
    (dict(cpt_token_ids=[1, 2], num_virtual_tokens=3), "num_virtual_tokens"),
    (dict(opt_weighted_loss_type="exp"), "opt_weighted_loss_type"),
    (dict(opt_loss_decay_factor=-0.5), "opt_loss_decay_factor"),
    (dict(opt_projection_epsilon=float("nan")), "opt_projection_epsilon"),
    (dict(opt_projection_format_epsilon=-1), "opt_projection_format_epsilon")])
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        CPTConfig(**kw)


@pytest.mark.spec("CPT-8")
def test_errors_before_anything_changes():
    m = tiny_llama()
    with pytest.raises(ConfigError, match=r"cpt_token_ids.*\[0, 48\)"):
        m.apply_cpt(cpt_token_ids=[1, 48])
    assert not m.peft_configs and m.net.prompt_encoder is None
    assert CPTConfig(cpt_token_ids=[4, 5]).cpt_tokens_type_mask == [1, 1]  # PEFT's defaults
    m.apply_cpt(cpt_token_ids=[4, 5])  # PEFT's default types: the data's labels would carry no loss
    D = prompt_module(m).delta_embedding.weight.data.copy()
    with pytest.raises(ConfigError, match="largest type is 1.*type 5"):
        m.train([{"input_ids": [1, 2, 3]}], TrainingConfig(max_steps=1, progress=False))
    assert np.array_equal(prompt_module(m).delta_embedding.weight.data, D)
    with pytest.raises(ConfigError, match="no token carries a label"):
        cpt_loss(m(ids_of(1, 3)), ids_of(1, 3), m.peft_configs["default"])
