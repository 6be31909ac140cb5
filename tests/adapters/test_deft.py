"""spec/deft.md (DEFT-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy float64 from
the spec's formula W' = (I - P_proj) W0 + s Q_P R; and (oracle) against PEFT's DEFT on Llama and GPT-2's Conv1D."""
import json
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import max_rel_err
import minipeft as mp
from minipeft.adapters.deft import QR, DEFTConfig
from minipeft.autograd import Tensor
from minipeft.autograd.gradcheck import gradcheck
from minipeft.errors import ConfigError
from one_layer import check_refuses_a_4bit_base, train_next
from test_dora import SETTINGS, targets
from test_hira import randomize  # every leaf of every layer ~ N(0, scale²)
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import (base, check_peft_case, check_init_is_base_and_count, lib,  # noqa: F401
                              perturbed_peft_model, report_gradients_from_peft)


def projector_np(P, method):
    """DEFT-1 in float64: (Q_P, right), from numpy's QR (Householder) or relu."""
    if method == "qr":
        Q = np.linalg.qr(P)[0]
        return Q, Q
    return P, np.maximum(P, 0)


def adapted_np(d, W0, method):
    """DEFT-2: W' = (I - P_proj) W0 + s Q_P R, with the (m, m) projector built out (no r' factoring)."""
    P = np.asarray(d.deft_P.data, np.float64)
    Q, right = projector_np(P, method)
    W = (np.eye(P.shape[0]) - Q @ right.T) @ W0
    return W + d.s * Q @ np.asarray(d.deft_R.data, np.float64) if hasattr(d, "deft_R") else W


@pytest.mark.spec("DEFT-1", "DEFT-2", "DEFT-3", "DEFT-5")
@SETTINGS
@given(r=st.integers(1, 40), method=st.sampled_from(["relu", "qr"]), alpha=st.sampled_from([None, 0, 4, 16.5]),
       para=st.booleans(), tm=targets)
def test_forward_and_merge_are_the_residual_projection(r, method, alpha, para, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_deft(rank=r, decomposition_method=method, alpha=alpha, para=para, target_modules=tm)
    randomize(model)
    updates = {}
    for p, layer in layers(model, "default"):
        d, m = layer.adapters["default"], layer.base_layer.out_features
        assert d.deft_P.shape == (m, min(r, m)) and hasattr(d, "deft_R") != para  # r' = min(r, m)
        assert d.s == (alpha / min(r, m) if alpha else 1.0)
        W0 = W[p + ".weight"].astype(np.float64)
        updates[p + ".weight"] = adapted_np(d, W0, method) - W0
        assert np.allclose(d.delta_weight_of(layer.base_layer), updates[p + ".weight"], rtol=1e-4, atol=1e-5)
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("DEFT-1")
@SETTINGS
@given(m=st.integers(2, 12), r=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_qr_projector_is_orthogonal_and_relu_is_not(m, r, seed):
    r = min(r, m)
    rng = np.random.default_rng(seed)
    P = rng.standard_normal((m, r))
    Q = QR.apply(Tensor(P)).numpy()
    assert np.allclose(Q.T @ Q, np.eye(r), atol=1e-10)  # orthonormal columns spanning P's
    Pi = Q @ Q.T
    assert np.allclose(Pi @ Pi, Pi, atol=1e-10) and np.allclose(Pi @ P, P, atol=1e-10)  # the projector onto span(P)
    assert np.allclose(Q, np.linalg.qr(P)[0])  # LAPACK's signs
    relu = P @ np.maximum(P, 0).T
    if (P > 0).any() and (P < 0).any() and r < m:
        assert not np.allclose(relu, relu.T) or not np.allclose(relu @ relu, relu)


@pytest.mark.spec("DEFT-1")
@pytest.mark.parametrize("shape", [(6, 3), (5, 5), (9, 1)])
def test_qr_backward_is_the_finite_difference(shape):
    A = Tensor(np.random.default_rng(sum(shape)).standard_normal(shape), requires_grad=True)
    assert gradcheck(lambda a: QR.apply(a), [A])[0] < 1e-7


@pytest.mark.spec("DEFT-4")
def test_inits_draw_from_the_stated_distributions():
    model = make_model()
    base_logits = model(IDS).numpy()
    model.apply_deft(rank=8, alpha=16, target_modules=("q_proj", "up_proj"))
    assert max_rel_err(model(IDS), base_logits) < 1e-6  # R = M / s: dW = 0
    for _, layer in layers(model, "default"):
        d = layer.adapters["default"]
        P = np.asarray(d.deft_P.data, np.float64)
        assert 0.015 < P.std() < 0.025 and abs(P.mean()) < 0.01
        M = np.maximum(P, 0).T @ layer.base_layer.weight.data
        assert np.allclose(d.deft_R.data, M / d.s, rtol=1e-5, atol=1e-6)
    rnd = make_model()
    rnd.apply_deft(rank=8, init="random", init_scale=0.5, target_modules=("up_proj",))
    for _, layer in layers(rnd, "default"):
        R = np.asarray(layer.adapters["default"].deft_R.data)
        assert 0.008 < R.std() < 0.012
    assert max_rel_err(rnd(IDS), base_logits) > 1e-4
    para = make_model()
    para.apply_deft(rank=8, para=True, target_modules=("up_proj",))  # PaRa removes a subspace from step 0
    assert max_rel_err(para(IDS), base_logits) > 1e-5


@pytest.mark.spec("DEFT-6")
def test_count_is_capped_rank_times_m_plus_n():
    model = make_model()
    model.apply_deft(rank=20, target_modules=("q_proj", "v_proj"))  # q_proj 32 -> 32 (r' 20), v_proj 32 -> 16 (r' 16)
    assert model.parameter_counts()[0] == 2 * (20 * (32 + 32) + 16 * (16 + 32))
    para = make_model()
    para.apply_deft(rank=20, para=True, target_modules=("q_proj", "v_proj"))
    assert para.parameter_counts()[0] == 2 * (20 * 32 + 16 * 16)


@pytest.mark.spec("DEFT-6")
@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=0), "rank"), (dict(decomposition_method="svd"), "decomposition_method"),
    (dict(init_scale=-1.0, init="random"), "init_scale"), (dict(dropout=1.0), "dropout"), (dict(init="pissa"), "init"),
    (dict(bias="lora_only"), "bias"), (dict(alpha="8"), "alpha"), (dict(para=1), "para")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        DEFTConfig(**kwargs)


@pytest.mark.spec("DEFT-6")
def test_a_4bit_base_is_refused_naming_the_layer():
    check_refuses_a_4bit_base("deft")


@pytest.mark.spec("DEFT-7")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_model()
    model.apply_deft(rank=4, alpha=8, decomposition_method="qr", dropout=0.1, target_modules=("v_proj",))
    randomize(model)
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "DEFT" and (cfg["r"], cfg["alpha"], cfg["decomposition_method"]) == (4, 8, "qr")
    assert cfg["init_weights"] is True and cfg["deft_dropout"] == 0.1 and cfg["para"] is False
    assert cfg["init_scale"] == 1.0 and cfg["fan_in_fan_out"] is False
    from minipeft.safetensors_io import read_safetensors
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in keys.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.v_proj.{m}": s for i in (0, 1)
        for m, s in (("deft_P", (16, 4)), ("deft_R", (4, 32)))}
    assert DEFTConfig.from_peft(dict(cfg, init_weights=False)).init == "random"
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert np.array_equal(again(IDS).numpy(), model(IDS).numpy())


@pytest.mark.spec("DEFT-3", "DEFT-4")
def test_model_train_moves_every_leaf_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_deft(rank=8, alpha=16, decomposition_method="qr", target_modules=("q_proj", "v_proj"))
    before = {n: np.array(p.data) for n, p in model.net.named_trainable_parameters().items()}
    h = train_next(model)
    assert h["loss"][-1] < 0.8 * h["loss"][0]
    assert all(not np.array_equal(p.data, before[n]) for n, p in model.net.named_trainable_parameters().items())


@pytest.mark.spec("DEFT-1", "DEFT-5")
@pytest.mark.parametrize("other", ["array_api_strict", "cupy"])
def test_qr_trains_and_merges_on_the_guard_as_on_numpy(other):
    """The QR and its backward use standard array-API calls only (test_array_api_guard.py runs the default relu)."""
    from conftest import require_backend
    from minipeft import backend
    require_backend(other)
    rows = [{"input_ids": [3, 4, 5, 6, 7, 8, 9]}, {"input_ids": [10, 11, 12, 13, 14]}] * 2

    def run():
        model = mp.load_model(mp.DEMO_MODEL)
        model.apply_deft(decomposition_method="qr", alpha=16, dropout=0.1)
        h = model.train(rows, mp.TrainingConfig(learning_rate=1e-2, batch_size=2, max_steps=2, progress=False))
        model.merge_adapter()
        return h["loss"], backend.to_host(model(np.array([[3, 4, 5, 6]])).data)
    ref = run()
    try:
        backend.set_backend(other)
        got = run()
    finally:
        backend.set_backend("numpy")
    assert np.allclose(got[0], ref[0], rtol=1e-4) and np.allclose(got[1], ref[1], rtol=1e-4, atol=1e-4)
    if other == "array_api_strict":  # NumPy underneath: the same bits
        assert got[0] == ref[0] and np.array_equal(got[1], ref[1])


# ---- against PEFT (test_peft_oracle.py's tiny random Llama / GPT-2, every trainable tensor moved) ----------------
CASES = {"relu": ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
         "qr": ("llama", dict(r=6, alpha=12, decomposition_method="qr", bias="deft_only",
                              target_modules=["q_proj", "k_proj", "up_proj"])),
         "capped": ("llama", dict(r=40, alpha=8, init_weights=False, init_scale=3.0, target_modules=["k_proj"])),
         "para": ("llama", dict(r=3, para=True, decomposition_method="qr", target_modules=["o_proj", "gate_proj"])),
         "select": ("llama", dict(r=2, target_modules=["q_proj", "o_proj", "up_proj"], exclude_modules=["o_proj"],
                                  layers_to_transform=[1], layers_pattern="layers", deft_dropout=0.1)),
         "gpt2": ("gpt2", dict(r=4, alpha=4, target_modules=["c_attn", "c_fc"])),
         "gpt2_qr": ("gpt2", dict(r=2, decomposition_method="qr", target_modules=["c_proj"]))}


def ours(name):  # PEFT's base_model.model.<path>.<leaf>.default -> <path>.adapters.default.<leaf>;
    # a trained bias base_model.model.<path>.base_layer.bias -> <path>.base_layer.bias
    name = name.removeprefix("base_model.model.")
    return re.sub(r"^(.+)\.(deft_\w+)\.default", r"\1.adapters.default.\2", name)


@pytest.mark.oracle
@pytest.mark.spec("DEFT-1", "DEFT-2", "DEFT-3", "DEFT-5", "DEFT-6", "DEFT-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    check_peft_case(lib, base, CASES[case], "DeftConfig", DEFTConfig, tmp_path, f"DEFT {case}")


@pytest.mark.oracle
@pytest.mark.spec("DEFT-1", "DEFT-3")
@pytest.mark.parametrize("case", ["relu", "qr", "para", "gpt2_qr"])
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    pm = perturbed_peft_model(lib, base, CASES[case], "DeftConfig").eval()
    report_gradients_from_peft(lib, pm, base(CASES[case][0]), tmp_path, f"DEFT {case}", ours, 1e-4)


@pytest.mark.oracle
@pytest.mark.spec("DEFT-4", "DEFT-6")
@pytest.mark.parametrize("case", ["relu", "qr"])
def test_peft_default_init_is_the_base_and_counts_agree(lib, base, case):
    check_init_is_base_and_count(lib, base, CASES[case], "DeftConfig", DEFTConfig, f"DEFT {case}")
