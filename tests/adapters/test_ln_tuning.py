"""spec/ln_tuning.md (LN_TUNING-n) on tiny random Llama (RMSNorm) and GPT-2 (LayerNorm with bias) models, each claim
rebuilt in NumPy float64 from the norm formulas with the trained copy (g', β'); and (oracle) against PEFT's LN_TUNING."""
import json
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, max_rel_err
from minipeft.adapters.base import AdaptedLayer
from minipeft.adapters.ln_tuning import LNTuningConfig, LNTuningNorm
from minipeft.autograd import Tensor
from minipeft.backend import RNG
from minipeft.errors import ConfigError
from minipeft.model import Model
from minipeft.models.config import config_from_dict
from minipeft.models.io import build
from minipeft.nn.layers import LayerNorm, RMSNorm
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS
from test_lora import IDS, layers, make_model
from test_models import random_weights
from test_peft_oracle import (base, check_both_ways_and_merged, lib, perturbed_peft_model,  # noqa: F401 (fixtures)
                              report_gradients_from_peft, report_init_is_base)

GPT2 = dict(model_type="gpt2", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)


def make_gpt2(seed=0) -> Model:
    """A random tiny GPT-2 (LayerNorm with bias) with test_models.random_weights' tensors."""
    net, weights = build(config_from_dict(dict(GPT2))), random_weights(GPT2, seed)
    for name, p in net.named_parameters():
        p.data = weights[name]
    return Model(net)


def norm_np(x, g, b, eps, kind):
    """LN_TUNING-1 in float64: LayerNorm g (x - mu) / sqrt(var + eps) + b, RMSNorm g x / sqrt(mean(x^2) + eps)."""
    x = x.astype(np.float64)
    if kind is RMSNorm:
        return g * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return g * (x - mu) / np.sqrt(var + eps) + b


def randomize(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, "default"):
        for _, p in layer.adapters["default"].named_parameters():
            p.data = (1 + rng.standard_normal(p.shape) * 0.3).astype(np.float32)


def one_norm(kind, d, seed):
    """An AdaptedLayer around a random norm of width d with an LN tuning copy whose tensors are perturbed."""
    rng = np.random.default_rng(seed)
    norm = kind(d, eps=1e-5)
    for _, p in norm.named_parameters():
        p.data = rng.standard_normal(p.shape).astype(np.float32)
    layer = AdaptedLayer(norm)
    layer.adapters["default"] = delta = LNTuningNorm.create(norm, LNTuningConfig(), "norm", RNG(0))
    layer.active = ["default"]
    for _, p in delta.named_parameters():
        p.data = (p.data + rng.standard_normal(p.shape) * 0.5).astype(np.float32)
    return layer, delta, rng


@pytest.mark.spec("LN_TUNING-1", "LN_TUNING-3")
@SETTINGS
@given(kind=st.sampled_from([RMSNorm, LayerNorm]), d=st.integers(2, 24), rows=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_forward_is_the_norm_with_the_copy_and_merge_swaps_bit_for_bit(kind, d, rows, seed):
    layer, delta, rng = one_norm(kind, d, seed)
    g0 = layer.base_layer.weight.numpy().copy()
    b0 = None if kind is RMSNorm else layer.base_layer.bias.numpy().copy()
    g, b = (np.asarray(delta.ln_tuning_layers.weight.data, np.float64),
            None if kind is RMSNorm else np.asarray(delta.ln_tuning_layers.bias.data, np.float64))
    x = rng.standard_normal((rows, 3, d)).astype(np.float32) * 2
    want = norm_np(x, g, b, 1e-5, kind)
    out = layer(Tensor(x)).numpy()
    assert_close(out, want, rtol=1e-5, atol=1e-5, label="forward")
    layer.merge("default")
    assert np.array_equal(layer.base_layer.weight.numpy(), g.astype(np.float32))  # the copy now sits in the norm
    assert np.array_equal(layer(Tensor(x)).numpy(), out)
    layer.unmerge("default")
    assert np.array_equal(layer.base_layer.weight.numpy(), g0)
    if b0 is not None:
        assert np.array_equal(layer.base_layer.bias.numpy(), b0)
    assert np.array_equal(layer(Tensor(x)).numpy(), out)


@pytest.mark.spec("LN_TUNING-2", "LN_TUNING-4")
@pytest.mark.parametrize("make, per_norm", [(make_model, 32), (make_gpt2, 64)])
def test_init_is_the_base_and_only_the_copies_train(make, per_norm):
    model = make()
    base = model(IDS).numpy()
    model.apply_ln_tuning()
    assert np.array_equal(model(IDS).numpy(), base)  # the copy: exactly the base
    for _, layer in layers(model, "default"):
        for name, p in layer.adapters["default"].ln_tuning_layers.named_parameters():
            assert np.array_equal(p.numpy(), getattr(layer.base_layer, name).numpy())
    randomize(model)
    assert max_rel_err(model(IDS), base) > 1e-3
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(".ln_tuning_layers." in n for n in trained)
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in trained.values())
    assert model.parameter_counts()[0] == 5 * per_norm  # 2 layers x 2 norms + the final norm, d = 32


@pytest.mark.spec("LN_TUNING-5")
def test_default_targets_follow_peft_s_mapping_per_model_type():
    llama = make_model()
    llama.apply_ln_tuning()
    assert llama.peft_configs["default"].target_modules == ("input_layernorm", "post_attention_layernorm", "norm")
    assert [p for p, _ in layers(llama, "default")][-1] == "model.norm"
    gpt2 = make_gpt2()
    gpt2.apply_ln_tuning()
    assert {p.split(".")[-1] for p, _ in layers(gpt2, "default")} == {"ln_1", "ln_2", "ln_f"}
    qwen = Model(build(config_from_dict(dict(make_model().config.__dict__, model_type="qwen2"))))
    qwen.apply_ln_tuning()
    assert [p for p, _ in layers(qwen, "default")] == [f"model.layers.{i}.post_attention_layernorm" for i in (0, 1)]
    assert LNTuningConfig().target_modules is None


@pytest.mark.spec("LN_TUNING-5", "LN_TUNING-6")
@pytest.mark.parametrize("kwargs, match", [(dict(target_modules=("q_proj",)), "matches no LayerNorm or RMSNorm"),
                                           (dict(layers_to_transform=0), "layers_to_transform")])
def test_bad_targets_are_clear_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_model().apply_ln_tuning(**kwargs)


@pytest.mark.spec("LN_TUNING-5")
def test_a_model_type_without_peft_s_default_asks_for_targets():
    bert = Model(build(config_from_dict(dict(model_type="bert", vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=64))))
    with pytest.raises(ConfigError, match="no default target_modules for model_type 'bert'"):
        bert.apply_ln_tuning()
    bert.apply_ln_tuning(target_modules=("LayerNorm",))
    assert len(layers(bert, "default")) == 3  # embeddings, attention output, output


@pytest.mark.spec("LN_TUNING-6")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_gpt2()
    model.apply_ln_tuning(target_modules=("ln_1", "ln_f"))
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LN_TUNING" and cfg["target_modules"] == ["ln_1", "ln_f"]
    assert "layers_to_transform" not in cfg and "fan_in_fan_out" not in cfg
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    paths = ["transformer.h.0.ln_1", "transformer.h.1.ln_1", "transformer.ln_f"]
    assert {k: v.shape for k, v in keys.items()} == {
        f"base_model.model.{p}.ln_tuning_layers.{n}": (32,) for p in paths for n in ("weight", "bias")}
    llama = make_model()
    llama.apply_ln_tuning()
    llama.save_adapters(str(tmp_path / "llama"))
    assert json.loads((tmp_path / "llama" / "adapter_config.json").read_text())["target_modules"] == [
        "input_layernorm", "post_attention_layernorm", "norm"]  # the resolved default, as PEFT saves it


# ---- against PEFT ---------------------------------------------------------------------------------------
CASES = {"llama": ("llama", {}), "gpt2": ("gpt2", {}),  # PEFT's defaults per model type
         "llama-some": ("llama", dict(target_modules=["post_attention_layernorm"], exclude_modules=["layers.1.post_attention_layernorm"]))}


@pytest.mark.oracle
@pytest.mark.spec("LN_TUNING-1", "LN_TUNING-3", "LN_TUNING-4", "LN_TUNING-6")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_on_merge_and_in_count(lib, base, case, tmp_path):
    kind, kw = CASES[case]
    pm = perturbed_peft_model(lib, base, CASES[case], "LNTuningConfig").eval()  # every ln_tuning_layers tensor moved
    with pm.disable_adapter():
        plain = pm(lib[0].tensor(IDS)).logits.detach().numpy()
    assert max_rel_err(pm(lib[0].tensor(IDS)).logits.detach().numpy(), plain) > 1e-3  # the perturbation shows
    trained = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in pm.parameters())  # base + copies, as PEFT's print_trainable_parameters counts
    check_both_ways_and_merged(lib, pm, base(kind), tmp_path, f"LN tuning {case}")
    again = mp.load_model(base(kind))
    again.load_adapters(str(tmp_path / "peft"))
    assert type(again.peft_configs["default"]) is LNTuningConfig and again.parameter_counts() == (trained, total)


@pytest.mark.oracle
@pytest.mark.spec("LN_TUNING-2", "LN_TUNING-4")
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_init_is_the_base_and_one_step_s_gradients_agree(lib, base, kind, tmp_path):
    _, model, _ = report_init_is_base(lib, base(kind), "LNTuningConfig", {}, LNTuningConfig(), f"LN tuning {kind}")
    pm = perturbed_peft_model(lib, base, (kind, {}), "LNTuningConfig").eval()
    assert model.parameter_counts()[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    pattern = re.compile(r"base_model\.model\.(.+)\.ln_tuning_layers\.default\.(weight|bias)$")  # PEFT's names
    report_gradients_from_peft(lib, pm, base(kind), tmp_path, f"LN tuning {kind}",
                               lambda n: "{}.adapters.default.ln_tuning_layers.{}".format(*pattern.match(n).groups()), 1e-4)


@pytest.mark.spec("LN_TUNING-3", "LN_TUNING-5")
def test_the_audit_refuses_it_since_norms_have_no_dW(tmp_path):
    from minipeft.audit.adapter import audit_adapter
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_ln_tuning()
    model.save_adapters(str(tmp_path))
    with pytest.raises(ConfigError, match="LNTuning changes LayerNorm or RMSNorm layers, not weight matrices"):
        audit_adapter(str(tmp_path), mp.DEMO_MODEL)


@pytest.mark.spec("LN_TUNING-4")
def test_model_train_lowers_the_loss_and_moves_every_copy():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_ln_tuning()
    before = {n: p.numpy().copy() for n, p in model.net.named_parameters()}
    data = [{"prompt": f"next {w} =", "completion": " " + "".join(chr(ord(c) + 1) for c in w)}
            for w in ["abc", "hello", "cat", "dog", "pen", "map", "sky", "tree"]]
    h = model.train(data, mp.TrainingConfig(learning_rate=5e-2, batch_size=4, epochs=8, progress=False))
    print(f"\n  LN tuning loss {h['loss'][0]:.3f} -> {h['loss'][-1]:.3f}")
    assert h["loss"][-1] < 0.9 * h["loss"][0]  # 480 numbers trained: a smaller fall than LoRA's
    moved = {n for n, p in model.net.named_parameters() if not np.array_equal(p.numpy(), before[n])}
    assert moved == {n for n, p in model.net.named_parameters() if p.requires_grad} and moved
    assert all(".ln_tuning_layers." in n for n in moved)


@pytest.mark.spec("LN_TUNING-1")
def test_a_mixed_batch_gives_each_row_its_adapter_s_copy():
    model = make_model()
    model.apply_ln_tuning()
    model.apply_ln_tuning(name="other")
    randomize(model)
    for _, layer in layers(model, "other"):
        for _, p in layer.adapters["other"].named_parameters():
            p.data = (p.data * 0.5).astype(np.float32)
    alone = {}
    for n in ("default", "other"):
        model.set_active_adapter(n)
        alone[n] = model(IDS).numpy()
    with model.disable_adapters():
        alone["__base__"] = model(IDS).numpy()
    names = ["other", "__base__"]
    mixed = model(IDS, adapter_names=names).numpy()
    for b, n in enumerate(names):
        np.testing.assert_allclose(mixed[b], alone[n][b], rtol=1e-5, atol=1e-6)
