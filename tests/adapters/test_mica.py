"""spec/mica.md (MICA-n): MiCA, B frozen at W0's minor left singular vectors, A trained from 0; rebuilt in NumPy."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, reloaded, tiny_llama
from minipeft import backend
from minipeft.adapters.mica import MiCALinear
from minipeft.nn.layers import Linear
from one_layer import probe_backward

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
IDS = np.random.default_rng(1).integers(0, 48, (2, 7))
ROWS = [{"input_ids": [3, 4, 5, 6, 7, 8, 9]}, {"input_ids": [10, 11, 12, 13, 14]}] * 2
LAYERS = given(n=st.integers(4, 30), m=st.integers(4, 30), r=st.integers(1, 4), seed=st.integers(0, 2**16),
               lora_bias=st.booleans())


def one_layer(n, m, r, seed, lora_bias=False):
    W0 = (np.random.default_rng(seed).standard_normal((m, n)) * 0.3).astype(np.float32)
    base = Linear(n, m)
    base.weight.data = backend.asarray(W0)
    cfg = mp.MiCAConfig(rank=r, alpha=2 * r + 1, lora_bias=lora_bias, target_modules=("x",))
    return base, MiCALinear.create(base, cfg, "x", backend.RNG(seed)), W0.astype(np.float64)


def host(t):
    return np.asarray(backend.to_host(t.data), np.float64)


@pytest.mark.spec("MICA-1")
@SETTINGS
@LAYERS
def test_init_is_the_minor_singular_vectors(n, m, r, seed, lora_bias):
    base, delta, W0 = one_layer(n, m, r, seed, lora_bias)
    U, S, Vh = np.linalg.svd(W0, full_matrices=False)
    k = min(n, m)
    B = host(delta.lora_B.weight)
    signs = np.sign(np.sum(B * U[:, k - r:], axis=0))  # each singular vector up to its sign
    assert_close(B, U[:, k - r:] * signs, 1e-4, label="B = U_minor")
    assert_close(B.T @ B, np.eye(r), 1e-5, label="B^T B")
    assert_close(B.T @ W0, (S[k - r:] * signs)[:, None] * Vh[k - r:], 1e-4, atol=1e-6, label="B^T W0")
    assert not np.any(host(delta.lora_A.weight)) and (not lora_bias or not np.any(host(delta.lora_B.bias)))
    assert np.array_equal(host(base.weight), W0)


@pytest.mark.spec("MICA-1", "MICA-3")
def test_model_at_step0_is_the_base_and_merges():
    model = tiny_llama()
    before = model(IDS).numpy()
    model.apply_mica(rank=4, alpha=8, target_modules="all-linear")
    assert np.array_equal(model(IDS).numpy(), before)
    for _, p in model.net.named_parameters():
        if p.requires_grad:
            p.data = p.data + np.float32(0.05)
    out = model(IDS).numpy()
    model.merge_adapter()
    assert_close(model(IDS), out, 1e-5, label="merged")
    model.unmerge_adapter()
    assert_close(model(IDS), out, 1e-5, label="unmerged")


@pytest.mark.spec("MICA-2")
@SETTINGS
@LAYERS
def test_only_a_trains_with_loras_gradient(n, m, r, seed, lora_bias):
    base, delta, W0 = one_layer(n, m, r, seed, lora_bias)
    delta.requires_grad_(True)
    assert delta.lora_A.weight.requires_grad and not delta.lora_B.weight.requires_grad
    assert lora_bias is False or not delta.lora_B.bias.requires_grad
    from minipeft.adapters.base import AdaptedLayer
    layer = AdaptedLayer(base)
    layer.adapters["default"] = delta
    layer.active = ["default"]
    X, G = probe_backward(layer, n, m)
    assert_close(delta.lora_A.weight.grad, delta.s * host(delta.lora_B.weight).T @ G.T @ X, 1e-5, label="dA")
    assert delta.lora_B.weight.grad is None


@pytest.mark.spec("MICA-2")
def test_training_moves_a_inside_the_minor_subspace():
    model = tiny_llama()
    model.apply_mica(rank=2, alpha=4, target_modules=("q_proj", "v_proj"))
    assert model.parameter_counts()[0] == 4 * 2 * 32  # r in per layer, 4 layers
    layers = [(p, m.adapters["default"]) for p, m in model.net.named_modules() if hasattr(m, "adapters")]
    B0 = {p: host(d.lora_B.weight) for p, d in layers}
    model.train(ROWS, mp.TrainingConfig(learning_rate=1e-2, batch_size=2, max_steps=2, progress=False))
    for p, d in layers:
        B, dW = host(d.lora_B.weight), np.asarray(backend.to_host(d.delta_weight()), np.float64)
        assert np.array_equal(B, B0[p]) and np.any(host(d.lora_A.weight))
        assert_close((np.eye(B.shape[0]) - B @ B.T) @ dW, np.zeros_like(dW), atol=1e-6 * np.abs(dW).max(),
                     label=f"{p} outside span(U_minor)")


@pytest.mark.spec("MICA-4")
def test_saves_b_and_reloads_frozen(tmp_path):
    model = tiny_llama()
    model.apply_mica(rank=2, alpha=4, target_modules=("q_proj",))
    again = reloaded(model, tmp_path, IDS)
    from minipeft.safetensors_io import read_safetensors
    saved, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(k.rsplit(".", 2)[-2] for k in saved) == ["lora_A", "lora_A", "lora_B", "lora_B"]
    assert type(again.peft_configs["default"]) is mp.MiCAConfig
    assert not any(p.requires_grad for n, p in again.net.named_parameters() if "lora_B" in n)
    assert again.parameter_counts()[0] == model.parameter_counts()[0] == 2 * 2 * 32
