"""spec/vera.md (VERA-n) on tiny random Llama models built in-process (test_lora.py's set-up) and on
one random Linear / GPT-2 Conv1D layer (one_layer.py).

Each claim is rebuilt in NumPy (float64) from the spec's formula: dW = diag(λ_b) B_s diag(λ_d) A_s
with A_s = A[:, :in], B_s = B[:out, :], and A, B redrawn here from NumPy's PCG64 with the key."""
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close
from one_layer import check_dropout_forward, probe_backward, random_base
from minipeft import backend
from minipeft.adapters.base import AdaptedLayer
from minipeft.adapters.vera import VeRAConfig, VeRALinear
from minipeft.errors import CheckpointError, ConfigError
from minipeft.autograd import Tensor
from minipeft.safetensors_io import read_safetensors, write_safetensors
from lycoris_checks import check_merge_unmerge, updates
from test_dora import SETTINGS, targets  # 12 examples, no shrinking; 1-3 target names
from test_lora import IDS, SHAPES, layers, make_model, plain_logits, snapshot



def perturb(model, name="default", seed=1):
    """Random λ_b, λ_d (std 0.5), so that ΔW != 0."""
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, name):
        d = layer.adapters[name]
        for t in (d.vera_lambda_b, d.vera_lambda_d):
            t.data = (rng.standard_normal(t.shape) * 0.5).astype(np.float32)


def projections(key, r, max_in, max_out):
    """VERA-1 rebuilt: A then B, U(±√(6/fan_in)) from PCG64(key), float32."""
    g = np.random.default_rng(key)
    A = g.uniform(-math.sqrt(6 / max_in), math.sqrt(6 / max_in), (r, max_in)).astype(np.float32)
    B = g.uniform(-math.sqrt(6 / r), math.sqrt(6 / r), (max_out, r)).astype(np.float32)
    return A, B


def delta_np(d):
    """diag(λ_b) B_s diag(λ_d) A_s in float64, (out, in)."""
    A, B = (np.asarray(t.data, np.float64) for t in d.projections)
    lb, ld = (np.asarray(t.data, np.float64) for t in (d.vera_lambda_b, d.vera_lambda_d))
    return lb[:, None] * B[:d.m, :] @ (ld[:, None] * A[:, :d.n])


def dims(tm):
    """(max_in, max_out) over the targeted layer shapes."""
    shapes = [s for n, s in SHAPES.items() if n.split(".")[-1] in tm]
    return max(s[1] for s in shapes), max(s[0] for s in shapes)


# ---- VERA-1, VERA-4 -------------------------------------------------------------------------------------------
@pytest.mark.spec("VERA-1", "VERA-4")
@SETTINGS
@given(r=st.integers(1, 40), tm=targets, key=st.integers(0, 2**31), d0=st.floats(-1, 1))
def test_init_projections_shared_and_output_unchanged(r, tm, key, d0):
    model = make_model()
    before = model(IDS).data
    model.apply_vera(VeRAConfig(rank=r, target_modules=tm, projection_prng_key=key, d_initial=d0))
    assert np.array_equal(model(IDS).data, before)  # λ_b = 0
    shared = model.shared_tensors["default"]
    A_ref, B_ref = projections(key, r, *dims(tm))
    assert np.array_equal(shared["vera_A"].data, A_ref) and np.array_equal(shared["vera_B"].data, B_ref)
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        assert d.projections[0] is shared["vera_A"] and d.projections[1] is shared["vera_B"]  # one object
        assert np.array_equal(d.vera_lambda_b.data, np.zeros(SHAPES[path.split(".", 3)[3]][0], np.float32))
        assert np.array_equal(d.vera_lambda_d.data, np.full(r, d0, np.float32))
    model.apply_vera(VeRAConfig(rank=r, target_modules=tm, projection_prng_key=key), name="other")
    assert model.shared_tensors["other"]["vera_A"] is not shared["vera_A"]  # each adapter its own pair
    assert np.array_equal(model.shared_tensors["other"]["vera_A"].data, A_ref)  # same key, same draws


# ---- VERA-2, VERA-3 -------------------------------------------------------------------------------------------
@pytest.mark.spec("VERA-2", "VERA-3")
@SETTINGS
@given(r=st.integers(1, 40), tm=targets, bias=st.booleans(), two=st.booleans())
def test_forward_is_effective_weight_and_adapters_add(r, tm, bias, two):
    model = make_model()
    weights = snapshot(model)
    model.apply_vera(rank=r, target_modules=tm, bias="all" if bias else "none")
    perturb(model)
    if two:
        model.apply_vera(rank=3, target_modules=("q_proj", "down_proj"), name="b", projection_prng_key=5)
        perturb(model, "b", seed=2)
        model.set_active_adapter(["default", "b"])
    up = updates(model, model.active_adapters, delta_np)
    assert_close(model(IDS), plain_logits(weights, up), 1e-5, label="VeRA logits")
    with model.disable_adapters():
        assert np.array_equal(model(IDS).data, plain_logits(weights))


@pytest.mark.spec("VERA-2")
@SETTINGS
@given(p=st.floats(0.05, 0.9), r=st.integers(1, 12))
def test_dropout_forward_one_layer(p, r):
    """Train mode: h = W0 x + b + λ_b ⊙ (B_s (λ_d ⊙ (A_s (x ⊙ mask))))."""
    model = make_model()
    model.apply_vera(rank=r, dropout=p, target_modules=("up_proj", "k_proj"))
    perturb(model)
    check_dropout_forward(model, p, delta_np, "VeRA dropout forward")


@pytest.mark.spec("VERA-3")
@SETTINGS
@given(r=st.integers(1, 40), tm=targets)
def test_merge_unmerge(r, tm):
    check_merge_unmerge(VeRAConfig(rank=r, target_modules=tm), perturb, delta_np)


@pytest.mark.spec("VERA-2", "VERA-3", "VERA-5")
@SETTINGS
@given(r=st.integers(1, 12), fan_in_fan_out=st.booleans(), seed=st.integers(0, 9))
def test_one_layer_conv1d_forward_merge_and_gradients(r, fan_in_fan_out, seed):
    """A, B cover a larger layer (max_in 30, max_out 40): this layer uses the slices A[:, :12], B[:20]."""
    n_in, n_out = 12, 20
    rng = np.random.default_rng(seed)
    base, W0 = random_base(fan_in_fan_out, rng, n_in, n_out)
    big, _ = random_base(False, rng, 30, 40)
    base.requires_grad_(False)  # frozen, as in a model
    deltas, shared = VeRALinear.create_all({"c_attn": base, "big": big}, VeRAConfig(rank=r), backend.RNG(0))
    layer = AdaptedLayer(base)
    layer.adapters["default"] = d = deltas["c_attn"]
    layer.active = ["default"]
    assert shared["vera_A"].shape == (r, 30) and shared["vera_B"].shape == (40, r)
    d.vera_lambda_b.data = (rng.standard_normal(n_out) * 0.5).astype(np.float32)
    d.vera_lambda_d.data = (rng.standard_normal(r) * 0.5).astype(np.float32)
    dW = delta_np(d)
    A, B = (np.asarray(t.data, np.float64) for t in shared.values())
    assert_close(dW, np.diag(d.vera_lambda_b.data) @ B[:n_out] @ np.diag(d.vera_lambda_d.data) @ A[:, :n_in], 1e-6,
                 label="dW slices")
    # VERA-5: u = A_s x, z = B_s (λ_d u); dλ_b = Σ G z, dλ_d = Σ u (B_sᵀ (λ_b G))
    X, G = probe_backward(layer, n_in, n_out)
    u = X @ A[:, :n_in].T
    z = (u * d.vera_lambda_d.data) @ B[:n_out].T
    assert_close(d.vera_lambda_b.grad, (G * z).sum(0), 1e-5, label="dλ_b")
    assert_close(d.vera_lambda_d.grad, (u * ((G * d.vera_lambda_b.data) @ B[:n_out])).sum(0), 1e-5, label="dλ_d")
    assert all(t.grad is None for t in shared.values()) and base.weight.grad is None
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    ref = x @ (W0 + dW).T + base.bias.data
    assert_close(layer(Tensor(x)), ref, 1e-5, label="Conv1D VeRA forward")
    stored = np.array(base.weight.data, copy=True)
    layer.merge("default")
    assert_close(base.weight.data, (W0 + dW).T if fan_in_fan_out else W0 + dW, 1e-6, label="merged stored weight")
    assert_close(layer(Tensor(x)), ref, 1e-5, label="merged forward")
    layer.unmerge("default")
    assert_close(base.weight.data, stored, 1e-6, label="unmerge")


# ---- VERA-5: trainable -----------------------------------------------------------------------------------------
@pytest.mark.spec("VERA-5")
@SETTINGS
@given(r=st.integers(1, 40), tm=targets, bias=st.sampled_from(["none", "vera_only"]))
def test_only_lambdas_train(r, tm, bias):
    model = make_model()
    model.apply_vera(rank=r, target_modules=tm, bias=bias)
    model.apply_vera(rank=2, target_modules=("k_proj",), name="other")  # inactive: frozen
    adapted = [p for p, _ in layers(model, "default")]
    expect = {f"{p}.adapters.default.{leaf}" for p in adapted for leaf in ("vera_lambda_b", "vera_lambda_d")}
    biased = [p for p, m in model.net.named_modules() if isinstance(m, AdaptedLayer)] if bias == "vera_only" else []
    expect |= {f"{p}.base_layer.bias" for p in biased}  # vera_only: every adapted layer's bias (any adapter)
    assert {n for n, p in model.net.named_parameters() if p.requires_grad} == expect
    out = {p: SHAPES[p.split(".", 3)[3]][0] for p in adapted + biased}
    assert model.parameter_counts()[0] == sum(r + out[p] for p in adapted) + sum(out[p] for p in biased)
    assert not any(t.requires_grad for t in model.shared_tensors["default"].values())


# ---- VERA-6: serialization -------------------------------------------------------------------------------------
@pytest.mark.spec("VERA-6", "VERA-4")
@SETTINGS
@given(r=st.integers(1, 40), tm=targets, key=st.integers(0, 99))
def test_save_load_round_trip(tmp_path_factory, r, tm, key):
    model = make_model()
    model.apply_vera(rank=r, target_modules=tm, projection_prng_key=key)
    perturb(model)
    folder = tmp_path_factory.mktemp("vera")
    model.save_adapters(str(folder))
    tensors, meta = read_safetensors(str(folder / "adapter_model.safetensors"))
    keys = {f"base_model.model.{p}.{leaf}" for p, _ in layers(model, "default")
            for leaf in ("vera_lambda_b", "vera_lambda_d")} | {"base_model.vera_A", "base_model.vera_B"}
    assert set(tensors) == keys and meta == {"format": "pt"}
    max_in, max_out = dims(tm)
    assert tensors["base_model.vera_A"].shape == (r, max_in) and tensors["base_model.vera_B"].shape == (max_out, r)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["r"] == r and cfg["projection_prng_key"] == key
    assert cfg["save_projection"] is True and cfg["d_initial"] == 0.1 and cfg["vera_dropout"] == 0.0
    cfg["projection_prng_key"] = key + 1  # the file's A and B win over the seed
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    again = make_model()
    again.load_adapters(str(folder))
    assert type(again.peft_configs["default"]) is VeRAConfig
    assert np.array_equal(again(IDS).data, model(IDS).data)
    A = again.shared_tensors["default"]["vera_A"]
    assert all(layer.adapters["default"].projections[0] is A for _, layer in layers(again, "default"))


# ---- VERA-7: errors --------------------------------------------------------------------------------------------
BAD = [dict(rank=0), dict(rank=-3), dict(rank=2.5), dict(d_initial="0.1"), dict(d_initial=float("nan")),
       dict(dropout=1.0), dict(projection_prng_key=-1), dict(bias="lora_only"), dict(save_projection="yes"),
       dict(shared_across_layers=False), dict(layers_pattern="layers")]


@pytest.mark.spec("VERA-7")
@pytest.mark.parametrize("fields", BAD, ids=[str(f) for f in BAD])
def test_bad_config_values(fields):
    with pytest.raises(ConfigError, match=list(fields)[0]):
        VeRAConfig(**{"target_modules": ("q_proj",), **fields})


@pytest.mark.spec("VERA-7")
def test_unsaved_projections_are_refused(tmp_path):
    model = make_model()
    model.apply_vera(rank=4, target_modules=("q_proj",), save_projection=False)
    model.save_adapters(str(tmp_path / "a"))
    tensors, _ = read_safetensors(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert not any(k.startswith("base_model.vera_") for k in tensors)
    with pytest.raises(CheckpointError, match="save_projection"):
        make_model().load_adapters(str(tmp_path / "a"))
    model = make_model()
    model.apply_vera(rank=4, target_modules=("q_proj",))
    model.save_adapters(str(tmp_path / "b"))
    path = tmp_path / "b" / "adapter_model.safetensors"
    tensors, meta = read_safetensors(str(path))
    del tensors["base_model.vera_B"]
    write_safetensors(str(path), tensors, meta)
    again = make_model()
    with pytest.raises(CheckpointError, match="base_model.vera_B"):
        again.load_adapters(str(tmp_path / "b"))
    assert not again.peft_configs and not again.shared_tensors
