"""spec/loftq.md (LOFTQ-n): LoftQ's alternating NF4 quantization and rank-r SVD, rebuilt in NumPy from the spec
(q(M) through minipeft's NF4, itself held byte-equal to bitsandbytes by tests/test_nf4_oracle.py)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, max_rel_err, reloaded, tiny_llama
from minipeft import backend
from minipeft.adapters.lora import LoRALinear
from minipeft.errors import ConfigError
from minipeft.nn.layers import Conv1D, Linear
from minipeft.quant import QuantizationConfig, nf4_dequantize, nf4_quantize
from minipeft.quant.linear4bit import quantize_model

SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
IDS = np.random.default_rng(1).integers(0, 48, (2, 7))


def q(M):
    return np.asarray(nf4_dequantize(nf4_quantize(np.asarray(M, np.float32), 64, double_quantization=False)))


def spec_loftq(W, r, T):
    """LOFTQ-1 in NumPy: (Q_T, A_T, B_T)."""
    R = W
    for _ in range(T):
        Q = q(R)
        U, S, Vh = np.linalg.svd(W - Q, full_matrices=False)
        B, A = U[:, :r] * np.sqrt(S[:r]), np.sqrt(S[:r])[:, None] * Vh[:r]
        R = W - B @ A
    return Q, A, B


def one_layer(n, m, r, T, seed, alpha=8.0, cls=Linear):
    W = (np.random.default_rng(seed).standard_normal((m, n)) * 0.3).astype(np.float32)
    base = cls(n, m)
    base.weight.data = backend.asarray(W.T.copy() if cls is Conv1D else W)
    cfg = mp.LoftQConfig(rank=r, alpha=alpha, loftq_config={"loftq_bits": 4, "loftq_iter": T}, target_modules=("x",))
    return base, LoRALinear.create(base, cfg, "x", backend.RNG(seed)), W


def host(t):
    return np.asarray(backend.to_host(t.data), np.float64)


LAYERS = given(n=st.integers(8, 80), m=st.integers(8, 80), r=st.integers(1, 6), T=st.integers(1, 3),
               seed=st.integers(0, 2**16))


@pytest.mark.spec("LOFTQ-1", "LOFTQ-2")
@SETTINGS
@LAYERS
def test_init_is_the_alternation(n, m, r, T, seed):
    base, delta, W = one_layer(n, m, r, T, seed)
    Q, A, B = spec_loftq(W, r, T)
    W0 = host(base.weight)
    if T == 1:
        assert np.array_equal(W0, q(W))  # Q_1 = q(W), bit for bit
    assert_close(W0, Q, 1e-6, label="W0 = Q_T")
    assert_close(host(delta.lora_B.weight) @ host(delta.lora_A.weight), B @ A, 1e-5, label="B A")
    assert np.array_equal(q(W0), W0.astype(np.float32))  # LOFTQ-2: NF4-representable
    again, delta2, _ = one_layer(n, m, r, T, seed)  # no random draw: the same W, the same result
    assert np.array_equal(host(again.weight), W0) and np.array_equal(host(delta2.lora_A.weight), host(delta.lora_A.weight))


@pytest.mark.spec("LOFTQ-3", "LOFTQ-4")
@SETTINGS
@LAYERS
def test_b_a_is_the_best_rank_r_fit_and_is_not_scaled(n, m, r, T, seed):
    base, delta, W = one_layer(n, m, r, T, seed, alpha=3.0 * r)  # s = 3: A, B are the same as for s = 1
    W0, BA = host(base.weight), host(delta.lora_B.weight) @ host(delta.lora_A.weight)
    sigma = np.linalg.svd(W - W0, compute_uv=False)
    assert np.isclose(np.linalg.norm(W - W0 - BA) ** 2, np.sum(sigma[r:] ** 2), rtol=1e-4, atol=1e-8)
    assert np.linalg.norm(W - W0 - BA) <= np.linalg.norm(W - W0)
    _, unit, _ = one_layer(n, m, r, T, seed, alpha=1.0 * r)
    assert_close(host(unit.lora_B.weight) @ host(unit.lora_A.weight), BA, 1e-6, label="B A independent of s")
    x = np.random.default_rng(seed).standard_normal((3, n)).astype(np.float32)
    from minipeft.adapters.base import AdaptedLayer
    layer = AdaptedLayer(base)
    layer.adapters["default"], layer.active = delta, ["default"]
    b = host(base.bias)
    assert_close(layer(mp.Tensor(x)), x @ W0.T + b + delta.s * x @ BA.T, 1e-5, label="h = Q x + b + s B A x")


@pytest.mark.spec("LOFTQ-3")
def test_closer_to_the_float_model_than_nf4_alone():
    model = tiny_llama()
    ref = model(IDS).numpy()
    nf4 = tiny_llama()
    for name, p in nf4.net.named_parameters():
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            p.data = q(p.data)
    loftq = tiny_llama()
    loftq.apply_loftq(rank=8, alpha=8, target_modules="all-linear")
    assert max_rel_err(loftq(IDS), ref) < 0.75 * max_rel_err(nf4(IDS), ref)


@pytest.mark.spec("LOFTQ-1", "LOFTQ-2")
def test_on_every_backend(any_backend):
    base, delta, _ = one_layer(72, 40, 4, 2, seed=5)
    got = host(base.weight), host(delta.lora_B.weight) @ host(delta.lora_A.weight)
    backend.set_backend("numpy")
    ref, rdelta, _ = one_layer(72, 40, 4, 2, seed=5)
    assert_close(got[0], host(ref.weight), 1e-6, label=f"{any_backend} Q_T")
    assert_close(got[1], host(rdelta.lora_B.weight) @ host(rdelta.lora_A.weight), 1e-5, label=f"{any_backend} B A")


@pytest.mark.spec("LOFTQ-5")
@pytest.mark.parametrize("loftq_config, message", [({"loftq_bits": 8, "loftq_iter": 1}, "int8"),
                                                   ({"loftq_bits": 4, "loftq_iter": 0}, ">= 1"),
                                                   ({"loftq_bits": 4, "loftq_iter": True}, ">= 1"),
                                                   ({"loftq_bits": 4}, "exactly the keys"), ([4, 1], "dict")])
def test_bad_loftq_config(loftq_config, message):
    with pytest.raises(ConfigError, match=message):
        mp.LoftQConfig(loftq_config=loftq_config)


@pytest.mark.spec("LOFTQ-5")
def test_refused_bases_leave_the_model_unchanged():
    with pytest.raises(ConfigError, match="LoftQConfig"):
        mp.LoRAConfig(init="loftq")
    m = tiny_llama()
    quantize_model(m.net, QuantizationConfig(compute_dtype="float32"))
    before = m(IDS).numpy()
    with pytest.raises(ConfigError, match="4-bit layer"):
        m.apply_loftq(target_modules=("q_proj",))
    assert not m.peft_configs and np.array_equal(m(IDS).numpy(), before)
    with pytest.raises(ConfigError, match="Conv1D"):
        one_layer(16, 24, 2, 1, seed=0, cls=Conv1D)


@pytest.mark.spec("LOFTQ-1", "LOFTQ-6")
def test_reload_recomputes_q(tmp_path):
    model = tiny_llama()
    model.apply_loftq(rank=4, alpha=4, loftq_config={"loftq_bits": 4, "loftq_iter": 2}, target_modules=("q_proj",))
    reloaded(model, tmp_path, IDS)
