"""spec/hra.md (HRA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy float64
from the spec's formula W = W0 H_1 ... H_r; and (oracle) against PEFT's HRA on Llama."""
import json
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import max_rel_err
from minipeft.adapters.hra import HRAConfig
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import IDS as IDS_P
from test_peft_oracle import (base, hf_logits, hf_model, lib, minipeft_saved_in_peft, perturbed_peft_model,  # noqa: F401
                              report, report_gradients_from_peft, report_init_is_base, report_merge_and_unload)


def randomize(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, "default"):
        d = layer.adapters["default"]
        d.hra_u.data = rng.standard_normal(d.hra_u.shape).astype(np.float32)


def rotation_np(U, apply_GS):
    """R = H_1 ... H_r in float64, from the spec's formula (HRA-1, HRA-2)."""
    U = np.asarray(U, np.float64)
    n, r = U.shape
    if apply_GS:
        Q, _ = np.linalg.qr(U)  # Gram-Schmidt up to the sign of each column; R = I - 2 Q Q^T ignores the signs
        return np.eye(n) - 2 * Q @ Q.T
    R = np.eye(n)
    for i in range(r):
        q = U[:, i:i + 1] / np.linalg.norm(U[:, i])
        R = R @ (np.eye(n) - 2 * q @ q.T)
    return R


@pytest.mark.spec("HRA-1", "HRA-2", "HRA-3", "HRA-5")
@SETTINGS
@given(r=st.integers(1, 6), gs=st.booleans(), tm=targets)
def test_forward_and_merge_are_W0_times_the_householder_product(r, gs, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_hra(rank=r, apply_GS=gs, init="random", target_modules=tm)
    randomize(model)
    updates = {}
    for p, layer in layers(model, "default"):
        W0 = W[p + ".weight"].astype(np.float64)
        updates[p + ".weight"] = W0 @ rotation_np(layer.adapters["default"].hra_u.data, gs) - W0
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("HRA-1", "HRA-2")
@SETTINGS
@given(r=st.integers(1, 8), gs=st.booleans(), seed=st.integers(0, 2**16))
def test_the_product_is_orthogonal_and_dW_has_rank_at_most_r(r, gs, seed):
    rng = np.random.default_rng(seed)
    U = rng.standard_normal((32, r))
    R = rotation_np(U, gs)
    assert np.allclose(R.T @ R, np.eye(32), atol=1e-10)
    W0 = rng.standard_normal((16, 32))
    assert np.linalg.matrix_rank(W0 @ R - W0) <= r  # R - I = -2 (sum of rank-1 terms in span(U))
    from minipeft.adapters.hra import HRALinear, reflect
    from minipeft.autograd.tensor import Tensor
    d = HRALinear(U.astype(np.float32), gs)
    ours = reflect(Tensor(np.eye(32)), d.directions(Tensor(U)), reverse=False).data
    assert np.allclose(ours, R, atol=1e-10)


@pytest.mark.spec("HRA-4")
def test_default_init_pairs_equal_columns_so_the_model_is_the_base():
    model = make_model()
    base = model(IDS).numpy()
    model.apply_hra(rank=4, target_modules=("q_proj", "up_proj"))
    assert max_rel_err(model(IDS), base) < 1e-5
    for _, layer in layers(model, "default"):
        U = np.asarray(layer.adapters["default"].hra_u.data)
        assert np.array_equal(U[:, 0::2], U[:, 1::2])
        assert np.abs(U).max() <= 1 / np.sqrt(2) and np.abs(U).max() > 0.8 / np.sqrt(2)  # U(±1/sqrt(r/2))
        assert np.linalg.matrix_rank(U[:, 0::2]) == 2
    rnd = make_model()
    rnd.apply_hra(rank=3, init="random", target_modules=("up_proj",))
    assert max_rel_err(rnd(IDS), base) > 1e-3
    with pytest.raises(ConfigError, match="even"):
        make_model().apply_hra(rank=3, target_modules=("q_proj",))


@pytest.mark.spec("HRA-6")
def test_only_u_trains_and_the_count_is_in_r():
    model = make_model()
    model.apply_hra(rank=4, target_modules=("q_proj", "down_proj"))
    randomize(model)
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(".hra_u") for n in trained)
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in trained.values())
    # q_proj in 32, down_proj in 64 (tiny llama's intermediate), r = 4, two layers
    ins = {p: layer.base_layer.in_features for p, layer in layers(model, "default")}
    assert model.parameter_counts()[0] == 4 * sum(ins.values())


@pytest.mark.spec("HRA-6")
@pytest.mark.parametrize("kwargs, field", [(dict(rank=0), "rank"), (dict(init="gaussian"), "init"),
                                           (dict(bias="lora_only"), "bias")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        HRAConfig(**kwargs)


@pytest.mark.spec("HRA-6")
def test_gpt2_conv1d_is_refused_as_peft_does():
    from minipeft.adapters.hra import HRALinear

    class Conv1DLike:
        fan_in_fan_out, in_features = True, 8
    with pytest.raises(ConfigError, match="Conv1D"):
        HRALinear.create(Conv1DLike(), HRAConfig(rank=2), "h.0.attn.c_attn", None)


@pytest.mark.spec("HRA-7")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_model()
    model.apply_hra(rank=4, apply_GS=True, init="random", bias="hra_only", target_modules=("q_proj",))
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "HRA" and cfg["r"] == 4 and cfg["apply_GS"] is True and cfg["init_weights"] is False
    assert cfg["bias"] == "hra_only"
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in keys.items()} == {  # bias="hra_only": the adapted layers' biases train and are saved
        f"base_model.model.model.layers.{i}.self_attn.q_proj.{k}": s for i in (0, 1)
        for k, s in (("hra_u", (32, 4)), ("base_layer.bias", (32,)))}
    assert HRAConfig.from_peft(dict(cfg, init_weights=True)).init == "default"


# ---- against PEFT (test_peft_oracle.py's tiny random Llama, every hra_u perturbed) -------------------------
CASES = {"plain": ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
         "gs": ("llama", dict(r=4, apply_GS=True, init_weights=False, target_modules=["q_proj", "v_proj", "down_proj"])),
         "bias": ("llama", dict(r=2, bias="hra_only", target_modules=["q_proj", "k_proj"]))}
LEAF = re.compile(r"base_model\.model\.(.+)\.hra_u\.default$")


def peft_model(lib, base, case):
    return perturbed_peft_model(lib, base, CASES[case], "HRAConfig").eval()


@pytest.mark.oracle
@pytest.mark.spec("HRA-1", "HRA-2", "HRA-3", "HRA-6", "HRA-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways(lib, base, tmp_path, case):
    kind, kw = CASES[case]
    pm = peft_model(lib, base, case)
    pm.save_pretrained(tmp_path / "peft")
    model = mp.load_model(base(kind))
    model.load_adapters(str(tmp_path / "peft"))
    assert type(model.peft_configs["default"]) is HRAConfig
    report(f"HRA PEFT->minipeft {case}", max_rel_err(model(IDS_P), hf_logits(lib, pm)))
    assert model.parameter_counts()[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    ours, theirs = minipeft_saved_in_peft(lib, base(kind), HRAConfig.from_peft(dict(peft_type="HRA", **kw)),
                                          tmp_path / "ours")
    report(f"HRA minipeft->PEFT {case}", max_rel_err(ours(IDS_P), hf_logits(lib, theirs)))


@pytest.mark.oracle
@pytest.mark.spec("HRA-5")
@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unload_equals_peft(lib, base, tmp_path, case):
    report_merge_and_unload(lib, peft_model(lib, base, case), base(CASES[case][0]), tmp_path, case)


@pytest.mark.oracle
@pytest.mark.spec("HRA-3")
@pytest.mark.parametrize("case", ["plain", "gs"])
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    report_gradients_from_peft(lib, peft_model(lib, base, case), base(CASES[case][0]), tmp_path, case,
                               lambda n: "{}.adapters.default.hra_u".format(LEAF.match(n).group(1)), 1e-4)


@pytest.mark.oracle
@pytest.mark.spec("HRA-4")
def test_peft_default_init_is_the_base_and_apply_GS_init_is_not(lib, base):
    peft, (kind, kw) = lib[2], CASES["plain"]
    *_, want = report_init_is_base(lib, base(kind), "HRAConfig", kw, HRAConfig.from_peft(dict(peft_type="HRA", **kw)),
                                   "HRA")
    gs_kw = dict(kw, apply_GS=True)
    gs = peft.get_peft_model(hf_model(lib, base(kind)), peft.HRAConfig(task_type="CAUSAL_LM", **gs_kw)).eval()
    assert not max_rel_err(hf_logits(lib, gs), want) < 1e-2  # HRA-4: Gram-Schmidt breaks the pairs (noise or NaN)
    with pytest.raises(ConfigError, match="apply_GS"):
        mp.load_model(base(kind)).apply_adapter(HRAConfig.from_peft(dict(peft_type="HRA", **gs_kw)))
