"""spec/fourierft.md (FOURIERFT-n) on tiny random Llama models built in-process (test_lora.py's set-up)
and on one random Linear / GPT-2 Conv1D layer (one_layer.py).

Each claim is rebuilt in NumPy (float64) from the spec's formula, not from the code under test:
dW[a, b] = s / (out in) sum_k c_k cos(2 pi (a u_k / out + b v_k / in)), the positions (u_k, v_k) from
the forward Fisher-Yates shuffle of NumPy's legacy MT19937 (test_backend.py's fisher_yates_prefix)."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lycoris_checks as lc
from helpers import assert_close
from one_layer import check_on_the_backend, probe_backward, random_base
from minipeft import backend
from minipeft.adapters.base import AdaptedLayer
from minipeft.adapters.fourierft import FourierFTConfig, FourierFTLinear
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from test_backend import fisher_yates_prefix
from test_dora import SETTINGS, targets  # 12 examples, no shrinking; 1-3 target names
from test_lora import IDS, SHAPES, layers, make_model


def positions(out, n_in, n_f, seed):
    """FOURIERFT-1 rebuilt: (u, v) of the first n_f entries of the seeded shuffle of range(out * in)."""
    p = fisher_yates_prefix(out * n_in, n_f, seed)
    return p // n_in, p % n_in


def delta_np(d):
    """FOURIERFT-2 as the cosine sum in float64, (out, in)."""
    out, n_in = d.shape
    p = np.asarray(d.positions[0])
    u, v = p // n_in, p % n_in
    c = np.asarray(d.fourierft_spectrum.data, np.float64)
    a, b = np.arange(out)[:, None, None], np.arange(n_in)[None, :, None]
    return d.s / (out * n_in) * np.sum(c * np.cos(2 * np.pi * (a * u / out + b * v / n_in)), axis=-1)


def perturb(model, name="default", seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, name):
        t = layer.adapters[name].fourierft_spectrum
        t.data = rng.standard_normal(t.shape).astype(np.float32)


# ---- FOURIERFT-1, FOURIERFT-4 ---------------------------------------------------------------------------------
@pytest.mark.spec("FOURIERFT-1", "FOURIERFT-4")
@SETTINGS
@given(n_f=st.integers(1, 512), tm=targets, seed=st.integers(0, 2**64 - 1), init=st.booleans())
def test_positions_are_the_seeded_shuffle_and_init(n_f, tm, seed, init):
    model = make_model()
    before = model(IDS).data
    model.apply_fourierft(FourierFTConfig(n_frequency=n_f, target_modules=tm, random_loc_seed=seed, init_weights=init))
    by_shape = {}
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        out, n_in = SHAPES[path.split(".", 3)[3]]
        u, v = positions(out, n_in, n_f, seed)
        p = np.asarray(d.positions[0])
        assert np.array_equal(p // n_in, u) and np.array_equal(p % n_in, v) and len(set(p.tolist())) == n_f
        assert np.array_equal(by_shape.setdefault((out, n_in), p), p)  # one shape, one seed: one set of positions
        c = np.asarray(d.fourierft_spectrum.data)
        assert c.dtype == np.float32 and c.shape == (n_f,)
        if init:
            assert not c.any()
        elif n_f >= 64:  # N(0, 1): mean and spread within 5 standard errors
            assert abs(c.mean()) < 5 / np.sqrt(n_f) and abs(c.std() - 1) < 5 / np.sqrt(2 * n_f)
    if init:
        assert np.array_equal(model(IDS).data, before)
    else:
        assert not np.allclose(model(IDS).data, before)


# ---- FOURIERFT-2, FOURIERFT-3, FOURIERFT-5 ----------------------------------------------------------------------
@pytest.mark.spec("FOURIERFT-2", "FOURIERFT-3")
@SETTINGS
@given(n_f=st.integers(1, 512), tm=targets, s=st.floats(0.1, 300), bias=st.booleans(), two=st.booleans())
def test_forward_is_effective_weight_and_adapters_add(n_f, tm, s, bias, two):
    lc.check_forward_adds(FourierFTConfig(n_frequency=n_f, scaling=s, target_modules=tm, bias="all" if bias else "none"),
                          FourierFTConfig(n_frequency=7, target_modules=("q_proj", "down_proj"), random_loc_seed=5),
                          two, perturb, delta_np, "FourierFT logits")


@pytest.mark.spec("FOURIERFT-5")
@SETTINGS
@given(n_f=st.integers(1, 512), tm=targets)
def test_merge_unmerge(n_f, tm):
    lc.check_merge_unmerge(FourierFTConfig(n_frequency=n_f, scaling=3.0, target_modules=tm), perturb, delta_np)


# ---- FOURIERFT-6 --------------------------------------------------------------------------------------------------
@pytest.mark.spec("FOURIERFT-2", "FOURIERFT-3", "FOURIERFT-5", "FOURIERFT-6")
@SETTINGS
@given(n_f=st.integers(1, 240), fan_in_fan_out=st.booleans(), seed=st.integers(0, 9))
def test_one_layer_conv1d_forward_merge_and_gradients(n_f, fan_in_fan_out, seed):
    n_in, n_out = 12, 20
    rng = np.random.default_rng(seed)
    base, W0 = random_base(fan_in_fan_out, rng, n_in, n_out)
    base.requires_grad_(False)
    layer = AdaptedLayer(base)
    layer.adapters["default"] = d = FourierFTLinear.create(base, FourierFTConfig(n_frequency=n_f, scaling=7.0),
                                                           "c_attn", backend.RNG(0))
    layer.active = ["default"]
    dW = delta_np(d)
    X, G = probe_backward(layer, n_in, n_out)
    # dL/dc_k = s Re(IDFT2(X^T G as (out, in)))[u_k, v_k], the cosine sum at the positions
    Gw = G.T.astype(np.float64) @ X  # (out, in): dL/d(dW)
    p = np.asarray(d.positions[0])
    u, v = p // n_in, p % n_in
    a, b = np.arange(n_out)[:, None, None], np.arange(n_in)[None, :, None]
    ref = d.s / (n_out * n_in) * np.sum(Gw[..., None] * np.cos(2 * np.pi * (a * u / n_out + b * v / n_in)), axis=(0, 1))
    assert_close(d.fourierft_spectrum.grad, ref, 1e-5, label="dc")
    assert base.weight.grad is None
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    want = x @ (W0 + dW).T + base.bias.data
    assert_close(layer(Tensor(x)), want, 1e-5, label="FourierFT forward")
    layer.merge("default")
    assert_close(base.weight.data, (W0 + dW).T if fan_in_fan_out else W0 + dW, 1e-6, label="merged stored weight")
    layer.unmerge("default")
    assert_close(base.weight.data, W0.T if fan_in_fan_out else W0, 1e-6, label="unmerged")


def check_trainable_count_with_pattern(config_class, n_f, tm, pattern):
    """n_f numbers per layer, n_frequency_pattern's where it matches (FOURIERFT-6; WAVEFT-7 shares it)."""
    model = make_model()
    cfg = config_class(n_frequency=n_f, target_modules=tm, n_frequency_pattern={r"layers\.1\..*": pattern})
    model.apply_adapter(cfg)
    want = sum(pattern if ".layers.1." in p else n_f for p, _ in layers(model, "default"))
    lc.check_trainable(model, want)
    assert cfg.trainable_count({p: None for p, _ in layers(model, "default")}, model.config) == want


@pytest.mark.spec("FOURIERFT-6")
@SETTINGS
@given(n_f=st.integers(1, 512), tm=targets, pattern=st.integers(1, 300))
def test_trainable_count_with_pattern(n_f, tm, pattern):
    check_trainable_count_with_pattern(FourierFTConfig, n_f, tm, pattern)


@pytest.mark.spec("FOURIERFT-2", "FOURIERFT-3", "FOURIERFT-6")
def test_array_api_only(any_backend):
    check_on_the_backend(lambda base: FourierFTLinear.create(base, FourierFTConfig(n_frequency=50), "q", backend.RNG(0)), delta_np,
                         "fourierft_spectrum")


# ---- FOURIERFT-7 --------------------------------------------------------------------------------------------------
@pytest.mark.spec("FOURIERFT-7")
def test_save_load_keys_and_config(tmp_path):
    model = make_model()
    cfg = FourierFTConfig(n_frequency=40, scaling=12.5, random_loc_seed=9, target_modules=("q_proj", "up_proj"),
                          n_frequency_pattern={"up_proj": 80})
    model.apply_fourierft(cfg)
    perturb(model)
    model.save_adapters(str(tmp_path))
    saved, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    want = {f"base_model.model.model.layers.{i}.{m}.fourierft_spectrum": (n,)
            for i in range(2) for m, n in (("self_attn.q_proj", 40), ("mlp.up_proj", 80))}
    assert {k: tuple(v.shape) for k, v in saved.items()} == want
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "FOURIERFT" and conf["n_frequency"] == 40 and conf["scaling"] == 12.5
    assert conf["random_loc_seed"] == 9 and conf["n_frequency_pattern"] == {"up_proj": 80}
    assert conf["init_weights"] is False and conf["bias"] == "none"
    again = make_model(seed=0)
    again.load_adapters(str(tmp_path))
    assert again.peft_configs["default"] == cfg
    assert np.array_equal(again(IDS).data, model(IDS).data)


# ---- FOURIERFT-8 --------------------------------------------------------------------------------------------------
@pytest.mark.spec("FOURIERFT-8")
@pytest.mark.parametrize("kw, field", [
    (dict(n_frequency=0), "n_frequency"), (dict(n_frequency=2.5), "n_frequency"), (dict(n_frequency=True), "n_frequency"),
    (dict(n_frequency_pattern={"q_proj": 0}), "n_frequency_pattern"), (dict(random_loc_seed=-1), "random_loc_seed"),
    (dict(random_loc_seed=2**64), "random_loc_seed"), (dict(bias="lora_only"), "bias"),
    (dict(layers_pattern="layers"), "layers_pattern")])
def test_config_errors(kw, field):
    with pytest.raises(ConfigError, match=field):
        FourierFTConfig(**kw)


@pytest.mark.spec("FOURIERFT-8")
def test_n_frequency_above_in_times_out_names_the_layer():
    model = make_model()
    with pytest.raises(ConfigError, match=r"n_frequency=513.*in \* out = 512 of model\.layers\.0\.self_attn\.v_proj"):
        model.apply_fourierft(n_frequency=513, target_modules=("v_proj",))
    model.apply_fourierft(n_frequency=512, target_modules=("v_proj",))  # every entry of the spectrum: allowed
