"""spec/ia3.md (IA3-n) on tiny random Llama models built in-process (test_lora.py's set-up; every
linear layer has a bias, so the output scaling of b shows). Each claim is rebuilt in NumPy: the
reference for a whole model is a plain model with W = diag(l) W0, b = l ⊙ b (output-scaled) or
W = W0 diag(l) (feed-forward)."""
import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from helpers import assert_close
from one_layer import probe_backward, random_base
from minipeft import backend
from minipeft.adapters.base import AdaptedLayer
from minipeft.adapters.ia3 import IA3Config, IA3Linear
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError, MiniPeftError
from minipeft.safetensors_io import read_safetensors
from test_lora import IDS, LINEAR, NAMES, SHAPES, layers, make_model, plain_logits, snapshot

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck),
                    phases=(Phase.explicit, Phase.reuse, Phase.generate))  # each example builds models


@st.composite
def target_sets(draw):
    """(target_modules, feedforward_modules): ff a subset of the targets."""
    tm = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    ff = draw(st.lists(st.sampled_from(tm), max_size=len(tm), unique=True))
    return tuple(tm), tuple(ff)


def perturb(model, name="default", seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, name):
        t = layer.adapters[name].ia3_l
        t.data = (1 + rng.standard_normal(t.shape) * 0.3).astype(np.float32)


def ia3_updates(model, names, weights) -> dict:
    """{param name: added array} of the plain model equal to adapters `names` active together (IA3-3)."""
    eff = {}
    for n in names:
        for path, layer in layers(model, n):
            d = layer.adapters[n]
            W, b = eff.get(path, (weights[path + ".weight"].astype(np.float64), weights[path + ".bias"].astype(np.float64)))
            l = np.asarray(d.ia3_l.data, np.float64)
            eff[path] = (W * l, b) if d.feedforward else (W * l, b * l[:, 0])  # (1, in) cols, or (out, 1) rows
    up = {}
    for path, (W, b) in eff.items():
        up[path + ".weight"], up[path + ".bias"] = W - weights[path + ".weight"], b - weights[path + ".bias"]
    return up


def np_is_feedforward(path, ff):
    return re.fullmatch(ff, path) is not None if isinstance(ff, str) else any(path.endswith(e) for e in ff)


# ---- IA3-1..IA3-3 --------------------------------------------------------------------------------------------------
@pytest.mark.spec("IA3-1", "IA3-2")
@SETTINGS
@given(sets=target_sets())
def test_init_ones_shapes_and_output_unchanged(sets):
    tm, ff = sets
    model = make_model()
    before = model(IDS).data
    model.apply_ia3(IA3Config(target_modules=tm, feedforward_modules=ff))
    assert np.array_equal(model(IDS).data, before)  # l = 1: exactly the base output
    for path, layer in layers(model, "default"):
        out, n_in = SHAPES[path.split(".", 3)[3]]
        d = layer.adapters["default"]
        assert d.feedforward == np_is_feedforward(path, ff)
        assert d.ia3_l.shape == ((1, n_in) if d.feedforward else (out, 1))
        assert np.all(np.asarray(d.ia3_l.data) == 1)


@pytest.mark.spec("IA3-2")
@pytest.mark.parametrize("ff", [r".*\.mlp\.(up|down)_proj", r"model\.layers\.1\..*", "proj", ("mlp.down_proj", "o_proj")])
def test_feedforward_rule(ff):
    """A plain suffix (no dot boundary: "proj" matches every projection) or a full-match regex."""
    model = make_model()
    model.apply_ia3(target_modules="all-linear", feedforward_modules=ff)
    got = {p for p, layer in layers(model, "default") if layer.adapters["default"].feedforward}
    assert got == {p for p in LINEAR if p != "lm_head" and np_is_feedforward(p, ff)}


@pytest.mark.spec("IA3-3")
@SETTINGS
@given(a=target_sets(), b=target_sets(), active=st.sampled_from(["a", "b", "ab"]))
def test_forward_is_scaled_weight_and_adapters_multiply(a, b, active):
    model = make_model()
    weights = snapshot(model)
    for name, (tm, ff) in (("a", a), ("b", b)):
        model.apply_ia3(target_modules=tm, feedforward_modules=ff, name=name)
        perturb(model, name, seed=ord(name))
    names = list(active)
    model.set_active_adapter(names)
    assert_close(model(IDS), plain_logits(weights, ia3_updates(model, names, weights)), 1e-5, label="IA3 logits")
    with model.disable_adapters():
        assert np.array_equal(model(IDS).data, plain_logits(weights))


# ---- IA3-4: merge -----------------------------------------------------------------------------------------------------
@pytest.mark.spec("IA3-4")
@SETTINGS
@given(sets=target_sets(), two=st.booleans())
def test_merge_unmerge(sets, two):
    tm, ff = sets
    model = make_model()
    weights = snapshot(model)
    model.apply_ia3(target_modules=tm, feedforward_modules=ff)
    perturb(model)
    names = ["default"]
    if two:
        model.apply_ia3(target_modules=("v_proj", "down_proj"), feedforward_modules=("down_proj",), name="b")
        perturb(model, "b", seed=2)
        names.append("b")
        model.set_active_adapter(names)
    unmerged = model(IDS).data
    up = ia3_updates(model, names, weights)
    model.merge_adapter()
    params = dict(model.net.named_parameters())
    for key, delta in up.items():
        path, leaf = key.rsplit(".", 1)
        assert_close(params[f"{path}.base_layer.{leaf}"], weights[key] + delta, 1e-6, label=f"merged {key}")
    assert_close(model(IDS), unmerged, 1e-5, label="merged forward")
    model.unmerge_adapter()
    for key in up:
        path, leaf = key.rsplit(".", 1)
        assert_close(params[f"{path}.base_layer.{leaf}"], weights[key], 1e-6, label=f"unmerged {key}")
    model.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for _, m in model.net.named_modules())
    assert_close(model(IDS), unmerged, 1e-5, label="merge_and_unload")


@pytest.mark.spec("IA3-4")
def test_zero_entry_cannot_unmerge():
    model = make_model()
    model.apply_ia3(target_modules=("k_proj",), feedforward_modules=())
    layer = model.net.get_submodule("model.layers.0.self_attn.k_proj")
    layer.adapters["default"].ia3_l.data[3, 0] = 0.0
    model.merge_adapter()
    with pytest.raises(MiniPeftError, match="ia3_l has a zero entry"):
        model.unmerge_adapter()


@pytest.mark.spec("IA3-3", "IA3-4")
@SETTINGS
@given(ff=st.booleans(), fan_in_fan_out=st.booleans(), seed=st.integers(0, 9))
def test_conv1d_layer_forward_and_merge(ff, fan_in_fan_out, seed):
    """GPT-2's Conv1D stores W as (in, out); l keeps PEFT's shape and scales the matching axis."""
    n_in, n_out = 12, 20
    rng = np.random.default_rng(seed)
    base, W0 = random_base(fan_in_fan_out, rng, n_in, n_out)
    b0 = base.bias.data.astype(np.float64)
    layer = AdaptedLayer(base)
    cfg = IA3Config(target_modules=("c_fc",), feedforward_modules=("c_fc",) if ff else ())
    layer.adapters["default"] = IA3Linear.create(base, cfg, "h.0.mlp.c_fc", backend.RNG(0))
    layer.active = ["default"]
    d = layer.adapters["default"]
    d.ia3_l.data = (1 + rng.standard_normal(d.ia3_l.shape) * 0.3).astype(np.float32)
    l = d.ia3_l.data.astype(np.float64)
    W, b = (W0 * l, b0) if ff else (W0 * l, b0 * l[:, 0])
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    assert_close(layer(Tensor(x)), x @ W.T + b, 1e-5, label="Conv1D IA3 forward")
    stored, bias = np.array(base.weight.data, copy=True), np.array(base.bias.data, copy=True)
    layer.merge("default")
    assert_close(base.weight.data, W.T if fan_in_fan_out else W, 1e-6, label="merged stored weight")
    assert_close(base.bias.data, b, 1e-6, label="merged bias")
    layer.unmerge("default")
    assert_close(base.weight.data, stored, 1e-6, label="Conv1D unmerge")
    assert_close(base.bias.data, bias, 1e-6, label="Conv1D unmerge bias")


# ---- IA3-5: gradients -------------------------------------------------------------------------------------------------
@pytest.mark.spec("IA3-5")
@SETTINGS
@given(sets=target_sets())
def test_gradients_reach_only_l(sets):
    tm, ff = sets
    model = make_model()
    model.apply_ia3(target_modules=tm, feedforward_modules=ff)
    model.apply_ia3(target_modules=("q_proj",), feedforward_modules=(), name="other")  # inactive: frozen
    perturb(model)
    adapted = [p for p, _ in layers(model, "default")]
    assert {n for n, p in model.net.named_parameters() if p.requires_grad} == {f"{p}.adapters.default.ia3_l"
                                                                                for p in adapted}
    for path in adapted:
        layer = model.net.get_submodule(path)
        out, n_in = SHAPES[path.split(".", 3)[3]]
        X, G = probe_backward(layer, n_in, out)
        d = layer.adapters["default"]
        W0, b0 = (np.asarray(t.data, np.float64) for t in (layer.base_layer.weight, layer.base_layer.bias))
        if d.feedforward:  # h = W0 (l ⊙ x) + b: dl_i = Σ_rows x_i (G W0)_i
            ref = (X * (G @ W0)).sum(0)[None, :]
        else:  # h = l ⊙ (W0 x + b): dl_o = Σ_rows G_o (W0 x + b)_o
            ref = (G * (X @ W0.T + b0)).sum(0)[:, None]
        assert_close(d.ia3_l.grad, ref, 1e-5, label=f"dl {path}")
        assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None


# ---- IA3-6: serialization ---------------------------------------------------------------------------------------------
@pytest.mark.spec("IA3-6")
@SETTINGS
@given(sets=target_sets())
def test_save_load_round_trip(tmp_path_factory, sets):
    tm, ff = sets
    model = make_model()
    model.apply_ia3(target_modules=tm, feedforward_modules=ff)
    perturb(model)
    folder = tmp_path_factory.mktemp("ia3")
    model.save_adapters(str(folder))
    tensors, meta = read_safetensors(str(folder / "adapter_model.safetensors"))
    assert meta == {"format": "pt"}
    assert set(tensors) == {f"base_model.model.{p}.ia3_l" for p, _ in layers(model, "default")}
    for p, layer in layers(model, "default"):
        assert np.array_equal(tensors[f"base_model.model.{p}.ia3_l"], layer.adapters["default"].ia3_l.data)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and sorted(cfg["feedforward_modules"]) == sorted(ff)
    assert sorted(cfg["target_modules"]) == sorted(tm) and cfg["fan_in_fan_out"] is False
    again = make_model()
    again.load_adapters(str(folder))
    assert type(again.peft_configs["default"]) is IA3Config
    assert np.array_equal(again(IDS).data, model(IDS).data)


# ---- IA3-7: errors ----------------------------------------------------------------------------------------------------
BAD = [
    (dict(target_modules=("k_proj", "v_proj"), feedforward_modules=("down_proj",)), "feedforward_modules.*subset"),
    (dict(feedforward_modules=3), "feedforward_modules"),
    (dict(feedforward_modules=("down_proj", 1)), "feedforward_modules"),
    (dict(layers_to_transform=[0]), "layers_to_transform"),
    (dict(layers_pattern="layers"), "layers_pattern.*has no layers_pattern"),
    (dict(target_modules=5), "target_modules"),
]


@pytest.mark.spec("IA3-7")
@pytest.mark.parametrize("fields,message", BAD, ids=[str(f) for f, _ in BAD])
def test_bad_config_values(fields, message):
    with pytest.raises(ConfigError, match=message):
        IA3Config(**fields)


@pytest.mark.spec("IA3-7")
def test_errors_leave_model_unchanged():
    model = make_model()
    model.apply_ia3(name="a")
    before = sorted(n for n, _ in model.net.named_parameters())
    with pytest.raises(ConfigError, match="linear layers are named"):
        model.apply_ia3(target_modules=("qkv",), feedforward_modules=(), name="c")
    with pytest.raises(ConfigError, match="exists already"):
        model.apply_ia3(name="a")
    with pytest.raises(ConfigError, match="target_modules.*float Linear"):
        IA3Linear.create(object(), IA3Config(), "model.layers.0.mlp.down_proj", backend.RNG(0))
    assert sorted(n for n, _ in model.net.named_parameters()) == before
