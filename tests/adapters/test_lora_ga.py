"""spec/lora_ga.md (LORA_GA-n): the gradient against float64 finite differences, A and B rebuilt in NumPy from the
spec's SVD, the residual, PEFT's conversion on save, and the errors raised before anything changes."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minipeft as mp
from adapters.one_layer import check_train_moves_every_leaf
from helpers import (INIT_DATA, assert_close, check_bad_input_changes_nothing, check_saved_as_conversion,
                     check_unconverted_folder_refused, tiny_llama)
from minipeft import backend
from minipeft.adapters import lora_ga
from minipeft.adapters.data_init import ConvertedLoRALinear
from minipeft.nn.layers import Linear

SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))


def reference(G, W0, r, s, direction, scale, gamma=16):
    """LORA_GA-2..4 in float64 NumPy: (A (r, in), B (out, r))."""
    U, S, Vh = np.linalg.svd(G, full_matrices=False)
    U, Vh, S = U[:, :2 * r], Vh[:2 * r], S[:2 * r]
    sign = np.sign(U[np.argmax(np.abs(U), axis=0), np.arange(2 * r)])
    U, Vh = U * sign, Vh * sign[:, None]
    a, b = {"ArB2r": (range(r), range(r, 2 * r)), "A2rBr": (range(r, 2 * r), range(r)),
            "ArBr": (range(1, 2 * r, 2), range(0, 2 * r, 2))}[direction]
    A, B = Vh[list(a)], U[:, list(b)] * S[list(b)]
    if scale == "stable":
        B = B * W0.shape[0] ** 0.25 / np.sqrt(gamma)
    elif scale == "weight_svd":
        B = B * np.linalg.svd(W0, compute_uv=False)[0] / S[list(b)][0]
    elif scale == "gd_scale":
        A, B = A / s, B / s
    return A, B


@pytest.mark.spec("LORA_GA-1")
def test_gradient_is_the_mean_batch_loss_gradient_by_finite_differences():
    model = tiny_llama(0)
    for p in model.net.parameters():
        p.data = p.data.astype(np.float64)
    cfg = mp.LoRAGAConfig(rank=2, target_modules=("v_proj",))
    bases = {p: m for p, m in model.net.named_modules() if p.endswith("v_proj")}
    model.net.eval()
    _, G = cfg.from_data(model, bases, INIT_DATA[:2])
    from minipeft.adapters.data_init import init_batches, token_mask
    from minipeft.autograd import no_grad
    from minipeft.train import _loss

    def L():
        total = 0.0
        with no_grad():
            for b in init_batches(model, INIT_DATA[:2]):
                total += float(_loss(model, b["input_ids"], b["attention_mask"],
                                     np.where(token_mask(b), b["input_ids"], -100)).data)
        return total / 2
    rng, eps = np.random.default_rng(0), 1e-6
    for path, base in bases.items():
        V = rng.standard_normal(base.weight.shape)
        base.weight.data = base.weight.data + eps * V
        up = L()
        base.weight.data = base.weight.data - 2 * eps * V
        down = L()
        base.weight.data = base.weight.data + eps * V
        assert abs((up - down) / (2 * eps) - np.sum(G[path] * V)) < 1e-7 + 1e-6 * abs(np.sum(G[path] * V)), path
    assert all(p.grad is None for p in model.net.parameters())  # nothing left behind
    assert not any(p.requires_grad for p in model.net.parameters())


@pytest.mark.spec("LORA_GA-2", "LORA_GA-3", "LORA_GA-4", "LORA_GA-5")
@SETTINGS
@given(r=st.integers(1, 4), direction=st.sampled_from(["ArB2r", "A2rBr", "ArBr"]),
       scale=st.sampled_from(lora_ga.SCALES), seed=st.integers(0, 1000))
def test_factors_and_residual_follow_the_spec(r, direction, scale, seed):
    rng = np.random.default_rng(seed)
    out, n = 12, 9
    W0, G = rng.standard_normal((out, n)), rng.standard_normal((out, n))
    base = Linear(n, out, bias=False)
    base.weight.data = W0.copy()
    cfg = mp.LoRAGAConfig(rank=r, alpha=3, lora_ga_config={"direction": direction, "scale": scale})
    delta = ConvertedLoRALinear(n, out, r, 3 / r, 0.0, False, backend.RNG(0))
    cfg.initialise_from(delta, base, G)
    A, B = reference(G, W0, r, 3 / r, direction, scale)
    assert_close(delta.lora_A.weight.data, A, atol=1e-12, label="A")
    assert_close(delta.lora_B.weight.data, B, atol=1e-12, label="B")
    assert_close(base.weight.data + delta.delta_weight(), W0, atol=1e-12, label="W0 + s B A")
    if scale != "gd_scale":  # A's rows are orthonormal right-singular vectors of G
        assert_close(A @ A.T, np.eye(r), atol=1e-12, label="A A^T")


@pytest.mark.spec("LORA_GA-3")
@SETTINGS
@given(r=st.integers(1, 4), seed=st.integers(0, 1000))
def test_random_direction_takes_the_same_r_of_the_2r_for_a_and_b(r, seed):
    a, b = lora_ga.direction_indices("random", r, backend.RNG(seed))
    assert list(a) == list(b) and len(set(a.tolist())) == r and set(a.tolist()) <= set(range(2 * r))


@pytest.mark.spec("LORA_GA-5", "LORA_GA-6")
@pytest.mark.parametrize("fields", [dict(rank=4, alpha=8), dict(rank=2, alpha=3, use_rslora=True),
                                    dict(rank=4, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 5})])
def test_saves_peft_conversion_a_rank_2r_lora_of_the_unmodified_base(fields, tmp_path):
    check_saved_as_conversion("lora_ga", fields, tmp_path)


@pytest.mark.spec("LORA_GA-7")
def test_bad_input_is_an_error_before_anything_changes():
    check_bad_input_changes_nothing("lora_ga", 9, "// 2 = 8", [({"lora_ga_config": bad}, "lora_ga_config") for bad in (
        {"direction": "BA"}, {"scale": "big"}, {"stable_gamma": 0}, {"gamma": 16})])


@pytest.mark.spec("LORA_GA-6")
def test_a_peft_lora_ga_folder_without_conversion_is_refused(tmp_path):
    check_unconverted_folder_refused("lora_ga", tmp_path)


def test_trains_through_model_train():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_lora_ga(data=["next abc = bcd", "next cat = dbu", "next dog = eph", "next pen = qfo"], rank=2)
    check_train_moves_every_leaf(model)
