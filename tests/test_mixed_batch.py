"""Mixed-adapter batches (spec/methods.md METHOD-6..8): each example with its own adapter or none, as PEFT's
forward(adapter_names=...): rows equal the single-adapter forward, gradients reach each adapter from its own
rows only, bad calls are refused before any work, and a call without adapter_names is untouched."""
import numpy as np
import pytest

import minipeft as mp
from minipeft.adapters.inject import adapted_layers
from minipeft.errors import ConfigError
from tests.helpers import assert_close, max_rel_err, tiny_llama

IDS = np.random.default_rng(2).integers(0, 48, (5, 7))
NAMES = ["a", "__base__", "b", "c", "a"]


def three_adapters(model=None, perturb=True, copies=("a",)):
    """LoRA a (all linear), b (q/v, rsLoRA, dropout), c (k/o/down, rank 2); those in `copies` also train
    a copy of lm_head (modules_to_save)."""
    m = model or tiny_llama(seed=3)
    for name, kw in (("a", dict(rank=4, alpha=8, target_modules="all-linear")),
                     ("b", dict(rank=3, alpha=6, target_modules=("q_proj", "v_proj"), use_rslora=True, dropout=0.2)),
                     ("c", dict(rank=2, alpha=2, target_modules=("k_proj", "o_proj", "down_proj")))):
        m.apply_lora(**kw, modules_to_save=("lm_head",) if name in copies else (), name=name)
    if perturb:
        rng = np.random.default_rng(0)
        for n, p in m.net.named_parameters():
            if "lora_" in n or ".modules_to_save." in n:
                p.data = (p.data + rng.standard_normal(p.shape) * 0.2).astype(np.float32)
    return m


def alone(model, name, ids):
    """Logits of ids with adapter `name` active alone ("__base__": with adapters disabled)."""
    if name == "__base__":
        with model.disable_adapters():
            return model(ids).numpy()
    model.set_active_adapter(name)
    return model(ids).numpy()


@pytest.mark.spec("METHOD-6")
@pytest.mark.parametrize("names", [NAMES, ["c", "c", "b", "__base__", "a"], ["__base__"] * 5, ["b"] * 5])
def test_each_row_equals_its_adapter_alone(names):
    m = three_adapters()
    mixed = m(IDS, adapter_names=names).numpy()
    for b, n in enumerate(names):
        assert_close(mixed[b], alone(m, n, IDS)[b], rtol=1e-6, label=f"row {b} ({n})")


@pytest.mark.spec("METHOD-6")
def test_inactive_adapters_serve_and_generate_follows():
    m = three_adapters()
    m.set_active_adapter("c")  # a and b are inactive: a mixed batch uses them all the same, as PEFT
    got = m.generate(IDS[:, :4], max_new_tokens=5, adapter_names=NAMES)
    for b, n in enumerate(NAMES):
        if n == "__base__":
            with m.disable_adapters():
                want = m.generate(IDS[b:b + 1, :4], max_new_tokens=5)
        else:
            m.set_active_adapter(n)
            want = m.generate(IDS[b:b + 1, :4], max_new_tokens=5)
        assert np.array_equal(got[b], want[0]), (b, n)


@pytest.mark.spec("METHOD-6", "AG-22")
def test_gradients_reach_each_adapter_from_its_rows_only():
    m = three_adapters()
    m.net.requires_grad_(True)  # inactive adapters too: the mixed batch trains whichever adapter a row names
    G = np.random.default_rng(5).standard_normal((5, 7, 48)).astype(np.float32)
    (m(IDS, adapter_names=NAMES) * mp.Tensor(G)).sum().backward()
    mixed = {n: p.grad.copy() for n, p in m.net.named_parameters() if "lora_" in n and p.grad is not None}
    assert mixed and all(".adapters.a." in n or ".adapters.b." in n or ".adapters.c." in n for n in mixed)
    for name in ("a", "b", "c"):
        rows = [i for i, n in enumerate(NAMES) if n == name]
        ref = three_adapters()
        ref.set_active_adapter(name)
        ref.net.requires_grad_(True)
        (ref(IDS[rows]) * mp.Tensor(G[rows])).sum().backward()
        for n, p in ref.net.named_parameters():
            if "lora_" in n and f".adapters.{name}." in n:
                assert_close(mixed[n], p.grad, rtol=1e-4, label=n)


@pytest.mark.spec("METHOD-7")
def test_bad_calls_are_refused_before_any_work():
    m = three_adapters()
    m.apply_dora(rank=2, target_modules=("q_proj",), name="d")
    m.apply_prompt_tuning(num_virtual_tokens=2, name="p")
    cases = [(NAMES[:4], "4 names for a batch of 5"), (["a", "x", "b", "c", "a"], "no adapter named 'x'"),
             (["d"] * 5, "'d' is dora"), (["p"] * 5, "'p' is prompt_tuning")]
    for names, message in cases:
        with pytest.raises(ConfigError, match=message):
            m(IDS, adapter_names=names)
    m.net.train()
    with pytest.raises(ConfigError, match="for inference"):
        m(IDS, adapter_names=NAMES)
    m.net.eval()
    m.set_active_adapter("b")
    m.merge_adapter()
    with pytest.raises(ConfigError, match="unmerge_adapter"):
        m.generate(IDS, max_new_tokens=2, adapter_names=NAMES)
    m.unmerge_adapter()
    assert all(layer.groups is None for _, layer in adapted_layers(m.net))


@pytest.mark.spec("METHOD-8")
def test_without_adapter_names_nothing_changes():
    m = three_adapters()
    m.set_active_adapter(["a", "c"])
    before = m(IDS).numpy()
    m(IDS, adapter_names=NAMES)
    with pytest.raises(ConfigError):
        m(IDS, adapter_names=["zz"] * 5)
    assert all(layer.groups is None for _, layer in adapted_layers(m.net))
    assert np.array_equal(m(IDS).numpy(), before)


# ---- against PEFT -----------------------------------------------------------------------------------------
@pytest.mark.oracle
@pytest.mark.spec("METHOD-6")
def test_mixed_batch_equals_peft(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tests.helpers import TINY_LLAMA
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k != "model_type"})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(tmp_path / "base")
    # every adapter trains its own lm_head copy: PEFT's mixed batch raises KeyError for an adapter without one
    # at a modules_to_save module, where minipeft uses the original module (METHOD-6)
    ours = three_adapters(mp.load_model(str(tmp_path / "base")), copies=("a", "b", "c"))
    ours.save_adapters(str(tmp_path / "ad"))
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ad" / "a"), adapter_name="a")
    for n in ("b", "c"):
        pm.load_adapter(str(tmp_path / "ad" / n), adapter_name=n)
    pm.eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(IDS), adapter_names=NAMES).logits.numpy()
    err = max_rel_err(ours(IDS, adapter_names=NAMES), theirs)
    print(f"\n  mixed batch a/__base__/b/c/a minipeft vs PEFT: max rel err {err:.2e}")
    assert err < 1e-5
    with torch.no_grad():
        tokens = pm.generate(input_ids=torch.tensor(IDS[:, :4]), attention_mask=torch.ones(5, 4, dtype=torch.long),
                             max_new_tokens=6, do_sample=False, adapter_names=NAMES, pad_token_id=0).numpy()
    assert np.array_equal(ours.generate(IDS[:, :4], max_new_tokens=6, adapter_names=NAMES, eos_token_id=-1), tokens)
