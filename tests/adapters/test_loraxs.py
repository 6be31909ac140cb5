"""spec/loraxs.md (LORAXS-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in
NumPy float64 from the spec's formula: B = U_r, A = Σ_r V_rᵀ from W0's SVD, dW = s B R A."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close
from minipeft.adapters.loraxs import LoRAXSConfig
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets
from test_lora import IDS, SHAPES, check_forward_merge_unmerge, layers, make_model, snapshot


def randomize_R(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, "default"):
        R = layer.adapters["default"].lora_R.weight
        R.data = (rng.standard_normal(R.shape) * 0.3).astype(np.float32)


def delta_np(d):
    A, R, B = (np.asarray(t.weight.data, np.float64) for t in (d.lora_A, d.lora_R, d.lora_B))
    return d.s * B @ R @ A


@pytest.mark.spec("LORAXS-1")
@SETTINGS
@given(r=st.integers(1, 8), tm=targets)
def test_the_frozen_projections_are_the_truncated_svd(r, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_loraxs(rank=r, target_modules=tm)
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        W0 = W[path + ".weight"].astype(np.float64)
        S = np.linalg.svd(W0, compute_uv=False)
        A, B = (np.asarray(t.weight.data, np.float64) for t in (d.lora_A, d.lora_B))
        assert_close(B.T @ B, np.eye(r), 1e-5, atol=1e-5, label="B^T B = I")
        assert_close(A @ A.T, np.diag(S[:r] ** 2), 1e-4, atol=1e-5, label="A A^T = Σ_r²")
        assert abs(np.linalg.norm(W0 - B @ A) ** 2 - np.sum(S[r:] ** 2)) <= 1e-4 * np.sum(S ** 2)  # Eckart-Young
        assert not d.lora_A.weight.requires_grad and not d.lora_B.weight.requires_grad


@pytest.mark.spec("LORAXS-2", "LORAXS-4")
@SETTINGS
@given(r=st.integers(1, 6), alpha=st.sampled_from([1, 8, 16]), rslora=st.booleans(), tm=targets)
def test_forward_and_merge_are_W0_plus_s_B_R_A(r, alpha, rslora, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_loraxs(rank=r, alpha=alpha, use_rslora=rslora, target_modules=tm)
    randomize_R(model)
    s = alpha / np.sqrt(r) if rslora else alpha / r
    updates = {}
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        assert d.s == pytest.approx(s)
        updates[path + ".weight"] = delta_np(d)
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("LORAXS-3", "LORAXS-5")
def test_R_starts_at_zero_with_a_gradient_and_only_R_trains():
    model = make_model()
    base = model(IDS).numpy()
    model.apply_loraxs(rank=4, target_modules=("q_proj", "v_proj", "down_proj"))
    assert np.array_equal(model(IDS).numpy(), base)  # R = 0: exactly the base
    model(IDS).sum().backward()
    trained = {n for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith("lora_R.weight") for n in trained)
    grads = [p.grad for n, p in model.net.named_parameters() if p.requires_grad]
    assert all(g is not None and np.abs(g).max() > 0 for g in grads)
    # LORAXS-5: r² per layer, whatever in and out; the paper's 7B figure for r = 16 on a 4096 x 4096 projection
    assert model.parameter_counts()[0] == 16 * len(grads)
    assert LoRAXSConfig(rank=16).trainable_count({"q": (4096, 4096)}, None) == 256


@pytest.mark.spec("LORAXS-3")
def test_init_std_draws_R_from_a_normal():
    model = make_model()
    model.apply_loraxs(rank=8, init_std=0.02, target_modules="all-linear")
    R = np.concatenate([layer.adapters["default"].lora_R.weight.numpy().ravel() for _, layer in layers(model, "default")])
    assert abs(R.mean()) < 0.003 and 0.018 < R.std() < 0.022


@pytest.mark.spec("LORAXS-5")
@pytest.mark.parametrize("kw,match", [({"rank": 0}, "rank"), ({"init_std": -1e-5}, "init_std"),
                                      ({"rank_pattern": {"q_proj": 2}}, "rank_pattern")])
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        LoRAXSConfig(**kw)


@pytest.mark.spec("LORAXS-5")
def test_a_rank_above_the_layer_or_a_4bit_base_is_refused():
    model = make_model()
    smallest = min(min(s) for s in SHAPES.values())
    with pytest.raises(ConfigError, match=r"rank \(for .*\).*must be <= min"):
        model.apply_loraxs(rank=smallest + 1, target_modules="all-linear")
    q = mp.load_model(mp.DEMO_MODEL, quantization=mp.QuantizationConfig(compute_dtype="float32"))
    with pytest.raises(ConfigError, match="4-bit layer; LoRA-XS takes the SVD of W0"):
        q.apply_loraxs()


@pytest.mark.spec("LORAXS-6")
def test_files_hold_A_R_B_and_load_without_an_svd(tmp_path, monkeypatch):
    model = make_model()
    model.apply_loraxs(rank=3, target_modules=("q_proj", "k_proj"))
    randomize_R(model)
    out = model(IDS).numpy()
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MINIPEFT_LORAXS" and cfg["r"] == 3
    tensors, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    for path, layer in layers(model, "default"):
        n, m = layer.base_layer.in_features, layer.base_layer.out_features
        key = f"base_model.model.{path}"
        assert tensors[key + ".lora_A.weight"].shape == (3, n) and tensors[key + ".lora_B.weight"].shape == (m, 3)
        assert tensors[key + ".lora_R.weight"].shape == (3, 3)
    again = make_model()
    monkeypatch.setattr(np.linalg, "svd", lambda *a, **k: pytest.fail("a load computed an SVD"))
    again.load_adapters(str(tmp_path))
    assert_close(again(IDS), out, 1e-6, label="reloaded")


@pytest.mark.spec("LORAXS-2")
def test_training_moves_only_R_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_loraxs(rank=8, target_modules="all-linear")
    frozen = {n: p.numpy().copy() for n, p in model.net.named_parameters() if "lora_A" in n or "lora_B" in n}
    data = [{"prompt": f"next {w} =", "completion": " " + "".join(chr(ord(c) + 1) for c in w)}
            for w in ["abc", "hello", "cat", "dog", "pen", "map", "sky", "tree"]]
    h = model.train(data, mp.TrainingConfig(learning_rate=1e-2, batch_size=4, epochs=8, progress=False))
    assert h["loss"][-1] < h["loss"][0]
    assert all(np.array_equal(p.numpy(), frozen[n]) for n, p in model.net.named_parameters() if n in frozen)
