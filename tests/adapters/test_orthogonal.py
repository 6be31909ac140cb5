"""spec/orthogonal.md (ORTHOGONAL-n): PEFT's orthogonal LoRA init, rebuilt in NumPy from the spec's formula."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, max_rel_err, reloaded, tiny_llama
from minipeft import backend
from minipeft.adapters.lora import LoRALinear
from minipeft.errors import ConfigError
from minipeft.nn.layers import Linear

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
IDS = np.random.default_rng(1).integers(0, 48, (2, 7))


def one_layer(n, m, r, seed, alpha=8.0):
    """A float Linear (out=m, in=n) with W0 ~ N(0, 0.3^2) on the current backend, its OrthogonalConfig delta
    built from backend.RNG(seed), and W0 on the host."""
    W0 = (np.random.default_rng(seed + 100).standard_normal((m, n)) * 0.3).astype(np.float32)
    base = Linear(n, m)
    base.weight.data = backend.asarray(W0)
    cfg = mp.OrthogonalConfig(rank=r, alpha=alpha, target_modules=("x",))
    return base, LoRALinear.create(base, cfg, "x", backend.RNG(seed)), W0


def factors(delta):
    return (np.asarray(backend.to_host(delta.lora_A.weight.data), np.float64),
            np.asarray(backend.to_host(delta.lora_B.weight.data), np.float64))


LAYERS = given(n=st.integers(6, 40), m=st.integers(6, 40), h=st.integers(1, 3), seed=st.integers(0, 2**16))


@pytest.mark.spec("ORTHOGONAL-1")
@SETTINGS
@LAYERS
def test_init_is_the_formula(n, m, h, seed):
    r = 2 * h
    base, delta, W0 = one_layer(n, m, r, seed)
    g = np.random.default_rng(seed)  # backend.RNG(seed) draws X, G_A, G_B in this order (float32)
    X = g.standard_normal((r, r)).astype(np.float32)
    GA, GB = g.standard_normal((n, h)).astype(np.float32), g.standard_normal((m, h)).astype(np.float32)
    Q, _ = np.linalg.qr(X.astype(np.float64))
    A, B = factors(delta)
    assert_close(A, (GA @ Q[0::2]).T / 10, 1e-5, label="A")
    assert_close(B, GB @ Q[1::2] / 10, 1e-5, label="B")
    assert np.array_equal(backend.to_host(base.weight.data), W0)  # W0 untouched
    _, again, _ = one_layer(n, m, r, seed)
    assert all(np.array_equal(x, y) for x, y in zip(factors(delta), factors(again)))  # same seed, same A, B


@pytest.mark.spec("ORTHOGONAL-2")
@SETTINGS
@LAYERS
def test_product_is_zero_and_the_factors_are_not(n, m, h, seed):
    _, delta, W0 = one_layer(n, m, 2 * h, seed)
    A, B = factors(delta)
    assert np.max(np.abs(delta.s * B @ A)) <= 1e-6 * np.max(np.abs(W0))
    def rank(t):  # float32 factors: singular values below 1e-4 of the largest are rounding
        return np.linalg.matrix_rank(t, tol=1e-4 * np.linalg.norm(t, 2))
    assert rank(A) == h and rank(B) == h
    assert rank(np.concatenate([B.T / np.abs(B).max(), A / np.abs(A).max()], axis=1)) == 2 * h  # complementary in R^r


@pytest.mark.spec("ORTHOGONAL-1", "ORTHOGONAL-2")
def test_on_every_backend(any_backend):
    _, delta, W0 = one_layer(20, 12, 4, seed=3)
    A, B = factors(delta)
    backend.set_backend("numpy")
    _, ref, _ = one_layer(20, 12, 4, seed=3)
    assert_close(A, factors(ref)[0], 1e-6, label=f"{any_backend} A")
    assert_close(B, factors(ref)[1], 1e-6, label=f"{any_backend} B")
    assert np.max(np.abs(B @ A)) < 1e-7


@pytest.mark.spec("ORTHOGONAL-2")
def test_entries_have_mean_square_one_over_200():
    A, B = factors(one_layer(400, 300, 16, seed=0)[1])
    for name, t in (("A", A), ("B", B)):
        assert abs(np.mean(t ** 2) * 200 - 1) < 0.05, name


@pytest.mark.spec("ORTHOGONAL-2", "METHOD-10")
def test_model_output_at_step0_is_the_base():
    model = tiny_llama()
    base = model(IDS).numpy()
    model.apply_orthogonal(rank=4, alpha=16, target_modules="all-linear")
    assert max_rel_err(model(IDS), base) < 1e-5
    assert type(model.peft_configs["default"]) is mp.OrthogonalConfig


@pytest.mark.spec("ORTHOGONAL-3")
@pytest.mark.parametrize("fields, field", [({"rank": 3}, "rank"), ({"rank": 4, "rank_pattern": {"q_proj": 5}},
                                           "rank_pattern"), ({"init": "pissa"}, "init")])
def test_refused(fields, field):
    with pytest.raises(ConfigError, match=field):
        mp.OrthogonalConfig(**fields)
    with pytest.raises(ConfigError, match="OrthogonalConfig"):
        mp.LoRAConfig(init="orthogonal")
    m = tiny_llama()
    with pytest.raises(ConfigError, match="even"):
        m.apply_orthogonal(rank=5)
    assert not m.peft_configs


@pytest.mark.spec("ORTHOGONAL-4", "METHOD-10")
def test_save_load_round_trip(tmp_path):
    model = tiny_llama()
    model.apply_orthogonal(rank=2, alpha=4, target_modules=("q_proj", "v_proj"))
    reloaded(model, tmp_path, IDS)
