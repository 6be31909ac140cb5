"""spec/alora.md (ALORA-n): activated LoRA on the tiny llama and the carried model, each claim rebuilt from the
spec's formula; and (oracle) PEFT 0.21.2's aLoRA both ways, on generate and on gradients."""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, max_rel_err, tiny_llama
from minipeft.adapters.alora import ALoRAConfig, ALoRALinear, invocation_offset, token_mask
from minipeft.adapters.inject import adapted_layers
from minipeft.adapters.lora import LoRAConfig
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError
from minipeft.nn.layers import Linear
from one_layer import check_train_moves_every_leaf
from test_peft_oracle import lib  # noqa: F401 (fixture)

IDS = np.array([[3, 9, 4, 5, 11, 12, 4, 5, 7], [3, 9, 10, 11, 12, 13, 14, 15, 16]])  # row 0 invokes [4, 5] twice
CALL = [4, 5]


def perturb(model, seed=0, std=0.3):
    rng = np.random.default_rng(seed)
    for _, p in model.net.named_parameters():
        if p.requires_grad:
            p.data = (p.data + rng.standard_normal(p.shape) * std).astype(np.float32)


def alora_model(seed=0, **kw):
    model = tiny_llama(seed)
    model.apply_alora(alora_invocation_tokens=CALL, target_modules="all-linear", **kw)
    perturb(model)
    return model


def brute_offset(ids, tokens):
    starts = [j for j in range(len(ids) - len(tokens) + 1) if list(ids[j:j + len(tokens)]) == list(tokens)]
    return len(ids) - starts[-1] if starts else None


@pytest.mark.spec("ALORA-1")
@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=0, max_size=14), st.lists(st.integers(0, 3), min_size=1, max_size=3))
def test_offset_is_the_last_occurrence(ids, tokens):
    assert invocation_offset(np.array(ids, dtype=np.int64), tokens) == brute_offset(ids, tokens)


@pytest.mark.spec("ALORA-2")
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.one_of(st.none(), st.integers(1, 12)), min_size=1, max_size=4), st.integers(1, 7),
       st.integers(0, 2**31 - 1))
def test_one_layer_adapts_the_last_offset_positions(offsets, T, seed):
    """h_bt = y_bt + m_bt s B A x_bt with m_bt = [t >= T - min(o_b, T)], on one Linear."""
    rng = np.random.default_rng(seed)
    base = Linear(6, 5)
    base.weight.data = rng.standard_normal((5, 6)).astype(np.float32)
    base.bias.data = rng.standard_normal(5).astype(np.float32)
    d = ALoRALinear(6, 5, 3, 0.5, 0.0, False, mp.backend.RNG(0))
    d.lora_A.weight.data = rng.standard_normal((3, 6)).astype(np.float32)
    d.lora_B.weight.data = rng.standard_normal((5, 3)).astype(np.float32)
    x = rng.standard_normal((len(offsets), T, 6)).astype(np.float32)
    d.offsets = offsets
    got = d.adapt(Tensor(x), base(Tensor(x)), base).numpy()
    W0, b, A, B = (np.asarray(t, np.float64) for t in (base.weight.data, base.bias.data, d.lora_A.weight.data,
                                                       d.lora_B.weight.data))
    want = x @ W0.T + b
    for r, o in enumerate(offsets):
        for t in range(T):
            if o is not None and t >= T - min(o, T):
                want[r, t] += 0.5 * x[r, t] @ A.T @ B.T
    assert_close(got, want, 1e-5)
    assert np.array_equal(token_mask(offsets, T)[:, -1] > 0, np.array([o is not None for o in offsets]))


@pytest.mark.spec("ALORA-2")
def test_tokens_before_the_invocation_get_the_base_model_s_logits():
    model = alora_model()
    base = tiny_llama(0)(IDS).numpy()
    out = model(IDS).numpy()
    j = 6  # the last occurrence of [4, 5] in row 0
    assert np.array_equal(out[0, :j], base[0, :j])  # exactly: those positions never see the adapter
    assert max_rel_err(out[0, j:], base[0, j:]) > 1e-3
    assert np.array_equal(out[1], base[1])  # no invocation: the base model throughout


@pytest.mark.spec("ALORA-2")
def test_generate_keeps_the_prompt_s_offsets_for_every_new_token():
    """With its KV cache each new token of an invoked row is adapted; the same tokens from a loop that reruns the
    whole sequence with the prompt's mask extended to the new tokens (ALORA-2's rule, no cache)."""
    model = alora_model()
    got = model.generate(IDS[:1], max_new_tokens=5)
    layers = [d for _, layer in adapted_layers(model.net) for d in vars(layer.adapters).values()
              if isinstance(d, ALoRALinear)]
    seq = IDS[:1]
    for _ in range(5):
        for d in layers:
            d.offsets = [seq.shape[1] - 6]  # the invocation at 6, however long the sequence is now
        nxt = int(np.argmax(model.net(mp.backend.asarray(seq)).numpy()[0, -1]))
        seq = np.concatenate([seq, [[nxt]]], axis=1)
    for d in layers:
        d.offsets = None
    assert np.array_equal(got, seq)
    assert np.array_equal(model.generate(IDS[1:], max_new_tokens=5), tiny_llama(0).generate(IDS[1:], max_new_tokens=5))


@pytest.mark.spec("ALORA-3")
def test_merge_and_conversion_are_refused(tmp_path):
    model = alora_model()
    with pytest.raises(ConfigError, match="ALoRA cannot be merged"):
        model.merge_adapter()
    with pytest.raises(ConfigError, match="ALoRA cannot be merged"):
        model.merge_and_unload()
    model = alora_model()
    assert model.parameter_counts()[0] == LoRAConfig(target_modules="all-linear").trainable_count(
        {p: (m.base_layer.in_features, m.base_layer.out_features) for p, m in adapted_layers(model.net)}, None)
    model.save_adapters(str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="not a mergeable method"):
        model.save_as_lora(str(tmp_path / "lora"), 2, show_progress=False)
    from minipeft.audit.convert import audit_convert
    with pytest.raises(ConfigError, match="not a mergeable method"):
        audit_convert(str(tmp_path / "a"), 2, str(tmp_path / "converted"), show_progress=False)
    assert not (tmp_path / "lora").exists() and not (tmp_path / "converted").exists()


@pytest.mark.spec("ALORA-4")
def test_saved_as_peft_s_lora_with_the_tokens(tmp_path):
    model = alora_model()
    model.save_adapters(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["alora_invocation_tokens"] == CALL
    again = tiny_llama(0)
    again.load_adapters(str(tmp_path))
    assert type(again.peft_configs["default"]) is ALoRAConfig
    assert again.peft_configs["default"].alora_invocation_tokens == tuple(CALL)
    assert np.array_equal(again(IDS).numpy(), model(IDS).numpy())
    saved["alora_invocation_tokens"] = None  # the same folder without the tokens is a plain LoRA
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    plain = tiny_llama(0)
    plain.load_adapters(str(tmp_path))
    assert type(plain.peft_configs["default"]) is LoRAConfig


@pytest.mark.spec("ALORA-5")
def test_mixed_batch_rows_use_their_own_adapter_s_offsets():
    model = alora_model()
    model.apply_adapter(ALoRAConfig(alora_invocation_tokens=[12], target_modules="all-linear"), name="late")
    model.apply_adapter(LoRAConfig(target_modules="all-linear"), name="plain")
    perturb(model, seed=3)
    ids = np.concatenate([IDS, IDS, IDS[:1]])
    names = ["default", "late", "plain", "__base__", "late"]
    got = model(ids, adapter_names=names).numpy()
    for b, n in enumerate(names):
        alone = tiny_llama(0) if n == "__base__" else model
        if n != "__base__":
            model.set_active_adapter(n)
        assert_close(got[b], alone(ids[b:b + 1]).numpy()[0], 1e-5, label=f"row {b} ({n})")


def test_bad_invocation_tokens_are_config_errors():
    for bad in (None, [], [1, -2], ["4"], [True], 7):
        with pytest.raises(ConfigError, match="alora_invocation_tokens"):
            ALoRAConfig(alora_invocation_tokens=bad)
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        ALoRAConfig(alora_invocation_tokens=[1], trainable_token_indices=[2])


def test_training_moves_every_leaf_on_the_carried_model():
    """The carried model's task: the invocation is "=" (token 30), so the completion is what the adapter learns."""
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_alora(alora_invocation_tokens=[30])
    check_train_moves_every_leaf(model, lr=3e-2)
    assert model.generate("next abc =", max_new_tokens=1) is not None


# ---- oracle: PEFT 0.21.2 ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(lib, tmp_path_factory):
    from helpers import TINY_LLAMA, hf_llama_folder
    config = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    return hf_llama_folder(str(tmp_path_factory.mktemp("llama")), **config)


def peft_alora(lib, folder, tokens=CALL, seed=0):
    torch, transformers, peft = lib
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear",
                                                 alora_invocation_tokens=list(tokens)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return pm.eval()


def peft_and_ours(lib, folder, tmp_path):
    """PEFT's perturbed aLoRA, and the minipeft model that loaded its saved folder."""
    pm = peft_alora(lib, folder)
    pm.save_pretrained(str(tmp_path))
    model = mp.load_model(folder)
    model.load_adapters(str(tmp_path))
    return pm, model


@pytest.mark.oracle
@pytest.mark.spec("ALORA-6", "ALORA-1", "ALORA-2", "ALORA-4")
def test_peft_both_ways(lib, folder, tmp_path):
    torch = lib[0]
    pm = peft_alora(lib, folder)
    with torch.no_grad():
        theirs = pm(torch.tensor(IDS)).logits.numpy()
    pm.save_pretrained(str(tmp_path / "peft"))
    model = mp.load_model(folder)
    model.load_adapters(str(tmp_path / "peft"))
    assert type(model.peft_configs["default"]) is ALoRAConfig
    err = max_rel_err(model(IDS), theirs)
    print(f"\n  aLoRA PEFT->minipeft: max rel err {err:.2e}")
    assert err < 1e-5
    perturb(model, seed=5, std=0.2)
    model.save_adapters(str(tmp_path / "ours"))
    back = lib[2].PeftModel.from_pretrained(lib[1].AutoModelForCausalLM.from_pretrained(
        folder, attn_implementation="eager"), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        err = max_rel_err(model(IDS), back(torch.tensor(IDS)).logits.numpy())
    print(f"  aLoRA minipeft->PEFT: max rel err {err:.2e}")
    assert err < 1e-5
    with pytest.raises(NotImplementedError):
        back.merge_and_unload()  # PEFT refuses the merge too (ALORA-3)


@pytest.mark.oracle
@pytest.mark.spec("ALORA-6", "ALORA-2")
def test_generate_equals_peft(lib, folder, tmp_path):
    torch = lib[0]
    pm, model = peft_and_ours(lib, folder, tmp_path)
    for row in IDS:
        with torch.no_grad():
            theirs = pm.generate(input_ids=torch.tensor(row[None]), max_new_tokens=6, do_sample=False,
                                 attention_mask=torch.ones((1, len(row)), dtype=torch.long)).numpy()
        assert np.array_equal(model.generate(row[None], max_new_tokens=6, eos_token_id=[]), theirs)


@pytest.mark.oracle
@pytest.mark.spec("ALORA-6", "ALORA-5")
def test_gradients_and_mixed_batch_equal_peft(lib, folder, tmp_path):
    torch = lib[0]
    from minipeft.autograd import functional as F
    pm, model = peft_and_ours(lib, folder, tmp_path)
    logits = pm(torch.tensor(IDS)).logits
    V = logits.shape[-1]
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.tensor(IDS[:, 1:]).reshape(-1)).backward()
    theirs = {n.removeprefix("base_model.model.").replace(".default.", "."): p.grad.numpy()
              for n, p in pm.named_parameters() if p.requires_grad}
    out = model(IDS)
    F.cross_entropy(out[:, :-1].reshape(-1, V), Tensor(IDS[:, 1:].reshape(-1))).backward()
    ours = {n.replace(".adapters.default.", "."): p.grad for n, p in model.net.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs)
    worst = max(max_rel_err(ours[n], theirs[n]) for n in ours)
    print(f"\n  aLoRA gradients ({len(ours)} tensors): max rel err {worst:.2e}")
    assert worst < 1e-4
    ids = np.concatenate([IDS, IDS])
    names = ["default", "__base__", "__base__", "default"]
    with torch.no_grad():
        want = pm(torch.tensor(ids), adapter_names=names).logits.numpy()
    err = max_rel_err(model(ids, adapter_names=names), want)
    print(f"  aLoRA mixed batch vs PEFT adapter_names: max rel err {err:.2e}")
    assert err < 1e-5
