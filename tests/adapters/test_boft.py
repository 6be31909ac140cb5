"""spec/boft.md (BOFT-n) on one random Linear (one_layer.py) and tiny random Llama models (test_lora.py's
set-up), each claim rebuilt in NumPy float64 from the spec: Q = (A - A^T)/2, R_kd = (I - Q)(I + Q)^-1, the
butterfly permutations, R = M_{f-1} ... M_0 and h = s * (W0 R^T x) + b0; and (oracle) against PEFT's BOFT,
whose butterfly (f > 1) needs its CUDA extension fbd_cuda: the tests stand in a torch block-diagonal for it."""
import json
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, assert_training_lowers_the_loss, max_rel_err
from one_layer import random_base
from minipeft.adapters.base import AdaptedLayer
from minipeft.adapters.boft import BOFTConfig, BOFTLinear
from minipeft.autograd import Tensor
from minipeft.errors import CheckpointError, ConfigError
from test_lora import check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import (IDS, base, check_both_ways_and_merged, check_step_gradients, lib,  # noqa: F401
                              perturbed_peft_model, report)


def perm_np(n, blocks, r):  # spec BOFT-3: in each run of n / blocks, chunks of r: even chunks, then odd ones
    size = n // blocks
    chunks = list(range(0, size // r, 2)) + list(range(1, size // r, 2))
    return np.concatenate([start + np.concatenate([np.arange(c * r, c * r + r) for c in chunks])
                           for start in range(0, n, size)])


def rotation_np(A):  # A (f, D, b, b) -> R (n, n), float64
    f, D, b, _ = A.shape
    n, I = D * b, np.eye(b)
    Q = (A - A.transpose(0, 1, 3, 2)) / 2
    R = None
    for k in range(f):
        Rk = np.linalg.solve((I + Q[k]).transpose(0, 2, 1), (I - Q[k]).transpose(0, 2, 1)).transpose(0, 2, 1)
        B = np.zeros((n, n))
        for d in range(D):
            B[d * b:(d + 1) * b, d * b:(d + 1) * b] = Rk[d]
        P = np.eye(n)[perm_np(n, D // 2 ** k, b // 2)] if k else np.eye(n)
        M = P @ B @ P.T
        R = M if R is None else M @ R
    return R


def randomize(d, rng, scale=0.3):
    d.boft_R.data = (rng.standard_normal(d.boft_R.shape) * scale).astype(np.float32)
    d.boft_s.data = (1 + rng.standard_normal(d.boft_s.shape) * scale).astype(np.float32)


def layer_with(cfg, n=16, m=12, seed=0):
    rng = np.random.default_rng(seed)
    base_layer, W0 = random_base(False, rng, n, m)
    layer = AdaptedLayer(base_layer)
    d = BOFTLinear.create(base_layer, cfg, "x", mp.backend.RNG(0))
    randomize(d, rng)
    layer.adapters["default"] = d
    layer.active = ["default"]
    return layer, d, W0, base_layer.bias.data.astype(np.float64)


SIZES = st.sampled_from([(2, 1), (4, 1), (8, 1), (2, 2), (2, 3), (4, 2), (2, 4)])  # (b, f) for in = 16


@pytest.mark.spec("BOFT-2", "BOFT-3", "BOFT-4")
@settings(max_examples=20, deadline=None)
@given(bf=SIZES, by_num=st.booleans(), seed=st.integers(0, 1000))
def test_forward_is_scaled_base_of_butterfly_rotated_input(bf, by_num, seed):
    b, f = bf
    cfg = BOFTConfig(boft_block_size=0, boft_block_num=16 // b, boft_n_butterfly_factor=f) if by_num \
        else BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=f)
    layer, d, W0, b0 = layer_with(cfg, seed=seed)
    assert d.boft_R.shape == (f, 16 // b, b, b) and d.boft_s.shape == (12, 1)
    R = rotation_np(np.asarray(d.boft_R.data, np.float64))
    assert_close(R.T @ R, np.eye(16), 1e-5, label="R orthogonal")
    assert abs(np.linalg.det(R) - 1.0) < 1e-4
    x = np.random.default_rng(seed + 1).standard_normal((3, 16))
    s = np.asarray(d.boft_s.data, np.float64)[:, 0]
    assert_close(layer(Tensor(x.astype(np.float32))), (x @ R @ W0.T) * s + b0, 1e-5, label="BOFT forward")


@pytest.mark.spec("BOFT-3")
def test_butterfly_permutations_are_peft_s():
    """PEFT's block_butterfly_perm(16, 2, 2, 1): chunks of 2 in runs of 8 taken 0, 2, 1, 3."""
    from minipeft.adapters.boft import butterfly_perm
    assert butterfly_perm(16, 2, 2) == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert butterfly_perm(8, 4, 1) == list(range(8))  # the first factor's permutation is I
    for n, blocks, r in [(16, 4, 1), (32, 2, 4), (64, 8, 2)]:
        assert butterfly_perm(n, blocks, r) == list(perm_np(n, blocks, r))


@pytest.mark.spec("BOFT-5")
def test_init_is_identity_and_base():
    model = make_model()
    ids = np.array([[1, 5, 9, 2, 7]])
    before = model(ids).data
    model.apply_boft(boft_block_size=4, boft_n_butterfly_factor=2, target_modules="all-linear")
    assert np.array_equal(model(ids).data, before)
    rnd = make_model()
    rnd.apply_boft(boft_block_size=4, init="random", target_modules=["q_proj"])
    d = layers(rnd, "default")[0][1].adapters["default"]
    A, s = np.asarray(d.boft_R.data), np.asarray(d.boft_s.data)
    assert abs(A.std() - 0.1) < 0.02 and abs(s.mean() - 1.0) < 0.05 and abs(s.std() - 0.1) < 0.04


@pytest.mark.spec("BOFT-6")
def test_dropout_sets_int_pD_blocks_of_one_factor_to_identity_in_training_only():
    layer, d, _, _ = layer_with(BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, boft_dropout=0.5))
    d.train()
    R = np.asarray(d.blocks(dropout=True).data)  # (2, 8, 2, 2)
    identity = np.array([[np.array_equal(R[k, i], np.eye(2, dtype=np.float32)) for i in range(8)] for k in range(2)])
    assert sorted(identity.sum(axis=1).tolist()) == [0, int(0.5 * 8)]
    x = Tensor(np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32))
    d.eval()
    assert np.array_equal(layer(x).data, layer(x).data)
    assert not np.any([[np.array_equal(Ri, np.eye(2, dtype=np.float32)) for Ri in Rk]
                       for Rk in np.asarray(d.blocks(dropout=True).data)])


@pytest.mark.spec("BOFT-7")
@settings(max_examples=8, deadline=None)
@given(bf=SIZES, seed=st.integers(0, 1000))
def test_merge_is_diag_s_W0_R_T_and_unmerge_restores(bf, seed):
    b, f = bf
    model = make_model()
    W = snapshot(model)
    model.apply_boft(boft_block_size=b, boft_n_butterfly_factor=f, target_modules=["q_proj", "o_proj"])
    rng = np.random.default_rng(seed)
    updates = {}
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        randomize(d, rng)
        W0 = W[path + ".weight"].astype(np.float64)
        merged = np.asarray(d.boft_s.data, np.float64) * (W0 @ rotation_np(np.asarray(d.boft_R.data, np.float64)).T)
        updates[path + ".weight"] = merged - W0
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("BOFT-4", "BOFT-7")
def test_bias_is_not_scaled_forward_and_merged():
    layer, d, W0, b0 = layer_with(BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2))
    x = Tensor(np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32))
    y = layer(x).data
    layer.merge("default")
    assert_close(layer(x), y, 1e-5, label="merged forward")
    assert np.array_equal(layer.base_layer.bias.data, b0.astype(np.float32))
    layer.unmerge("default")
    assert_close(layer.base_layer.weight.data, W0, 1e-5, atol=1e-6, label="unmerged W0")


@pytest.mark.spec("BOFT-8")
@pytest.mark.parametrize("kw,per", [(dict(boft_block_size=4), 8 * 16 + 32),
                                    (dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2),
                                     2 * 4 * 64 + 32),
                                    (dict(boft_block_size=2, boft_n_butterfly_factor=3), 3 * 16 * 4 + 32)])
def test_trainable_count(kw, per):
    model = make_model()
    model.apply_boft(target_modules=["q_proj"], **kw)  # q_proj: in = out = 32, two layers
    assert model.parameter_counts()[0] == 2 * per


@pytest.mark.spec("BOFT-1", "BOFT-10")
def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="exactly one"):
        BOFTConfig(boft_block_size=4, boft_block_num=8)
    with pytest.raises(ConfigError, match="exactly one"):
        BOFTConfig(boft_block_size=0, boft_block_num=0)
    with pytest.raises(ConfigError, match="positive integer"):
        BOFTConfig(boft_n_butterfly_factor=0)
    with pytest.raises(ConfigError, match=r"boft_block_size \(for .*q_proj\).*must divide the layer's in_features = 32"):
        make_model().apply_boft(boft_block_size=5, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="boft_block_num .*must divide"):
        make_model().apply_boft(boft_block_size=0, boft_block_num=3, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="4 factors need boft_block_size x 2\\^3 = 64 to divide in_features = 32"):
        make_model().apply_boft(boft_block_size=8, boft_n_butterfly_factor=4, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="must both be even"):
        make_model().apply_boft(boft_block_size=1, boft_n_butterfly_factor=2, target_modules=["q_proj"])
    conv, _ = random_base(True, np.random.default_rng(0), 16, 8)
    with pytest.raises(ConfigError, match="Conv1D"):
        BOFTLinear.create(conv, BOFTConfig(boft_block_size=4), "c_attn", mp.backend.RNG(0))


@pytest.mark.spec("BOFT-8")
def test_training_moves_R_and_s_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_boft(boft_block_size=4, boft_n_butterfly_factor=2, target_modules="all-linear")
    assert_training_lowers_the_loss(model)


# ---- oracle: PEFT 0.21.2's BOFT ----

CASES = {
    "size4": ("llama", dict(boft_block_size=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])),
    "num8_f2": ("llama", dict(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=2, boft_dropout=0.1,
                              target_modules=["q_proj", "down_proj"])),
    "size2_f3": ("llama", dict(boft_block_size=2, boft_n_butterfly_factor=3,
                               target_modules=["q_proj", "up_proj", "v_proj"])),
}


@pytest.fixture
def fbd(lib, monkeypatch):
    """A torch stand-in for PEFT's CUDA extension fbd_cuda: (N, D, b, b) -> [(N, Db, Db)] block diagonals and
    its backward (the diagonal blocks of the gradient), so PEFT builds f > 1 factors on this CPU."""
    torch, _, peft = lib

    def forward(x):
        return [torch.stack([torch.block_diag(*blocks) for blocks in x])]

    def backward(g, x):
        N, D, b, _ = x.shape
        return [torch.stack([torch.stack([g[k, i * b:(i + 1) * b, i * b:(i + 1) * b] for i in range(D)])
                             for k in range(N)])]

    monkeypatch.setattr(peft.tuners.boft.layer, "_FBD_CUDA", types.SimpleNamespace(forward=forward, backward=backward))


def peft_model(lib, base, case):
    return perturbed_peft_model(lib, base, CASES[case], "BOFTConfig").eval()


@pytest.mark.oracle
@pytest.mark.spec("BOFT-2", "BOFT-3", "BOFT-4", "BOFT-7", "BOFT-9")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_both_ways_and_merged(lib, base, fbd, tmp_path, case):
    pm = peft_model(lib, base, case)
    f = CASES[case][1].get("boft_n_butterfly_factor", 1)
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape[0] == f
    check_both_ways_and_merged(lib, pm, base(CASES[case][0]), tmp_path, f"BOFT {case}")


@pytest.mark.oracle
@pytest.mark.spec("BOFT-8")
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_and_parameter_count_equal_peft(lib, base, fbd, tmp_path, case):
    pm = peft_model(lib, base, case)
    theirs = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    model = mp.load_model(base(CASES[case][0]))
    model.apply_adapter(BOFTConfig.from_peft(dict(peft_type="BOFT", **CASES[case][1])))
    assert model.parameter_counts()[0] == theirs
    check_step_gradients(lib, pm, base(CASES[case][0]), tmp_path, r"boft_R|boft_s", case)


@pytest.mark.oracle
@pytest.mark.spec("BOFT-5")
def test_init_is_base_as_peft(lib, base):
    kind, kw = CASES["num8_f2"]
    model = mp.load_model(base(kind))
    ids = np.array([[3, 1, 4, 1, 5]])
    before = model(ids).data
    model.apply_adapter(BOFTConfig.from_peft(dict(peft_type="BOFT", **kw)))
    assert np.array_equal(model(ids).data, before)


@pytest.mark.oracle
@pytest.mark.spec("BOFT-9")
def test_a_file_from_peft_without_its_cuda_extension_is_refused_clearly(lib, base, tmp_path):
    """Without fbd_cuda PEFT builds one factor whatever boft_n_butterfly_factor says (BOFT deviations)."""
    kind, kw = CASES["num8_f2"]
    pm = perturbed_peft_model(lib, base, CASES["num8_f2"], "BOFTConfig")
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.boft_R["default"].shape[0] == 1
    pm.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"boft_R holds 1 butterfly factor\(s\), shape \(1, 8, 4, 4\), but "
                                              r"adapter_config.json's field boft_n_butterfly_factor=2.*fbd_cuda"):
        mp.load_model(base(kind)).load_adapters(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, boft_n_butterfly_factor=1)))
    model = mp.load_model(base(kind))
    model.load_adapters(str(tmp_path))  # the fix the error names gives PEFT's (CPU) logits
    with lib[0].no_grad():
        theirs = pm.eval()(lib[0].tensor(IDS)).logits.numpy()
    report("BOFT PEFT (no fbd_cuda) -> minipeft", max_rel_err(model(IDS), theirs))
