"""spec/oft.md (OFT-n) on one random Linear (one_layer.py) and tiny random Llama models (test_lora.py's
set-up). Each claim is rebuilt in NumPy float64 from the spec: Q_i = U - U^T from q_i, the exact Cayley
transform (I - Q)(I + Q)^-1, PEFT's Neumann series, R = blockdiag(R_i) and h = W0 (R^T x) + b0."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, assert_training_lowers_the_loss
from one_layer import random_base
from minipeft.adapters.base import AdaptedLayer
from minipeft.adapters.oft import OFTConfig, OFTLinear
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError
from test_lora import IDS, make_model


def skew(q, b):  # OFT notation: q_i -> U - U^T, row-major strict upper triangle
    Q = np.zeros((q.shape[0], b, b))
    r, c = np.triu_indices(b, 1)
    Q[:, r, c] = q
    return Q - Q.transpose(0, 2, 1)


def neumann(Q, k):
    I = np.eye(Q.shape[-1])
    if k == 1:
        return np.broadcast_to(I, Q.shape)
    if k == 2:
        return I + 2 * Q
    R, P = I + 2 * Q, Q
    for _ in range(2, max(k - 1, 3)):
        P = P @ Q
        R = R + 2 * P
    return R + P @ Q


def layer_with(cfg, n=16, m=12, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    base, W0 = random_base(False, rng, n, m)
    layer = AdaptedLayer(base)
    d = OFTLinear.create(base, cfg, "x", mp.backend.RNG(0))
    d.oft_R.weight.data = (rng.standard_normal(d.oft_R.weight.shape) * scale).astype(np.float32)
    layer.adapters["default"] = d
    layer.active = ["default"]
    return layer, d, W0, base.bias.data.astype(np.float64)


@pytest.mark.spec("OFT-2", "OFT-3")
@settings(max_examples=15, deadline=None)
@given(b=st.sampled_from([2, 4, 8]), exact=st.booleans(), k=st.integers(1, 7), share=st.booleans(),
       seed=st.integers(0, 1000))
def test_forward_is_base_of_block_rotated_input(b, exact, k, share, seed):
    cfg = OFTConfig(oft_block_size=b, use_cayley_neumann=not exact, num_cayley_neumann_terms=k, block_share=share)
    layer, d, W0, b0 = layer_with(cfg, seed=seed)
    q = d.oft_R.weight.data.astype(np.float64)
    Q = skew(q, b)
    I = np.eye(b)
    R = np.linalg.solve((I + Q).transpose(0, 2, 1), (I - Q).transpose(0, 2, 1)).transpose(0, 2, 1) if exact \
        else neumann(Q, k)
    R = np.broadcast_to(R, (16 // b, b, b))
    x = np.random.default_rng(seed + 1).standard_normal((3, 16))
    xr = np.einsum("tdk,dkc->tdc", x.reshape(3, -1, b), R).reshape(3, 16)
    assert_close(layer(Tensor(x.astype(np.float32))), xr @ W0.T + b0, 1e-5, label="OFT forward")


@pytest.mark.spec("OFT-2", "OFT-3")
@settings(max_examples=15, deadline=None)
@given(b=st.sampled_from([2, 3, 4, 8]), seed=st.integers(0, 1000), scale=st.floats(0.01, 3.0))
def test_exact_cayley_is_a_rotation_that_keeps_norms(b, seed, scale):
    cfg = OFTConfig(oft_block_size=b, use_cayley_neumann=False)
    _, d, _, _ = layer_with(cfg, n=24, seed=seed, scale=scale)
    R = np.asarray(d.rotation().data, np.float64)
    for Ri in R:
        assert_close(Ri.T @ Ri, np.eye(b), 1e-5, label="R^T R = I")
        assert abs(np.linalg.det(Ri) - 1.0) < 1e-4
    x = np.random.default_rng(seed).standard_normal((5, d.n)).astype(np.float32)
    y = np.asarray(d.adapt_input(Tensor(x)).data, np.float64)
    assert_close(np.linalg.norm(y.reshape(5, -1, b), axis=-1), np.linalg.norm(x.reshape(5, -1, b), axis=-1), 1e-5,
                 label="block norms kept")


@pytest.mark.spec("OFT-2")
def test_neumann_approaches_the_transposed_exact_cayley_for_small_Q():
    """PEFT's series I + 2Q + 2Q^2 + ... is (I + Q)(I - Q)^-1 = Cayley(-Q) = Cayley(Q)^T, not Cayley(Q)."""
    errs = []
    for k in (3, 5, 7):
        layer_n, d_n, _, _ = layer_with(OFTConfig(oft_block_size=4, num_cayley_neumann_terms=k), scale=0.02)
        layer_e, d_e, _, _ = layer_with(OFTConfig(oft_block_size=4, use_cayley_neumann=False), scale=0.02)
        errs.append(float(np.abs(d_n.rotation().data - d_e.rotation().data.transpose(0, 2, 1)).max()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-6


@pytest.mark.spec("OFT-4")
def test_init_is_identity_and_base():
    model = make_model()
    before = model(IDS).data
    model.apply_oft(oft_block_size=8, target_modules="all-linear")
    assert np.array_equal(model(IDS).data, before)


@pytest.mark.spec("OFT-5")
def test_coft_projects_onto_the_eps_ball():
    cfg = OFTConfig(oft_block_size=4, coft=True, eps=0.1)
    _, d, _, _ = layer_with(cfg, scale=1.0)
    q0 = d.oft_R.weight.data.astype(np.float64).copy()
    d.rotation()
    eps = 0.1 / np.sqrt(q0.shape[0])
    n0 = np.sqrt(2) * np.linalg.norm(q0, axis=1, keepdims=True)
    want = np.where(n0 <= eps, q0, eps * q0 / n0)
    assert_close(d.oft_R.weight.data, want, 1e-6, label="coft projection")
    assert np.all(np.sqrt(2) * np.linalg.norm(d.oft_R.weight.data, axis=1) <= eps * (1 + 1e-5))


@pytest.mark.spec("OFT-6")
def test_module_dropout_sets_int_pD_blocks_to_identity_in_training_only():
    cfg = OFTConfig(oft_block_size=2, module_dropout=0.5)
    layer, d, _, _ = layer_with(cfg)
    d.train()
    R = np.asarray(d.rotation().data)
    identity = [np.array_equal(Ri, np.eye(2, dtype=np.float32)) for Ri in R]
    assert sum(identity) == int(0.5 * 8)
    d.eval()
    assert not any(np.array_equal(Ri, np.eye(2, dtype=np.float32)) for Ri in np.asarray(d.rotation().data))


@pytest.mark.spec("OFT-7")
@pytest.mark.parametrize("exact", [False, True])
def test_merge_equals_forward_and_unmerge_restores(exact):
    layer, d, W0, b0 = layer_with(OFTConfig(oft_block_size=4, use_cayley_neumann=not exact))
    x = Tensor(np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32))
    y = layer(x).data
    layer.merge("default")
    assert_close(layer(x), y, 1e-5, label="merged forward")
    layer.unmerge("default")
    assert_close(layer.base_layer.weight.data, W0, 1e-5, label="unmerged W0")


@pytest.mark.spec("OFT-8")
@pytest.mark.parametrize("kw,per", [(dict(oft_block_size=8), 4 * 28), (dict(rank=4, oft_block_size=0), 4 * 28),
                                    (dict(oft_block_size=8, block_share=True), 28)])
def test_trainable_count(kw, per):
    model = make_model()
    model.apply_oft(target_modules=["q_proj"], **kw)  # q_proj: in = 32
    assert model.parameter_counts()[0] == 2 * per


@pytest.mark.spec("OFT-1", "OFT-10")
def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="exactly one"):
        OFTConfig(rank=4, oft_block_size=8)
    with pytest.raises(ConfigError, match="exactly one"):
        OFTConfig(rank=0, oft_block_size=0)
    with pytest.raises(ConfigError, match="must divide the layer's in_features = 32"):
        make_model().apply_oft(oft_block_size=5, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="rank .*must divide"):
        make_model().apply_oft(rank=3, oft_block_size=0, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="no oft_block_size"):
        OFTConfig.from_peft({"peft_type": "OFT", "r": 8})
    rng = np.random.default_rng(0)
    conv, _ = random_base(True, rng, 16, 8)
    with pytest.raises(ConfigError, match="Conv1D"):
        OFTLinear.create(conv, OFTConfig(oft_block_size=4), "c_attn", mp.backend.RNG(0))


@pytest.mark.spec("OFT-8")
def test_training_moves_q_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_oft(oft_block_size=8, target_modules="all-linear")
    assert_training_lowers_the_loss(model)


@pytest.mark.spec("OFT-2", "OFT-8")
@pytest.mark.parametrize("exact", [False, True])
def test_cayley_gradient_matches_float64_finite_differences(exact):
    """L = Σ G ⊙ Cayley(skew(q)) in float64: the Inverse op's backward (exact) and the Neumann products."""
    from minipeft.adapters.oft import cayley, skew_map
    rng = np.random.default_rng(4)
    b = 4
    q0 = rng.standard_normal((3, b * (b - 1) // 2)) * 0.3
    G = rng.standard_normal((3, b, b))
    S = np.asarray(skew_map(b), np.float64)

    def loss(qv, grad=False):
        q = Tensor(qv, requires_grad=grad)
        out = (cayley((q @ Tensor(S)).reshape(3, b, b), exact, 5) * Tensor(G)).sum()
        return out, q

    out, q = loss(q0.copy(), True)
    out.backward()
    num = np.zeros_like(q0)
    h = 1e-6
    for idx in np.ndindex(*q0.shape):
        up, dn = q0.copy(), q0.copy()
        up[idx] += h
        dn[idx] -= h
        num[idx] = (float(loss(up)[0].data) - float(loss(dn)[0].data)) / (2 * h)
    assert_close(q.grad, num, 1e-6, label="dL/dq")
