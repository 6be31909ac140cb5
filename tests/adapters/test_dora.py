"""spec/dora.md (DORA-n) on tiny random Llama models built in-process (test_lora.py's set-up).

Each claim is rebuilt in NumPy (float64) from the spec's formula: the reference for a whole model
is a plain model whose weights are g ⊙_row (W0 + s B A), with n = ‖W0 + s B A‖_row and g = m / n."""
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from helpers import assert_close
from one_layer import probe_backward, random_base
from minipeft import backend
from minipeft.adapters.base import AdaptedLayer
from minipeft.adapters.dora import DoRAConfig, DoRALinear
from minipeft.adapters.lora import LoRAConfig
from minipeft.autograd import Tensor
from minipeft.errors import CheckpointError, ConfigError
from minipeft.safetensors_io import read_safetensors
from test_lora import D, IDS, NAMES, SHAPES, layers, make_model, plain_logits, snapshot

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck),
                    phases=(Phase.explicit, Phase.reuse, Phase.generate))  # each example builds models
targets = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True).map(tuple)


def perturb(model, name="default", seed=1):
    """Random A, B (std 0.2) and m = ‖W0‖_row · U(0.5, 1.5), so that B != 0 and g != 1."""
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, name):
        d = layer.adapters[name]
        for t in (d.lora_A.weight, d.lora_B.weight):
            t.data = (rng.standard_normal(t.shape) * 0.2).astype(np.float32)
        d.lora_magnitude_vector.data = (d.lora_magnitude_vector.data * rng.uniform(0.5, 1.5, d.lora_magnitude_vector.shape)
                                        ).astype(np.float32)


def parts(delta, W0):
    """(A, B, s, m, V, n) in float64 from the spec's symbols; W0 is (out, in)."""
    A, B = (np.asarray(t.data, np.float64) for t in (delta.lora_A.weight, delta.lora_B.weight))
    m = np.asarray(delta.lora_magnitude_vector.data, np.float64)
    V = np.asarray(W0, np.float64) + delta.s * B @ A
    return A, B, delta.s, m, V, np.linalg.norm(V, axis=1)


def dora_updates(model, name, weights) -> dict:
    """{param name: g ⊙_row (W0 + s B A) − W0} for every layer of adapter `name` (DORA-2, DORA-5)."""
    up = {}
    for path, layer in layers(model, name):
        W0 = weights[path + ".weight"]
        _, _, _, m, V, n = parts(layer.adapters[name], W0)
        up[path + ".weight"] = (m / n)[:, None] * V - W0
    return up


# ---- DORA-1, DORA-2 ---------------------------------------------------------------------------------------------
@pytest.mark.spec("DORA-1")
@SETTINGS
@given(r=st.integers(1, 6), alpha=st.floats(0.5, 32), tm=targets, init=st.sampled_from(["default", "gaussian"]))
def test_init_magnitude_is_row_norm_and_output_unchanged(r, alpha, tm, init):
    model = make_model()
    weights = snapshot(model)
    before = model(IDS).data
    model.apply_dora(DoRAConfig(rank=r, alpha=alpha, target_modules=tm, init=init))
    assert np.array_equal(model(IDS).data, before)  # g = 1 and B = 0: exactly the base output
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        assert d.lora_magnitude_vector.shape == (SHAPES[path.split(".", 3)[3]][0],)
        assert_close(d.lora_magnitude_vector, np.linalg.norm(weights[path + ".weight"].astype(np.float64), axis=1),
                     1e-6, label="m = ||W0||_row")


@pytest.mark.spec("DORA-2")
@SETTINGS
@given(r=st.integers(1, 6), alpha=st.floats(0.5, 32), tm=targets, rslora=st.booleans(), bias=st.booleans())
def test_forward_is_magnitude_times_direction(r, alpha, tm, rslora, bias):
    """Eval mode: the adapted model computes the plain model with W = g ⊙_row (W0 + s B A), b unscaled."""
    model = make_model()
    weights = snapshot(model)
    model.apply_dora(rank=r, alpha=alpha, target_modules=tm, use_rslora=rslora, bias="all" if bias else "none")
    perturb(model)
    assert_close(model(IDS), plain_logits(weights, dora_updates(model, "default", weights)), 1e-5, label="DoRA logits")
    with model.disable_adapters():
        assert np.array_equal(model(IDS).data, plain_logits(weights))


@pytest.mark.spec("DORA-2")
@SETTINGS
@given(p=st.floats(0.05, 0.9), r=st.integers(1, 6))
def test_dropout_forward_one_layer(p, r):
    """Train mode, p > 0: h = W0 x + b + (g − 1) ⊙ (W0 d) + g ⊙ (s B A d), d = x ⊙ mask."""
    model = make_model()
    model.apply_dora(rank=r, alpha=4, dropout=p, target_modules=("up_proj",))
    perturb(model)
    layer = model.net.get_submodule("model.layers.0.mlp.up_proj")
    layer.train()
    d = layer.adapters["default"]
    x = np.random.default_rng(3).standard_normal((5, D)).astype(np.float32)
    mask = np.asarray(backend.RNG(0).keep_mask((5, D), p))  # the same draws as the adapter's rng below
    d.rng = backend.RNG(0)
    y = layer(Tensor(x)).data
    W0, b = (np.asarray(t.data, np.float64) for t in (layer.base_layer.weight, layer.base_layer.bias))
    A, B, s, m, _, n = parts(d, W0)
    g, xd = m / n, x * mask
    ref = x @ W0.T + b + (g - 1) * (xd @ W0.T) + g * (s * xd @ A.T @ B.T)
    assert_close(y, ref, 1e-5, label="DoRA dropout forward")


# ---- DORA-3, DORA-4: gradients --------------------------------------------------------------------------------------
@pytest.mark.spec("DORA-3", "DORA-4")
@SETTINGS
@given(r=st.integers(1, 6), learn_m=st.booleans(), bias=st.booleans())
def test_gradients_with_detached_norm(r, learn_m, bias):
    model = make_model()
    model.apply_dora(rank=r, alpha=8, target_modules=("q_proj", "v_proj"), decompose_magnitude=learn_m)
    model.apply_dora(rank=2, alpha=8, target_modules=("k_proj",), name="other")  # inactive: frozen
    perturb(model)
    adapted = [p for p, _ in layers(model, "default")]
    leaves = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if learn_m else ())
    expect = {f"{p}.adapters.default.{leaf}" for p in adapted for leaf in leaves}
    assert {n for n, p in model.net.named_parameters() if p.requires_grad} == expect

    # one layer, L = Σ G ⊙ h with n a constant: dm = Σ_rows G ⊙ (V x) / n, dA = s Bᵀ (g G)ᵀ X, dB = s (g G)ᵀ X Aᵀ
    layer = model.net.get_submodule(adapted[0])
    X, G = probe_backward(layer, D, D)
    delta = layer.adapters["default"]
    A, B, s, m, V, n = parts(delta, layer.base_layer.weight.data)
    gG = G * (m / n)
    assert_close(delta.lora_A.weight.grad, s * B.T @ gG.T @ X, 1e-5, label="dA")
    assert_close(delta.lora_B.weight.grad, s * gG.T @ X @ A.T, 1e-5, label="dB")
    if learn_m:
        assert_close(delta.lora_magnitude_vector.grad, (G * (X @ V.T)).sum(0) / n, 1e-5, label="dm")
    else:
        assert delta.lora_magnitude_vector.grad is None
    assert layer.base_layer.weight.grad is None

    # the detached norm is not the full derivative: through n, dA would gain -Σ_o c_o s B_oᵀ (V_o A-part) / n_o
    c = (G * (X @ V.T)).sum(0) * m / n ** 3  # (out,)
    full_dA = s * B.T @ gG.T @ X - s * B.T @ (c[:, None] * V)
    assert not np.allclose(delta.lora_A.weight.grad, full_dA, rtol=1e-3)


# ---- DORA-5: merge ----------------------------------------------------------------------------------------------
@pytest.mark.spec("DORA-5")
@SETTINGS
@given(r=st.integers(1, 6), alpha=st.floats(1, 32), tm=targets, rslora=st.booleans())
def test_merge_unmerge(r, alpha, tm, rslora):
    model = make_model()
    weights = snapshot(model)
    model.apply_dora(rank=r, alpha=alpha, target_modules=tm, use_rslora=rslora)
    perturb(model)
    unmerged = model(IDS).data
    up = dora_updates(model, "default", weights)
    model.merge_adapter()
    params = dict(model.net.named_parameters())
    grow = {}  # unmerge divides by g and subtracts s B A in float32: its error scales with |W0 + s B A|, not |W0|
    for path, layer in layers(model, "default"):
        assert_close(params[path + ".base_layer.weight"], weights[path + ".weight"] + up[path + ".weight"], 1e-6,
                     label="g (W0 + s B A)")
        V = parts(layer.adapters["default"], weights[path + ".weight"])[4]  # W0 + s B A
        grow[path] = max(1.0, float(np.abs(V).max() / np.abs(weights[path + ".weight"]).max()))
        assert np.array_equal(params[path + ".base_layer.bias"].data, weights[path + ".bias"])  # b unchanged
    assert_close(model(IDS), unmerged, 1e-5, label="merged forward")
    model.unmerge_adapter()
    for path, _ in layers(model, "default"):
        assert_close(params[path + ".base_layer.weight"], weights[path + ".weight"], 1e-6 * grow[path], label="unmerge")
    assert_close(model(IDS), unmerged, 1e-5, label="unmerged again")
    model.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for _, m in model.net.named_modules())
    assert_close(model(IDS), unmerged, 1e-5, label="merge_and_unload")


@pytest.mark.spec("DORA-2", "DORA-5")
@SETTINGS
@given(r=st.integers(1, 4), fan_in_fan_out=st.booleans(), seed=st.integers(0, 9))
def test_conv1d_layer_forward_and_merge(r, fan_in_fan_out, seed):
    """GPT-2's Conv1D stores W as (in, out); A, B, m keep their shapes and W^T gets the formula."""
    n_in, n_out = 12, 20
    rng = np.random.default_rng(seed)
    base, W0 = random_base(fan_in_fan_out, rng, n_in, n_out)
    layer = AdaptedLayer(base)
    layer.adapters["default"] = DoRALinear.create(base, DoRAConfig(rank=r, alpha=2 * r), "c_attn", backend.RNG(0))
    layer.active = ["default"]
    d = layer.adapters["default"]
    assert d.lora_A.weight.shape == (r, n_in) and d.lora_magnitude_vector.shape == (n_out,)
    d.lora_B.weight.data = (rng.standard_normal((n_out, r)) * 0.2).astype(np.float32)
    d.lora_magnitude_vector.data = (d.lora_magnitude_vector.data * rng.uniform(0.5, 1.5, n_out)).astype(np.float32)
    _, _, _, m, V, n = parts(d, W0)
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    ref = x @ ((m / n)[:, None] * V).T + base.bias.data
    assert_close(layer(Tensor(x)), ref, 1e-5, label="Conv1D DoRA forward")
    stored = np.array(base.weight.data, copy=True)
    layer.merge("default")
    assert_close(base.weight.data, ((m / n)[:, None] * V).T if fan_in_fan_out else (m / n)[:, None] * V, 1e-6,
                 label="merged stored weight")
    assert_close(layer(Tensor(x)), ref, 1e-5, label="Conv1D merged forward")
    layer.unmerge("default")
    assert_close(base.weight.data, stored, 1e-6, label="Conv1D unmerge")


# ---- DORA-6: serialization ------------------------------------------------------------------------------------------
@pytest.mark.spec("DORA-6")
@SETTINGS
@given(r=st.integers(1, 6), tm=targets, learn_m=st.booleans())
def test_save_load_round_trip(tmp_path_factory, r, tm, learn_m):
    model = make_model()
    model.apply_dora(rank=r, alpha=2 * r, target_modules=tm, decompose_magnitude=learn_m)
    perturb(model)
    folder = tmp_path_factory.mktemp("dora")
    model.save_adapters(str(folder))
    tensors, meta = read_safetensors(str(folder / "adapter_model.safetensors"))
    keys = {f"base_model.model.{p}.{leaf}" for p, _ in layers(model, "default")
            for leaf in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}
    assert set(tensors) == keys and meta == {"format": "pt"}
    for p, layer in layers(model, "default"):
        assert np.array_equal(tensors[f"base_model.model.{p}.lora_magnitude_vector"],
                              layer.adapters["default"].lora_magnitude_vector.data)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True and cfg["r"] == r
    assert ("decompose_magnitude" in cfg) == (not learn_m)
    again = make_model()
    again.load_adapters(str(folder))
    assert type(again.peft_configs["default"]) is DoRAConfig
    assert again.peft_configs["default"].decompose_magnitude == learn_m
    assert np.array_equal(again(IDS).data, model(IDS).data)


@pytest.mark.spec("DORA-6")
def test_use_dora_picks_the_config_class(tmp_path):
    """use_dora absent or false: LoRAConfig (the magnitude key is then unexpected); true: DoRAConfig."""
    model = make_model()
    model.apply_lora(LoRAConfig(rank=2, alpha=4, target_modules=("q_proj",)))
    model.save_adapters(str(tmp_path / "lora"))
    model = make_model()
    model.apply_dora(rank=2, alpha=4, target_modules=("q_proj",))
    model.save_adapters(str(tmp_path / "dora"))
    assert "use_dora" not in json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    plain = make_model()
    plain.load_adapters(str(tmp_path / "lora"))
    assert type(plain.peft_configs["default"]) is LoRAConfig
    path = tmp_path / "dora" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["use_dora"] = False
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="lora_magnitude_vector"):
        make_model().load_adapters(str(tmp_path / "dora"))


# ---- DORA-7: errors -------------------------------------------------------------------------------------------------
BAD = [dict(rank=0), dict(alpha=-1), dict(dropout=1.0), dict(lora_bias=True), dict(decompose_magnitude="yes"),
       dict(init="magic")]


@pytest.mark.spec("DORA-7")
@pytest.mark.parametrize("fields", BAD, ids=[str(f) for f in BAD])
def test_bad_config_values(fields):
    with pytest.raises(ConfigError, match=list(fields)[0]):
        DoRAConfig(**{"target_modules": ("q_proj",), **fields})


@pytest.mark.spec("DORA-7")
def test_errors_leave_model_unchanged():
    model = make_model()
    model.apply_dora(rank=2, alpha=4, target_modules=("q_proj",), name="a")
    model.apply_dora(rank=2, alpha=4, target_modules=("q_proj",), name="b")
    before = sorted(n for n, _ in model.net.named_parameters())
    with pytest.raises(ConfigError, match=r"rank.*min\(in=32, out=16\)"):
        model.apply_dora(rank=17, target_modules=("k_proj",), name="c")
    with pytest.raises(ConfigError, match="plain LoRA"):
        model.merge_adapters({"a": 1.0, "b": 1.0}, "c", "cat")
    assert sorted(n for n, _ in model.net.named_parameters()) == before
    layer = model.net.get_submodule("model.layers.0.self_attn.q_proj")
    with pytest.raises(ConfigError, match="target_modules.*float Linear"):
        DoRALinear.create(object(), DoRAConfig(rank=2), "model.layers.0.mlp.up_proj", backend.RNG(0))
    assert isinstance(layer, AdaptedLayer)
