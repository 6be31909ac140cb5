"""Checks that tests/adapters/test_loha.py and test_lokr.py share, on the tiny random Llama of test_lora.py.

The reference for each claim is rebuilt in NumPy (float64) from the spec formula: ΔW of LoHa is
s (W1a W1b) ⊙ (W2a W2b) (LOHA-1), ΔW of LoKr is s np.kron(W1, W2) (LOKR-4), never the code's own
delta_weight(). Whole-model claims compare with a plain model whose weights are W0 + that ΔW."""
import copy
import json

import numpy as np

from helpers import assert_close
from minipeft.adapters.base import AdaptedLayer
from minipeft.adapters.loha import LoHaLinear
from minipeft.autograd import Tensor
from minipeft.backend import RNG
from minipeft.safetensors_io import read_safetensors
from one_layer import random_base
from test_lora import D, IDS, layers, make_model, plain_logits, randomize, snapshot  # noqa: F401 (re-exported)


def leaves(delta) -> dict:
    return {n: np.asarray(p.data, np.float64) for n, p in delta.named_parameters()}


def ref_delta(delta) -> np.ndarray:
    """ΔW (out, in) from the spec formula of the delta's method."""
    t = leaves(delta)
    if isinstance(delta, LoHaLinear):
        return delta.s * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    W1, W2 = (t[f"lokr_w{i}"] if f"lokr_w{i}" in t else t[f"lokr_w{i}_a"] @ t[f"lokr_w{i}_b"] for i in (1, 2))
    return delta.s * np.kron(W1, W2)


def updates(model, names, delta_of=ref_delta) -> dict:
    """{param name: Σ ΔW} over adapters `names` (delta_of: a delta's reference ΔW; VeRA passes its own)."""
    up = {}
    for n in names:
        for path, layer in layers(model, n):
            up[path + ".weight"] = up.get(path + ".weight", 0) + delta_of(layer.adapters[n])
    return up


def check_unchanged_at_init(cfg):
    model = make_model()
    before = model(IDS).data
    model.apply_adapter(cfg)
    assert np.array_equal(model(IDS).data, before)  # a zero factor: exactly the base output
    return model


def check_kaiming(delta, zeroed):
    """Zeroed leaves are 0; the others lie in U(±1/√cols) and are not constant."""
    for name, t in leaves(delta).items():
        if name in zeroed:
            assert not t.any(), name
        else:
            assert np.abs(t).max() <= 1 / np.sqrt(t.shape[1]) and (t.size == 1 or t.std() > 0), name


def check_forward_and_disable(cfg_a, cfg_b, active):
    """Active adapters add their ΔW x; disable_adapters gives the base model bit for bit."""
    model = make_model()
    weights = snapshot(model)
    model.apply_adapter(cfg_a, "a")
    model.apply_adapter(cfg_b, "b")
    randomize(model, "a", 1)
    randomize(model, "b", 2)
    model.set_active_adapter(list(active))
    ref = plain_logits(weights, updates(model, list(active)))
    assert_close(model(IDS), ref, 1e-5, label="adapted logits")
    with model.disable_adapters():
        assert np.array_equal(model(IDS).data, plain_logits(weights))
    assert_close(model(IDS), ref, 1e-5, label="re-enabled")


def check_forward_adds(cfg, second, two: bool, perturb=randomize, delta_of=ref_delta, label="logits"):
    """The adapted logits are the plain model's with W0 + ΔW (with a second adapter `second` active too
    when `two`: the ΔW add); disable_adapters gives the base model bit for bit."""
    model = make_model()
    weights = snapshot(model)
    model.apply_adapter(cfg)
    perturb(model, "default")
    if two:
        model.apply_adapter(second, name="b")
        perturb(model, "b", seed=2)
        model.set_active_adapter(["default", "b"])
    up = updates(model, model.active_adapters, delta_of)
    assert_close(model(IDS), plain_logits(weights, up), 1e-5, label=label)
    with model.disable_adapters():
        assert np.array_equal(model(IDS).data, plain_logits(weights))


def check_merge_unmerge(cfg, perturb=randomize, delta_of=ref_delta):
    model = make_model()
    weights = snapshot(model)
    model.apply_adapter(cfg)
    perturb(model, "default")
    unmerged = model(IDS).data
    up = updates(model, ["default"], delta_of)
    model.merge_adapter()
    params = dict(model.net.named_parameters())
    for path, _ in layers(model, "default"):
        assert_close(params[path + ".base_layer.weight"], weights[path + ".weight"] + up[path + ".weight"], 1e-6,
                     label="W0 + ΔW")
    assert_close(model(IDS), unmerged, 1e-5, label="merged forward")
    model.unmerge_adapter()
    for path, _ in layers(model, "default"):
        assert_close(params[path + ".base_layer.weight"], weights[path + ".weight"], 1e-6, label="unmerge")
    model.merge_and_unload()
    assert not any(isinstance(m, AdaptedLayer) for _, m in model.net.named_modules()) and not model.shared_tensors
    assert_close(model(IDS), unmerged, 1e-5, label="merge_and_unload")


def one_layer(fan_in_fan_out, n_in, n_out, cls, cfg, rng):
    """An AdaptedLayer around a random Linear or Conv1D with one active adapter of class cls, random leaves."""
    base, _ = random_base(fan_in_fan_out, rng, n_in, n_out)
    layer = AdaptedLayer(base)
    layer.adapters["default"] = delta = cls.create(base, cfg, "layer", RNG(int(rng.integers(1000))))
    for t in delta.parameters():
        t.data = rng.standard_normal(t.shape).astype(np.float32) * 0.3
    layer.active = ["default"]
    return layer, delta


def check_conv1d(cls, cfg, n_in, n_out, seed=0):
    """gpt2's Conv1D stores W0 as (in, out): the forward is x W0 + x ΔWᵀ, and merge adds ΔWᵀ."""
    rng = np.random.default_rng(seed)
    layer, delta = one_layer(True, n_in, n_out, cls, cfg, rng)
    base = layer.base_layer
    x = rng.standard_normal((3, n_in)).astype(np.float32)
    W0 = np.asarray(base.weight.data, np.float64)
    dW = ref_delta(delta)
    ref = x @ (W0 + dW.T) + base.bias.data
    assert_close(layer(Tensor(x)), ref, 1e-5, label="Conv1D forward")
    layer.merge("default")
    assert_close(base.weight.data, W0 + dW.T, 1e-6, label="Conv1D merged (in, out) weight")
    assert_close(layer(Tensor(x)), ref, 1e-5, label="Conv1D merged forward")
    layer.unmerge("default")
    assert_close(base.weight.data, W0, 1e-6, label="Conv1D unmerged")


def check_trainable(model, expect_count):
    """Only the active adapter's leaves train; their count is the spec's formula."""
    trainable = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default." in n for n in trainable), sorted(trainable)
    assert sum(p.data.size for p in trainable.values()) == expect_count


def check_dropouts(cls, cfg, n_out=32, rescale=True, seed=3):
    """Training mode: one module draw u (term kept when u > q), then one rank draw per output feature,
    mask m = [u_i > p], divided by mean(m) when rescaled (0 when every feature is dropped)."""
    rng = np.random.default_rng(seed)
    layer, delta = one_layer(False, D, n_out, cls, cfg, rng)
    base = layer.base_layer
    x = rng.standard_normal((4, D)).astype(np.float32)
    plain = x @ np.asarray(base.weight.data, np.float64).T + base.bias.data
    term = x @ ref_delta(delta).T
    layer.eval()
    assert_close(layer(Tensor(x)), plain + term, 1e-5, label="eval: no dropout")
    layer.train()
    for _ in range(4):
        twin = copy.deepcopy(delta.rng.gen)
        y = layer(Tensor(x)).data
        if cfg.module_dropout > 0 and twin.uniform(0, 1, ()) <= cfg.module_dropout:
            assert_close(y, plain, 1e-6, label="module dropped")
            continue
        m = (twin.uniform(0, 1, (n_out,)) > cfg.rank_dropout).astype(np.float64) if cfg.rank_dropout > 0 else 1.0
        if rescale and cfg.rank_dropout > 0 and m.mean() > 0:
            m = m / m.mean()
        assert np.all(np.isfinite(y))
        assert_close(y, plain + term * m, 1e-5, label="rank-dropout forward")


def check_save_load(cfg, tmp, peft_type, keys_shapes):
    """Saved keys and shapes are PEFT's; a reload gives the same tensors and logits bit for bit."""
    model = make_model()
    model.apply_adapter(cfg)
    randomize(model, "default", 4)
    model.save_adapters(str(tmp))
    saved, _ = read_safetensors(str(tmp / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == keys_shapes
    conf = json.loads((tmp / "adapter_config.json").read_text())
    assert conf["peft_type"] == peft_type and conf["r"] == cfg.rank and conf["alpha"] == cfg.alpha
    again = make_model()
    again.load_adapters(str(tmp))
    assert type(again.peft_configs["default"]) is type(cfg)
    for k, v in saved.items():
        path, leaf = k.removeprefix("base_model.model.").rsplit(".", 1)
        assert np.array_equal(again.net.get_submodule(path).adapters["default"].__dict__[leaf].data, v)
    assert np.array_equal(again(IDS).data, model(IDS).data)
    return conf


def check_array_api(cls, cfg):
    """Forward (train mode, both dropouts live), backward and merge run on the current backend with
    array-API calls only (the array_api_strict guard) and give NumPy's values."""
    from minipeft import backend
    layer, delta = one_layer(False, 12, 20, cls, cfg, np.random.default_rng(0))
    for t in layer.parameters():
        t.data = backend.asarray(np.asarray(t.data))
    x = np.random.default_rng(1).standard_normal((2, 3, 12)).astype(np.float32)
    layer.train()
    y = layer(Tensor(backend.asarray(x)))
    y.sum().backward()
    assert all(t.grad is not None for t in delta.parameters())
    layer.eval()
    ref = x @ (np.asarray(layer.base_layer.weight.data, np.float64) + ref_delta(delta)).T + \
        np.asarray(layer.base_layer.bias.data)
    assert_close(backend.to_host(layer(Tensor(backend.asarray(x))).data), ref, 1e-5, label="eval forward")
    layer.merge("default")
    assert_close(backend.to_host(layer(Tensor(backend.asarray(x))).data), ref, 1e-5, label="merged forward")
