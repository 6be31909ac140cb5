"""spec/tiedlora.md (TIEDLORA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in
NumPy float64 from the spec's formula dW_l = s diag(v_l) B diag(u_l) A, with A, B one pair per module name."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close
from minipeft.adapters.tiedlora import CONFIGURATIONS, TiedLoRAConfig, TiedLoRALinear
from minipeft.backend import RNG
from minipeft.errors import ConfigError
from minipeft.nn.layers import Linear
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets
from test_lora import IDS, SHAPES, check_forward_merge_unmerge, layers, make_model, snapshot

TL = sorted(CONFIGURATIONS)


def tensors_of(d):
    return d.tied_lora_A, d.tied_lora_B, d.tied_lora_u, d.tied_lora_v


def randomize_all(model, seed=1):
    """Random A, B (once per module type: the tied Tensors are set once) and u, v per layer."""
    rng, done = np.random.default_rng(seed), set()
    for _, layer in layers(model, "default"):
        for t in tensors_of(layer.adapters["default"]):
            if id(t) not in done:
                done.add(id(t))
                t.data = (rng.standard_normal(t.shape) * 0.4).astype(np.float32)


def delta_np(d, s):
    A, B, u, v = (np.asarray(t.data, np.float64) for t in tensors_of(d))
    return s * np.diag(v) @ B @ np.diag(u) @ A  # TIEDLORA-1


@pytest.mark.spec("TIEDLORA-1", "TIEDLORA-2", "TIEDLORA-6")
@SETTINGS
@given(r=st.integers(1, 6), alpha=st.sampled_from([1, 8, 16]), tl=st.sampled_from(TL), tm=targets)
def test_forward_and_merge_are_W0_plus_s_diag_v_B_diag_u_A(r, alpha, tl, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_tiedlora(rank=r, alpha=alpha, configuration=tl, target_modules=tm)
    randomize_all(model)
    updates = {path + ".weight": delta_np(layer.adapters["default"], alpha / r) for path, layer in layers(model, "default")}
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("TIEDLORA-3")
def test_A_and_B_are_one_tensor_per_module_name_and_u_v_one_per_layer():
    model = make_model()
    model.apply_tiedlora(rank=3, target_modules=("q_proj", "v_proj", "down_proj"))
    by_name = {}
    for path, layer in layers(model, "default"):
        by_name.setdefault(path.rsplit(".", 1)[-1], []).append(layer.adapters["default"])
    assert sorted(by_name) == ["down_proj", "q_proj", "v_proj"] and all(len(ds) == 2 for ds in by_name.values())
    for ds in by_name.values():
        assert ds[0].tied_lora_A is ds[1].tied_lora_A and ds[0].tied_lora_B is ds[1].tied_lora_B
        assert ds[0].tied_lora_u is not ds[1].tied_lora_u and ds[0].tied_lora_v is not ds[1].tied_lora_v
    assert len({id(ds[0].tied_lora_A) for ds in by_name.values()}) == 3
    # a step moves the one A of a name in all its layers (its gradient, the sum over them, is METHOD-5's check)
    randomize_all(model)
    model(IDS).sum().backward()
    assert by_name["q_proj"][0].tied_lora_A.grad is by_name["q_proj"][1].tied_lora_A.grad


@pytest.mark.spec("TIEDLORA-3")
def test_one_name_with_two_shapes_is_refused():
    bases = {"a.proj": Linear(4, 8), "b.proj": Linear(4, 6)}
    with pytest.raises(ConfigError, match="layers named proj have shapes"):
        TiedLoRALinear.create_all(bases, TiedLoRAConfig(rank=2), RNG(0))


@pytest.mark.spec("TIEDLORA-4", "TIEDLORA-5", "TIEDLORA-7")
@pytest.mark.parametrize("tl", TL)
def test_each_configuration_starts_at_the_base_trains_its_set_and_counts_it(tl):
    model = make_model()
    base = model(IDS).numpy()
    tm = ("q_proj", "v_proj", "down_proj")
    model.apply_tiedlora(rank=4, configuration=tl, target_modules=tm)
    assert np.array_equal(model(IDS).numpy(), base)  # dW = 0 exactly
    model(IDS).sum().backward()
    trains = CONFIGURATIONS[tl]
    leaf = {"A": "tied_lora_A", "B": "tied_lora_B", "u": "tied_lora_u", "v": "tied_lora_v"}
    trained = {n.rsplit(".", 1)[-1] for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained == {leaf[f] for f in trains}
    zero = next(f for f in "BvA" if f in trains)  # TIEDLORA-5: the zero factor moves first
    d = layers(model, "default")[0][1].adapters["default"]
    z = dict(zip("ABuv", tensors_of(d)))[zero]
    assert not np.any(z.numpy()) and np.abs(z.grad).max() > 0
    r, L = 4, 2
    want = sum(r * n * ("A" in trains) + m * r * ("B" in trains) + L * (r * ("u" in trains) + m * ("v" in trains))
               for m, n in (SHAPES[f"self_attn.{t}"] if t != "down_proj" else SHAPES["mlp.down_proj"] for t in tm))
    assert model.parameter_counts()[0] == want


@pytest.mark.spec("TIEDLORA-7")
def test_tl6_is_one_over_L_of_lora_plus_the_vectors():
    layers_7b = {f"model.layers.{i}.self_attn.{n}": (4096, 4096) for i in range(32) for n in ("q_proj", "v_proj")}
    lora = 32 * 2 * 8 * (4096 + 4096)
    assert TiedLoRAConfig(rank=8).trainable_count(layers_7b, None) == lora // 32 + 32 * 2 * (8 + 4096)
    assert TiedLoRAConfig(rank=8, configuration="TL5").trainable_count(layers_7b, None) == lora // 64


@pytest.mark.spec("TIEDLORA-4")
@pytest.mark.parametrize("kw,match", [({"configuration": "TL7"}, "configuration"), ({"configuration": "tl6"}, "configuration"),
                                      ({"rank": 0}, "rank"), ({"dropout": -0.1}, "dropout"),
                                      ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"), ({"tied": True}, "tied")])
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        TiedLoRAConfig(**kw)


@pytest.mark.spec("TIEDLORA-8")
def test_files_hold_u_v_per_layer_and_A_B_once_and_load_tied(tmp_path):
    model = make_model()
    model.apply_tiedlora(rank=3, configuration="TL2", target_modules=("q_proj", "k_proj"))
    randomize_all(model)
    out = model(IDS).numpy()
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MINIPEFT_TIEDLORA" and (cfg["r"], cfg["configuration"]) == (3, "TL2")
    tensors, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    want = {}
    for path, layer in layers(model, "default"):
        n, m = layer.base_layer.in_features, layer.base_layer.out_features
        name = path.rsplit(".", 1)[-1]
        want.update({f"base_model.model.{path}.tied_lora_u": (3,), f"base_model.model.{path}.tied_lora_v": (m,),
                     f"base_model.tied_lora_A.{name}": (3, n), f"base_model.tied_lora_B.{name}": (m, 3)})
    assert {k: v.shape for k, v in tensors.items()} == want
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert_close(again(IDS), out, 1e-6, label="reloaded")
    (_, first), (_, second) = [(p, x) for p, x in layers(again, "default") if p.endswith("q_proj")]
    assert first.adapters["default"].tied_lora_A is second.adapters["default"].tied_lora_A
