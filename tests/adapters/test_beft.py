"""spec/beft.md (BEFT-n) on tiny random Llama models with biases (test_lora.py's set-up), each claim rebuilt
in NumPy from h = W0 x + b + Δb; and (oracle) against PEFT's BEFT."""
import json

import numpy as np
import pytest

import minipeft as mp
from helpers import hf_llama_folder, max_rel_err
from minipeft.adapters.beft import BEFTConfig, BEFTLinear
from minipeft.backend import RNG
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from one_layer import random_base
from test_lora import CFG, IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import check_both_ways_and_merged, hf_model, lib, perturb_peft  # noqa: F401 (fixture)


def offsets(model):
    rng = np.random.default_rng(1)
    out = {}
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        d.beft_bias.data = (rng.standard_normal(d.beft_bias.shape) * 0.3).astype(np.float32)
        out[path + ".bias"] = d.beft_bias.data[0].astype(np.float64)
    return out


@pytest.mark.spec("BEFT-1", "BEFT-3")
@pytest.mark.parametrize("targets", [("v_proj",), ("q_proj", "v_proj", "down_proj")])
def test_forward_and_merge_add_the_offset_to_the_bias(targets):
    model = make_model()
    W = snapshot(model)
    model.apply_beft(target_modules=targets)
    updates = offsets(model)
    check_forward_merge_unmerge(model, W, updates)
    for path, layer in layers(model, "default"):
        np.testing.assert_allclose(layer.base_layer.bias.data, W[path + ".bias"], atol=1e-6)


@pytest.mark.spec("BEFT-1", "BEFT-3")
def test_a_layer_without_bias_adapts_but_refuses_the_merge():
    model = mp.load_model(mp.DEMO_MODEL)  # llama with no attention biases
    base = model(IDS % 32).numpy()
    model.apply_beft()
    offsets(model)
    out = model(IDS % 32).numpy()
    assert max_rel_err(out, base) > 1e-3
    with pytest.raises(ConfigError, match="no bias"):
        model.merge_adapter()
    np.testing.assert_array_equal(model(IDS % 32).numpy(), out)  # nothing was half-merged


@pytest.mark.spec("BEFT-2", "BEFT-4")
def test_init_is_zero_and_only_the_offset_trains():
    model = make_model()
    base = model(IDS).numpy()
    model.apply_beft(target_modules=("v_proj", "up_proj"))
    assert np.array_equal(model(IDS).numpy(), base)
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(".beft_bias") for n in trained)
    assert all(np.abs(p.grad).max() > 0 for p in trained.values())
    assert model.parameter_counts()[0] == 2 * (16 + 64)  # v_proj 16 outputs, up_proj 64, two layers
    rnd = make_model()
    rnd.apply_beft(init_weights=False, target_modules=("up_proj",))
    b = np.concatenate([np.asarray(m.adapters["default"].beft_bias.data).ravel() for _, m in layers(rnd, "default")])
    assert abs(b.std() - 1) < 0.2 and max_rel_err(rnd(IDS), base) > 1e-3


@pytest.mark.spec("BEFT-5")
def test_targets_conv1d_refused_4bit_accepted():
    conv, _ = random_base(True, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="Conv1D"):
        BEFTLinear.create(conv, BEFTConfig(), "h.0.attn.c_attn", RNG(0))
    q = mp.load_model(mp.DEMO_MODEL, quantization=mp.QuantizationConfig(compute_dtype="float32"))
    base = q(IDS % 32).numpy()
    q.apply_beft()
    assert np.array_equal(q(IDS % 32).numpy(), base)
    assert BEFTConfig().target_modules == ("v_proj",)


@pytest.mark.spec("BEFT-6")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_model()
    model.apply_beft()
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BEFT" and cfg["init_weights"] is True and cfg["target_modules"] == ["v_proj"]
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in keys.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.v_proj.beft_bias": (1, 16) for i in (0, 1)}
    with pytest.raises(ConfigError, match="exclude_modules"):
        BEFTConfig(exclude_modules=("q_proj",))


@pytest.mark.oracle
@pytest.mark.spec("BEFT-1", "BEFT-3", "BEFT-6")
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, tmp_path):
    peft = lib[2]
    folder = hf_llama_folder(str(tmp_path / "base"), **{k: v for k, v in CFG.items() if k != "model_type"})  # biases
    pm = peft.get_peft_model(hf_model(lib, folder),
                             peft.BeftConfig(task_type="CAUSAL_LM", target_modules=["v_proj", "o_proj"]))
    perturb_peft(lib, pm)  # every beft_bias moved
    check_both_ways_and_merged(lib, pm.eval(), folder, tmp_path, "BEFT", IDS)
