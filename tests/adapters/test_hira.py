"""spec/hira.md (HIRA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy
float64 from the spec's formula dW = W0 ⊙ (B A); and (oracle) against PEFT's HIRA on Llama and GPT-2."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, max_rel_err
from minipeft.adapters.hira import HiRAConfig
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import V, base, check_both_ways_and_merged, lib, perturbed_peft_model  # noqa: F401 (fixtures)


def randomize(model, seed=1, scale=0.3):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, "default"):
        for _, p in layer.adapters["default"].named_parameters():
            p.data = (rng.standard_normal(p.shape) * scale).astype(np.float32)


def update_np(W0, d):
    A, B = (np.asarray(t.data, np.float64) for t in (d.hira_A, d.hira_B))
    return W0.astype(np.float64) * (B @ A)


@pytest.mark.spec("HIRA-1", "HIRA-2", "HIRA-4")
@SETTINGS
@given(r=st.integers(1, 8), tm=targets)
def test_forward_and_merge_are_W0_plus_W0_hadamard_B_A(r, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_hira(rank=r, target_modules=tm)
    randomize(model)
    updates = {p + ".weight": update_np(W[p + ".weight"], layer.adapters["default"])
               for p, layer in layers(model, "default")}
    check_forward_merge_unmerge(model, W, updates)
    check_unmerge_gives_W0_bit_for_bit(model, W)


def check_unmerge_gives_W0_bit_for_bit(model, W):
    """merge then unmerge puts back the kept W0 exactly (HIRA-4, and every method that keeps W0 at merge time)."""
    model.merge_adapter()
    model.unmerge_adapter()
    for path, layer in layers(model, "default"):
        assert np.array_equal(layer.base_layer.weight.data, W[path + ".weight"])


@pytest.mark.spec("HIRA-3")
def test_inits_draw_from_the_stated_distributions():
    model = make_model()
    base = model(IDS).numpy()
    model.apply_hira(rank=4, target_modules=("q_proj", "up_proj"))
    assert np.array_equal(model(IDS).numpy(), base)  # B = 0: exactly the base
    for path, layer in layers(model, "default"):
        d, n = layer.adapters["default"], layer.base_layer.in_features
        A = np.asarray(d.hira_A.data)
        assert np.all(d.hira_B.data == 0) and np.abs(A).max() <= 1 / np.sqrt(n) and np.abs(A).max() > 0.8 / np.sqrt(n)
    wide = make_model()
    wide.apply_hira(rank=16, init="gaussian", target_modules=("up_proj",))
    A = np.concatenate([np.asarray(m.adapters["default"].hira_A.data).ravel() for _, m in layers(wide, "default")])
    assert abs(A.std() - 1 / 16) < 0.1 / 16 and abs(A.mean()) < 0.01  # N(0, 1/r²) on 2 x 16 x 32 draws
    rnd = make_model()
    rnd.apply_hira(rank=8, init="random", target_modules=("up_proj",))
    B = np.concatenate([np.asarray(m.adapters["default"].hira_B.data).ravel() for _, m in layers(rnd, "default")])
    assert abs(B.std() - 1) < 0.1 and max_rel_err(rnd(IDS), base) > 1e-3


@pytest.mark.spec("HIRA-5")
def test_the_update_has_high_rank_where_lora_has_rank_r():
    rng = np.random.default_rng(0)
    W0 = rng.standard_normal((32, 32))
    B, A = rng.standard_normal((32, 2)), rng.standard_normal((2, 32))
    assert np.linalg.matrix_rank(B @ A) == 2 and np.linalg.matrix_rank(W0 * (B @ A)) == 32
    model = make_model()
    model.apply_hira(rank=2, target_modules=("q_proj",))
    randomize(model)
    for path, layer in layers(model, "default"):
        W = np.asarray(layer.base_layer.weight.data, np.float64)
        dW = update_np(W, layer.adapters["default"])
        assert np.linalg.matrix_rank(dW) == min(W.shape) > 2
        assert np.linalg.matrix_rank(dW) <= np.linalg.matrix_rank(W) * 2


@pytest.mark.spec("HIRA-6")
def test_only_A_and_B_train_and_the_count_is_r_in_plus_out():
    model = make_model()
    model.apply_hira(rank=4, target_modules=("q_proj", "v_proj"))
    randomize(model)
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".hira_A", ".hira_B")) for n in trained)
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in trained.values())
    # q_proj (32 -> 32), v_proj (32 -> 16) at r = 4, two layers
    assert model.parameter_counts()[0] == 2 * 4 * ((32 + 32) + (32 + 16))


@pytest.mark.spec("HIRA-6")
@pytest.mark.parametrize("kwargs, field", [(dict(rank=0), "rank"), (dict(dropout=1.0), "dropout"),
                                           (dict(init="pissa"), "init"), (dict(rank_pattern={"q": 2}), "rank_pattern")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        HiRAConfig(**kwargs)


@pytest.mark.spec("HIRA-6")
def test_a_4bit_base_is_refused():
    model = mp.load_model(mp.DEMO_MODEL, quantization=mp.QuantizationConfig(compute_dtype="float32"))
    with pytest.raises(ConfigError, match="float Linear"):
        model.apply_hira(rank=2)


@pytest.mark.spec("HIRA-7")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_model()
    model.apply_hira(rank=4, init="gaussian", dropout=0.1, target_modules=("q_proj",))
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "HIRA" and cfg["r"] == 4
    assert cfg["init_weights"] == "gaussian" and cfg["hira_dropout"] == 0.1
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in keys.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.hira_{m}": s for i in (0, 1)
        for m, s in (("A", (4, 32)), ("B", (32, 4)))}
    assert HiRAConfig.from_peft(dict(cfg, init_weights=True)).init == "default"
    assert HiRAConfig.from_peft(dict(cfg, init_weights=False)).init == "random"


# ---- against PEFT ---------------------------------------------------------------------------------------
CASES = {"llama": ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2})),
         "gpt2": ("gpt2", dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))}


@pytest.mark.oracle
@pytest.mark.spec("HIRA-2", "HIRA-4", "HIRA-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    kind, kw = CASES[case]
    pm = perturbed_peft_model(lib, base, CASES[case], "HiraConfig").eval()  # every hira_A, hira_B moved
    ids = np.random.default_rng(1).integers(0, V, (2, 7))
    warns = pytest.warns(UserWarning, match="rank_pattern") if "rank_pattern" in kw else None
    if "rank_pattern" in kw:  # HIRA-6: PEFT builds every layer at r, and minipeft reads the folder the same way
        assert pm.base_model.model.model.layers[0].mlp.down_proj.hira_A["default"].shape[0] == kw["r"]
    check_both_ways_and_merged(lib, pm, base(kind), tmp_path, f"HiRA {case}", ids, loading=warns)
