"""spec/osf.md (OSF-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy float64 from
W0's own SVD (sign-free: only products U_i s_i V_i^T and projectors U U^T are compared); and (oracle) against PEFT's
OSF on a random Llama, with PEFT's SVD signs as they come and as minipeft fixes them."""
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close, max_rel_err, peft_svd_signs_as_minipeft
import minipeft as mp
from minipeft.adapters.osf import OSFConfig, OSFLinear
from minipeft.autograd import Tensor
from minipeft.autograd import functional as F
from minipeft.errors import ConfigError
from one_layer import saved_and_reloaded, train_next
from test_dora import SETTINGS, targets
from test_hira import randomize  # every trained leaf of every layer ~ N(0, scale²)
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import (base, check_init_is_base_and_count, check_peft_case, hf_model, lib,  # noqa: F401
                              perturbed_peft_model, report_gradients_from_peft)


def rank_rule(value, k):
    """OSF-1's e for min(in, out) = k, as the spec states it."""
    e = k // 2 if value is None else int(k * value) if isinstance(value, float) and value <= 1 else int(value)
    return max(0, min(k, e))


def high_part(W0, e):
    """(U_hi (m, e), U_hi S_hi V_hi^T, V_hi (e, n)) of W0's float64 SVD."""
    U, S, Vh = np.linalg.svd(np.asarray(W0, np.float64), full_matrices=False)
    return U[:, :e], (U[:, :e] * S[:e]) @ Vh[:e], Vh[:e]


def low_np(d):
    p = d.osf_svd_params
    U, S, V = (np.asarray(t.data, np.float64) for t in (p.U_low, p.S_low, p.V_low))
    return (U * S) @ V


@pytest.mark.spec("OSF-1", "OSF-4")
@SETTINGS
@given(er=st.one_of(st.none(), st.integers(1, 40), st.floats(0.05, 1.0)), tm=targets,
       pattern=st.sampled_from([None, {"v_proj": 3}, {r"layers\.1\.": 0.5}]))
def test_the_split_follows_the_rank_rule_and_init_is_w0s_tail(er, tm, pattern):
    model = make_model()
    W = snapshot(model)
    model.apply_osf(effective_rank=er, rank_pattern=pattern, target_modules=tm)
    for p, layer in layers(model, "default"):
        d, (m, n) = layer.adapters["default"], W[p + ".weight"].shape
        value = next((v for k, v in (pattern or {}).items() if re.search(k, p)), er)
        e = rank_rule(value, min(m, n))
        assert d.osf_svd_params.U_low.shape == (m, min(m, n) - e) and d.osf_svd_params.V_low.shape == (min(m, n) - e, n)
        _, top, _ = high_part(W[p + ".weight"], e)
        assert np.allclose(top + low_np(d), W[p + ".weight"], atol=2e-5)  # W0 = U_hi S_hi V_hi^T + U0 S0 V0
    assert_close(model(IDS), make_model()(IDS), 1e-5, label="OSF at init vs base")


@pytest.mark.spec("OSF-2", "OSF-5")
@SETTINGS
@given(e=st.integers(1, 15), tm=targets)
def test_forward_and_merge_are_the_high_part_plus_the_trained_low_part(e, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_osf(effective_rank=e, target_modules=tm)
    randomize(model, scale=0.3)
    updates = {}
    for p, layer in layers(model, "default"):
        _, top, _ = high_part(W[p + ".weight"], e)
        updates[p + ".weight"] = top + low_np(layer.adapters["default"]) - W[p + ".weight"]  # W' = hi + U S V
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("OSF-3")
@pytest.mark.parametrize("target, e", [("q_proj", 5), ("v_proj", 3), ("down_proj", 10)])  # square, wide, tall
def test_gradients_of_u_and_v_are_orthogonal_to_the_high_subspace(target, e):
    model = make_model()
    W = snapshot(model)
    model.apply_osf(effective_rank=e, target_modules=(target,))
    randomize(model, scale=0.3)
    out = model(IDS)
    F.cross_entropy(out[:, :-1].reshape(-1, 64), Tensor(IDS[:, 1:].reshape(-1))).backward()
    for p, layer in layers(model, "default"):
        U_hi, _, V_hi = high_part(W[p + ".weight"], e)
        par = layer.adapters["default"].osf_svd_params
        gU, gV = np.asarray(par.U_low.grad, np.float64), np.asarray(par.V_low.grad, np.float64)
        assert np.abs(gU).max() > 1e-4 and np.abs(gV).max() > 1e-4 and np.abs(par.S_low.grad).max() > 1e-4
        assert np.abs(U_hi.T @ gU).max() < 1e-5 * np.abs(gU).max()  # dU in span(U_hi)^⊥
        assert np.abs(gV @ V_hi.T).max() < 1e-5 * np.abs(gV).max()  # dV in span(V_hi)^⊥


@pytest.mark.spec("OSF-3")
def test_an_sgd_step_keeps_u_low_and_v_low_orthogonal_to_the_high_subspace():
    model = make_model()
    W = snapshot(model)
    model.apply_osf(effective_rank=6, target_modules=("q_proj",))  # U_low = U0 ⊥ U_hi at init
    out = model(IDS)
    F.cross_entropy(out[:, :-1].reshape(-1, 64), Tensor(IDS[:, 1:].reshape(-1))).backward()
    for p, layer in layers(model, "default"):
        par = layer.adapters["default"].osf_svd_params
        U_hi, _, V_hi = high_part(W[p + ".weight"], 6)
        U = np.asarray(par.U_low.data, np.float64) - 0.5 * par.U_low.grad
        V = np.asarray(par.V_low.data, np.float64) - 0.5 * par.V_low.grad
        assert np.abs(U_hi.T @ U).max() < 1e-5 and np.abs(V @ V_hi.T).max() < 1e-5


@pytest.mark.spec("OSF-4")
def test_random_init_draws_standard_normals():
    model = make_model()
    base_logits = model(IDS).numpy()
    model.apply_osf(effective_rank=4, init="random", target_modules=("up_proj", "o_proj"))
    leaves = np.concatenate([np.ravel(p.data) for _, layer in layers(model, "default")
                             for _, p in layer.adapters["default"].named_parameters()])
    assert abs(leaves.mean()) < 0.05 and abs(leaves.std() - 1) < 0.05
    assert max_rel_err(model(IDS), base_logits) > 1e-3


@pytest.mark.spec("OSF-6")
def test_count_is_k_minus_e_times_in_plus_out_plus_one():
    model = make_model()
    model.apply_osf(effective_rank=0.25, rank_pattern={"down_proj": 3}, target_modules=("q_proj", "v_proj", "down_proj"))
    # q_proj 32 -> 32 (e = 8), v_proj 32 -> 16 (e = 4), down_proj 64 -> 32 (e = 3), two layers
    want = 2 * ((32 - 8) * 65 + (16 - 4) * 49 + (32 - 3) * 97)
    layers_ = {p: (m.base_layer.in_features, m.base_layer.out_features) for p, m in layers(model, "default")}
    assert model.parameter_counts()[0] == want == model.peft_configs["default"].trainable_count(layers_, model.config)


@pytest.mark.spec("OSF-6")
@pytest.mark.parametrize("kwargs, field", [
    (dict(effective_rank=0), "effective_rank"), (dict(effective_rank=-2), "effective_rank"),
    (dict(effective_rank=True), "effective_rank"), (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    (dict(rank_pattern={"(": 2}), "rank_pattern"), (dict(init="pissa"), "init"),
    (dict(layers_to_transform=[0]), "layers_to_transform")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        OSFConfig(**kwargs)


@pytest.mark.spec("OSF-1", "OSF-6")
def test_a_rank_that_freezes_nothing_names_the_layer_and_conv1d_is_refused():
    model = make_model()
    with pytest.raises(ConfigError, match=r"effective_rank \(for model\.layers\.0\.self_attn\.v_proj\).*= 16"):
        model.apply_osf(effective_rank=0.05, target_modules=("v_proj",))  # int(16 * 0.05) = 0
    from minipeft.nn.layers import Conv1D
    with pytest.raises(ConfigError, match=r"c_attn.*torch.nn.Linear only"):
        OSFLinear.create(Conv1D(8, 24), OSFConfig(), "h.0.attn.c_attn", None)


@pytest.mark.spec("OSF-7")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_model()
    model.apply_osf(effective_rank=0.5, rank_pattern={"layers\\.1": 4}, target_modules=("v_proj",))
    randomize(model)
    cfg, keys = saved_and_reloaded(model, tmp_path, make_model, IDS)
    assert cfg["peft_type"] == "OSF" and cfg["effective_rank"] == 0.5 and cfg["rank_pattern"] == {"layers\\.1": 4}
    assert cfg["init_weights"] is True and cfg["target_modules"] == ["v_proj"] and "layers_to_transform" not in cfg
    assert keys == {f"base_model.model.model.layers.{i}.self_attn.v_proj.osf_svd_params.{leaf}": s
                    for i, k in ((0, 8), (1, 12)) for leaf, s in (("U_low", (16, k)), ("S_low", (k,)), ("V_low", (k, 32)))}
    assert OSFConfig.from_peft(dict(cfg, init_weights=False)).init == "random"


@pytest.mark.spec("OSF-2", "OSF-3")
def test_model_train_moves_every_leaf_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_osf(target_modules=("q_proj", "v_proj"))
    before = {n: np.array(p.data) for n, p in model.net.named_trainable_parameters().items()}
    h = train_next(model, lr=3e-2)  # U_low, V_low hold unit columns: lr 1e-2 moves the loss too slowly for the test
    assert h["loss"][-1] < 0.8 * h["loss"][0]
    assert all(not np.array_equal(p.data, before[n]) for n, p in model.net.named_trainable_parameters().items())


# ---- against PEFT (test_peft_oracle.py's tiny random Llama, every trained tensor moved) ------------------------------
CASES = {"default": ("llama", dict()),  # PEFT's llama targets, e = k // 2
         "fraction": ("llama", dict(effective_rank=0.25, rank_pattern={"down_proj": 3, r"layers\.1\.self_attn\.q": 0.5},
                                    target_modules=["q_proj", "v_proj", "down_proj"])),
         "random": ("llama", dict(effective_rank=5, init_weights=False, target_modules=["o_proj", "up_proj"],
                                  modules_to_save=["lm_head"]))}


def ours(name):  # PEFT's base_model.model.<path>.osf_svd_params.default.<leaf> -> <path>.adapters.default.osf_svd_params.<leaf>
    return re.sub(r"^(.+)\.osf_svd_params\.default\.", r"\1.adapters.default.osf_svd_params.",
                  name.removeprefix("base_model.model."))


@pytest.mark.oracle
@pytest.mark.spec("OSF-1", "OSF-2", "OSF-5", "OSF-6", "OSF-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    check_peft_case(lib, base, CASES[case], "OSFConfig", OSFConfig, tmp_path, f"OSF {case}")


@pytest.mark.oracle
@pytest.mark.spec("OSF-3")
@pytest.mark.parametrize("case", ["default", "fraction"])
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    pm = perturbed_peft_model(lib, base, CASES[case], "OSFConfig").eval()
    report_gradients_from_peft(lib, pm, base(CASES[case][0]), tmp_path, f"OSF {case}", ours, 1e-4)


@pytest.mark.oracle
@pytest.mark.spec("OSF-4", "OSF-6")
@pytest.mark.parametrize("case", ["default", "fraction"])
def test_peft_default_init_is_the_base_and_counts_agree(lib, base, case):
    check_init_is_base_and_count(lib, base, CASES[case], "OSFConfig", OSFConfig, f"OSF {case}")


@pytest.mark.oracle
@pytest.mark.spec("OSF-4", "OSF-7")
def test_init_factors_equal_peft_s_once_its_svd_signs_are_minipeft_s(lib, base):
    """PEFT's init U_low, V_low carry its LAPACK's signs (the file does not record them); under minipeft's sign rule
    they are minipeft's tensors. Either way the function is the same, since only sign-free products and projectors
    enter it (the both-ways test above runs on the raw signs)."""
    peft, (kind, kw) = lib[2], CASES["fraction"]
    model = mp.load_model(base(kind))
    model.apply_adapter(OSFConfig.from_peft(dict(peft_type="OSF", **kw)))
    mine = {n: np.asarray(p.data) for n, p in model.net.named_trainable_parameters().items()}

    def peft_init():
        pm = peft.get_peft_model(hf_model(lib, base(kind)), peft.OSFConfig(task_type="CAUSAL_LM", **kw))
        return {ours(n): p.detach().numpy() for n, p in pm.named_parameters() if p.requires_grad}
    raw = peft_init()
    with peft_svd_signs_as_minipeft():
        signed = peft_init()
    assert sorted(raw) == sorted(mine) == sorted(signed)
    us = [n for n in mine if n.endswith("U_low")]
    flipped = sum(int(np.sum(np.sum(raw[n] * mine[n], axis=0) < 0)) for n in us)
    worst = max(float(np.abs(signed[n] - mine[n]).max()) for n in mine)
    print(f"\n  OSF: {flipped} of {sum(mine[n].shape[1] for n in us)} raw PEFT init pairs have the other sign; "
          f"under minipeft's rule the init factors differ by {worst:.2e} at most")
    assert worst < 1e-4


@pytest.mark.oracle
@pytest.mark.spec("OSF-6")
def test_peft_leaves_gpt2_conv1d_unadapted_where_minipeft_refuses_it(lib, base):
    pm = perturbed_peft_model(lib, base, ("gpt2", dict(target_modules=["c_attn"])), "OSFConfig")
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == 0  # PEFT: no OSF layer, no word
    with pytest.raises(ConfigError, match=r"c_attn.*torch.nn.Linear only"):
        mp.load_model(base("gpt2")).apply_osf(target_modules=("c_attn",))
