"""spec/gralora.md (GRALORA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy
float64 from the spec's block formula dW_jc = sc B_j[c]^T A_c[:, j]^T (+ sc B_g A_g); and (oracle) against PEFT's
GRALORA on Llama and GPT-2's Conv1D."""
import json
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import max_rel_err
import minipeft as mp
from minipeft.adapters.gralora import GraLoRAConfig
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from one_layer import train_next
from test_dora import SETTINGS, targets
from test_hira import randomize  # every leaf of every layer ~ N(0, scale²)
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import (base, check_peft_case, check_init_is_base_and_count, lib,  # noqa: F401
                              perturbed_peft_model, report_gradients_from_peft)


def update_np(d):
    """GRALORA-1 in float64, block by block from the spec: dW_jc = sc B_j[c]^T A_c[:, j]^T, plus sc B_g A_g."""
    A, B = np.asarray(d.gralora_A.data, np.float64), np.asarray(d.gralora_B.data, np.float64)
    k, nk, r = A.shape
    mk, s = B.shape[2], r // k
    dW = np.zeros((k * mk, k * nk))
    for j in range(k):
        for c in range(k):
            dW[j * mk:(j + 1) * mk, c * nk:(c + 1) * nk] = B[j][c * s:(c + 1) * s].T @ A[c][:, j * s:(j + 1) * s].T
    if hasattr(d, "gralora_A_general"):
        dW += np.asarray(d.gralora_B_general.weight.data, np.float64) @ np.asarray(d.gralora_A_general.weight.data,
                                                                                  np.float64)
    return dW * d.sc


@pytest.mark.spec("GRALORA-1", "GRALORA-2", "GRALORA-3", "GRALORA-5")
@SETTINGS
@given(k=st.sampled_from([1, 2, 4]), s=st.integers(1, 3), h=st.integers(0, 3), alpha=st.floats(0.5, 64), tm=targets)
def test_forward_and_merge_are_W0_plus_the_block_update(k, s, h, alpha, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_gralora(rank=k * s, gralora_k=k, hybrid_r=h, alpha=alpha, target_modules=tm)
    randomize(model)
    updates = {}
    for p, layer in layers(model, "default"):
        d = layer.adapters["default"]
        assert d.sc == pytest.approx(alpha / (k * s + h))  # GRALORA-3
        updates[p + ".weight"] = update_np(d)
        assert np.allclose(d.delta_weight(), updates[p + ".weight"], rtol=1e-4, atol=1e-5)
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("GRALORA-1")
@SETTINGS
@given(k=st.sampled_from([1, 2, 4]), s=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_the_rank_reaches_k_r_and_k_1_is_lora(k, s, seed):
    s = min(s, 32 // (k * k))  # each block row / column (32 / k wide) must hold its k rank-s parts
    model = make_model()
    model.apply_gralora(rank=k * s, gralora_k=k, target_modules=("q_proj",))  # 32 x 32
    randomize(model, seed=seed)
    for _, layer in layers(model, "default"):
        d = layer.adapters["default"]
        dW = update_np(d)
        assert np.linalg.matrix_rank(dW) == k * k * s  # random blocks: each of the k^2 rank-s blocks adds s
        if k == 1:  # one block: LoRA with A = gralora_A[0]^T, B = gralora_B[0]^T
            A, B = (np.asarray(t.data[0], np.float64) for t in (d.gralora_A, d.gralora_B))
            assert np.allclose(dW, d.sc * B.T @ A.T)


@pytest.mark.spec("GRALORA-4")
def test_inits_draw_from_the_stated_distributions():
    model = make_model()
    base_logits = model(IDS).numpy()
    model.apply_gralora(rank=8, gralora_k=4, hybrid_r=4, target_modules=("q_proj", "up_proj"))
    assert np.array_equal(model(IDS).numpy(), base_logits)  # B = 0, B_g = 0: exactly the base
    for _, layer in layers(model, "default"):
        d, n = layer.adapters["default"], layer.base_layer.in_features
        A, Ag = np.asarray(d.gralora_A.data), np.asarray(d.gralora_A_general.weight.data)
        assert A.shape == (4, n // 4, 8) and np.all(d.gralora_B.data == 0) and np.all(d.gralora_B_general.weight.data == 0)
        assert 0.8 / np.sqrt(n / 4) < np.abs(A).max() <= 1 / np.sqrt(n / 4)
        assert 0.8 / np.sqrt(n) < np.abs(Ag).max() <= 1 / np.sqrt(n)
    rnd = make_model()
    rnd.apply_gralora(rank=16, gralora_k=2, hybrid_r=8, init="random", target_modules=("up_proj",))
    for _, layer in layers(rnd, "default"):
        d = layer.adapters["default"]
        B, Bg = np.abs(d.gralora_B.data).max(), np.abs(d.gralora_B_general.weight.data).max()
        assert 0.8 / np.sqrt(16) < B <= 1 / np.sqrt(16) and 0.8 / np.sqrt(8) < Bg <= 1 / np.sqrt(8)
    assert max_rel_err(rnd(IDS), base_logits) > 1e-3


@pytest.mark.spec("GRALORA-6")
def test_count_is_r_plus_hybrid_times_in_plus_out_whatever_k():
    for k in (1, 2, 4):
        model = make_model()
        model.apply_gralora(rank=8, gralora_k=k, hybrid_r=3, target_modules=("q_proj", "v_proj"))
        # q_proj (32 -> 32), v_proj (32 -> 16), two layers
        assert model.parameter_counts()[0] == 2 * (8 + 3) * ((32 + 32) + (32 + 16))


@pytest.mark.spec("GRALORA-6")
@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=0), "rank"), (dict(gralora_k=0), "gralora_k"), (dict(hybrid_r=-1), "hybrid_r"),
    (dict(rank=6, gralora_k=4), "rank"), (dict(dropout=1.0), "dropout"), (dict(init="pissa"), "init"),
    (dict(bias="lora_only"), "bias")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        GraLoRAConfig(**kwargs)


@pytest.mark.spec("GRALORA-6")
def test_k_not_dividing_a_width_names_the_layer():
    model = make_model()
    with pytest.raises(ConfigError, match=r"gralora_k \(for .*q_proj\).*in_features 32"):
        model.apply_gralora(rank=3, gralora_k=3, target_modules=("q_proj",))


@pytest.mark.spec("GRALORA-7")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_model()
    model.apply_gralora(rank=4, gralora_k=2, hybrid_r=2, dropout=0.1, target_modules=("v_proj",))
    randomize(model)
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "GRALORA" and (cfg["r"], cfg["hybrid_r"], cfg["gralora_k"], cfg["alpha"]) == (4, 2, 2, 64)
    assert cfg["init_weights"] is True and cfg["gralora_dropout"] == 0.1 and cfg["fan_in_fan_out"] is False
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in keys.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.v_proj.{m}": s for i in (0, 1)
        for m, s in (("gralora_A", (2, 16, 4)), ("gralora_B", (2, 4, 8)), ("gralora_A_general.weight", (2, 32)),
                     ("gralora_B_general.weight", (16, 2)))}
    assert GraLoRAConfig.from_peft(dict(cfg, init_weights=False)).init == "random"
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert np.array_equal(again(IDS).numpy(), model(IDS).numpy())


@pytest.mark.spec("GRALORA-2", "GRALORA-4")
def test_model_train_moves_every_leaf_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_gralora(rank=8, alpha=16, gralora_k=2, hybrid_r=2, target_modules=("q_proj", "v_proj"))
    before = {n: np.array(p.data) for n, p in model.net.named_trainable_parameters().items()}
    h = train_next(model)
    assert h["loss"][-1] < 0.8 * h["loss"][0]
    assert all(not np.array_equal(p.data, before[n]) for n, p in model.net.named_trainable_parameters().items())


# ---- against PEFT (test_peft_oracle.py's tiny random Llama / GPT-2, every trainable tensor moved) ----------------
CASES = {"plain": ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
         "hybrid": ("llama", dict(r=8, gralora_k=4, hybrid_r=2, alpha=8, bias="gralora_only",
                                  target_modules=["q_proj", "k_proj", "up_proj"])),
         "random": ("llama", dict(r=6, gralora_k=1, hybrid_r=3, init_weights=False, target_modules=["o_proj"])),
         "gpt2": ("gpt2", dict(r=4, gralora_k=2, hybrid_r=2, target_modules=["c_attn", "c_fc"]))}


def ours(name):  # PEFT's base_model.model.<path>.<leaf>.default[.weight] -> <path>.adapters.default.<leaf>[.weight];
    # a trained bias base_model.model.<path>.base_layer.bias -> <path>.base_layer.bias
    name = name.removeprefix("base_model.model.")
    return re.sub(r"^(.+)\.(gralora_\w+)\.default", r"\1.adapters.default.\2", name)


@pytest.mark.oracle
@pytest.mark.spec("GRALORA-1", "GRALORA-2", "GRALORA-3", "GRALORA-5", "GRALORA-6", "GRALORA-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    check_peft_case(lib, base, CASES[case], "GraloraConfig", GraLoRAConfig, tmp_path, f"GraLoRA {case}")


@pytest.mark.oracle
@pytest.mark.spec("GRALORA-2")
@pytest.mark.parametrize("case", ["hybrid", "gpt2"])
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    pm = perturbed_peft_model(lib, base, CASES[case], "GraloraConfig").eval()
    report_gradients_from_peft(lib, pm, base(CASES[case][0]), tmp_path, f"GraLoRA {case}", ours, 1e-4)


@pytest.mark.oracle
@pytest.mark.spec("GRALORA-4", "GRALORA-6")
@pytest.mark.parametrize("case", ["plain", "hybrid"])
def test_peft_default_init_is_the_base_and_counts_agree(lib, base, case):
    check_init_is_base_and_count(lib, base, CASES[case], "GraloraConfig", GraLoRAConfig, f"GraLoRA {case}")
