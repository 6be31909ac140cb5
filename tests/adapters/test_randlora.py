"""spec/randlora.md (RANDLORA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy
float64 from the spec's formulas; and (oracle) against PEFT's RANDLORA on Llama (dense and sparse) and GPT-2."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import max_rel_err
from minipeft.adapters.randlora import RandLoRAConfig
from minipeft.errors import CheckpointError, ConfigError
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import V, base, check_both_ways_and_merged, hf_model, lib, perturbed_peft_model  # noqa: F401


def randomize(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, "default"):
        for _, p in layer.adapters["default"].named_parameters():
            p.data = (rng.standard_normal(p.shape) * 0.1).astype(np.float32)


def update_np(d):
    """RANDLORA-1/2 in float64."""
    A, B = (np.asarray(t.data, np.float64) for t in d.projections)
    lam, gam = (np.asarray(t.data, np.float64) for t in (d.randlora_lambda, d.randlora_gamma))
    r, nb = lam.shape
    mn, mx = min(d.n, d.m), max(d.n, d.m)
    S_f = (lam[:, :, None] * A[:, :, :mn] * gam[None]).reshape(r * nb, mn)
    B_f = B[:mx, :nb, :].reshape(mx, nb * r)
    return d.s * (B_f @ S_f if mn == d.n else S_f.T @ B_f.T)


@pytest.mark.spec("RANDLORA-1", "RANDLORA-2", "RANDLORA-3", "RANDLORA-5")
@SETTINGS
@given(r=st.integers(1, 9), sparse=st.booleans(), tm=targets)
def test_forward_and_merge_are_W0_plus_the_scaled_bases(r, sparse, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_randlora(rank=r, alpha=2 * r, sparse=sparse, target_modules=tm)
    randomize(model)
    updates = {p + ".weight": update_np(layer.adapters["default"]) for p, layer in layers(model, "default")}
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("RANDLORA-4")
@pytest.mark.parametrize("mode", ["dense", "sparse", "very_sparse"])
def test_init_is_the_base_and_the_bases_have_unit_std(mode):
    model = make_model()
    base = model(IDS).numpy()
    kw = {"sparse": dict(sparse=True), "very_sparse": dict(very_sparse=True)}.get(mode, {})
    model.apply_randlora(rank=4, target_modules=("q_proj", "down_proj"), **kw)
    assert max_rel_err(model(IDS), base) == 0  # lam = 0
    A, B = (np.asarray(t.data) for t in model.shared_tensors["default"].values())
    assert A.shape == (4, 1, 32) and B.shape == (64, 8, 4)  # min_dim 32, max_dim 64, ceil(32 / 4) bases
    for X in (A, B):
        assert abs(X.std(ddof=1) - 1) < 1e-5
        if mode != "dense":
            assert len(np.unique(np.round(X * X.std(ddof=1) / np.abs(X).max(), 6))) <= 3  # {-1, 0, 1} scaled
    d = model.net.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"]
    assert np.all(d.randlora_gamma.data == 1 / 32) and d.randlora_gamma.shape == (8, 32)


@pytest.mark.spec("RANDLORA-6")
def test_only_lambda_and_gamma_train_and_the_count():
    model = make_model()
    model.apply_randlora(rank=4, target_modules=("q_proj", "v_proj"))
    randomize(model)
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".randlora_lambda", ".randlora_gamma")) for n in trained)
    assert all(np.abs(p.grad).max() > 0 for p in trained.values())
    # q_proj 32 -> 32: nb 8, 8 (4 + 32); v_proj 32 -> 16: nb 4, 4 (4 + 16); two layers
    assert model.parameter_counts()[0] == 2 * (8 * 36 + 4 * 20)


@pytest.mark.spec("RANDLORA-6")
@pytest.mark.parametrize("kwargs, field", [(dict(rank=0), "rank"), (dict(dropout=1.0), "dropout"),
                                           (dict(projection_prng_key=-1), "projection_prng_key"),
                                           (dict(bias="lora_only"), "bias")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        RandLoRAConfig(**kwargs)


@pytest.mark.spec("RANDLORA-7")
def test_saved_keys_and_a_file_without_the_bases_is_refused(tmp_path):
    model = make_model()
    model.apply_randlora(rank=4, target_modules=("v_proj",))
    model.save_adapters(str(tmp_path / "a"))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "RANDLORA" and cfg["r"] == 4 and cfg["randlora_alpha"] == 640
    keys, _ = read_safetensors(str(tmp_path / "a" / "adapter_model.safetensors"))
    per_layer = {f"base_model.model.model.layers.{i}.self_attn.v_proj.{leaf}": s for i in (0, 1) for leaf, s in
                 (("randlora_lambda", (4, 4)), ("randlora_gamma", (4, 16)), ("randlora_A", (4, 1, 16)),
                  ("randlora_B", (32, 4, 4)))}
    assert {k: v.shape for k, v in keys.items()} == {**per_layer, "base_model.randlora_A": (4, 1, 16),
                                                      "base_model.randlora_B": (32, 4, 4)}
    lean = make_model()
    lean.apply_randlora(rank=4, target_modules=("v_proj",), save_projection=False)
    lean.save_adapters(str(tmp_path / "b"))
    lean_keys, _ = read_safetensors(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert sorted(lean_keys) == sorted(k for k in per_layer if k.endswith(("_lambda", "_gamma")))  # PEFT's layout too
    with pytest.raises(CheckpointError, match="save_projection"):
        make_model().load_adapters(str(tmp_path / "b"))


@pytest.mark.spec("RANDLORA-7", "IO-8")
def test_per_layer_copies_of_the_bases_that_differ_are_refused(tmp_path):
    from minipeft.safetensors_io import write_safetensors
    model = make_model()
    model.apply_randlora(rank=4, target_modules=("v_proj",))
    model.save_adapters(str(tmp_path))
    path = str(tmp_path / "adapter_model.safetensors")
    tensors, meta = read_safetensors(path)
    assert make_model().load_adapters(str(tmp_path)) is not None  # the saved copies agree: it loads
    key = "base_model.model.model.layers.1.self_attn.v_proj.randlora_B"
    tensors[key] = tensors[key] + np.float32(1e-3)
    write_safetensors(path, tensors, meta)
    fresh = make_model()
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match="copies of one shared tensor but differ"):
        fresh.load_adapters(str(tmp_path))
    after = snapshot(fresh)  # no adapter left behind, the base untouched
    assert not fresh.peft_configs and sorted(after) == sorted(before)
    assert all(np.array_equal(after[n], before[n]) for n in before)


# ---- against PEFT ---------------------------------------------------------------------------------------
CASES = {"llama": ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
         "llama_sparse": ("llama", dict(r=3, randlora_alpha=12, sparse=True, target_modules=["q_proj", "up_proj"])),
         "llama_very_sparse": ("llama", dict(r=5, very_sparse=True, target_modules=["k_proj", "o_proj"])),
         "gpt2": ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True))}


@pytest.mark.oracle
@pytest.mark.spec("RANDLORA-2", "RANDLORA-3", "RANDLORA-5", "RANDLORA-6", "RANDLORA-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_on_merge_and_count(lib, base, case, tmp_path):
    kind, kw = CASES[case]
    pm = perturbed_peft_model(lib, base, CASES[case], "RandLoraConfig").eval()  # every lambda, gamma moved
    count = pm.get_nb_trainable_parameters()[0]
    ids = np.random.default_rng(1).integers(0, V, (2, 7))
    model = check_both_ways_and_merged(lib, pm, base(kind), tmp_path, f"RandLoRA {case}", ids)
    again = __import__("minipeft").load_model(base(kind))
    again.load_adapters(str(tmp_path / "peft"))
    assert again.parameter_counts()[0] == count and model is not None
