"""spec/glora.md (GLORA-n) on tiny random Llama models with biases everywhere (test_lora.py's set-up), each claim
rebuilt in NumPy float64 from the spec's W' = W0 + W0 ⊙ A + B, b' = b + b ⊙ D + E + W0 C; and (oracle) against PEFT's
GLORA on a random Llama (attention biases, a bias-free MLP)."""
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_training_lowers_the_loss, max_rel_err
import minipeft as mp
from minipeft.adapters.glora import KINDS, GLoRAConfig
from minipeft.errors import ConfigError
from one_layer import saved_and_reloaded
from test_dora import SETTINGS, targets
from test_hira import randomize  # every trained leaf of every layer ~ N(0, scale²)
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import (base, check_init_is_base_and_count, check_peft_case, lib,  # noqa: F401
                              perturbed_peft_model, report_gradients_from_peft)


def support_np(part):
    """A support tensor's value from its leaves, float64 (GLORA-1's kinds)."""
    if part.kind == "lora":
        return np.asarray(part.Xd.data, np.float64) @ np.asarray(part.Xu.data, np.float64)
    return np.asarray((part.zeros[0] if part.kind == "none" else part.X).data, np.float64)


def updates_np(W0, b0, d):
    """GLORA-1 in float64: W' - W0 = W0 ⊙ A + B, b' - b = b ⊙ D + E + W0 C."""
    W0 = W0.astype(np.float64)
    dW = W0 * support_np(d.glora_A) + support_np(d.glora_B)
    if b0 is None:
        return dW, None
    return dW, b0 * support_np(d.glora_D) + support_np(d.glora_E) + (W0 @ support_np(d.glora_C))[:, 0]


@pytest.mark.spec("GLORA-1", "GLORA-2", "GLORA-4")
@SETTINGS
@given(ab=st.sampled_from(KINDS["config_A_B"]), c=st.sampled_from(KINDS["config_C"]),
       de=st.sampled_from(KINDS["config_D_E"]), r=st.integers(1, 4), tm=targets)
def test_forward_and_merge_are_the_generalized_update(ab, c, de, r, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_glora(rank=r, config_A_B=ab, config_C=c, config_D_E=de, target_modules=tm)
    randomize(model)
    updates = {}
    for p, layer in layers(model, "default"):
        dW, db = updates_np(W[p + ".weight"], W[p + ".bias"], layer.adapters["default"])
        updates[p + ".weight"], updates[p + ".bias"] = dW, db
    check_forward_merge_unmerge(model, W, updates)
    for p, layer in layers(model, "default"):  # GLORA-4: unmerge puts b back too
        assert np.array_equal(layer.base_layer.bias.data, W[p + ".bias"])


@pytest.mark.spec("GLORA-1", "GLORA-5")
def test_a_layer_without_bias_has_no_bias_part():
    model = mp.load_model(mp.DEMO_MODEL)  # no biases
    model.apply_glora(rank=2, config_D_E="vector", target_modules=("q_proj",))
    randomize(model)
    for _, layer in layers(model, "default"):
        d = layer.adapters["default"]
        assert (d.glora_C.kind, d.glora_D.kind, d.glora_E.kind) == ("none",) * 3
    n, m = model.net.get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight.shape[::-1]
    assert model.parameter_counts()[0] == len(layers(model, "default")) * 2 * 2 * (n + m)


@pytest.mark.spec("GLORA-3")
def test_inits_draw_from_the_stated_distributions():
    model = make_model()
    base_logits = model(IDS).numpy()
    model.apply_glora(rank=4, target_modules=("q_proj", "up_proj"))
    assert np.array_equal(model(IDS).numpy(), base_logits)  # every Xd and constant 0: exactly the base
    for _, layer in layers(model, "default"):
        d, n = layer.adapters["default"], layer.base_layer.in_features
        for part in (d.glora_A, d.glora_B):
            assert np.all(part.Xd.data == 0) and 0.8 / np.sqrt(n) < np.abs(part.Xu.data).max() <= 1 / np.sqrt(n)
        assert np.all(d.glora_C.Xd.data == 0) and 0.5 < np.abs(d.glora_C.Xu.data).max() <= 1  # fan-in 1
        assert d.glora_D.X.data.tolist() == [0.0] == d.glora_E.X.data.tolist()
    rnd = make_model()
    rnd.apply_glora(rank=16, config_C="vector", config_D_E="vector", init="random", target_modules=("up_proj",))
    for _, layer in layers(rnd, "default"):
        d, m = layer.adapters["default"], layer.base_layer.out_features
        assert 0.8 / np.sqrt(16) < np.abs(d.glora_A.Xd.data).max() <= 1 / np.sqrt(16)
        assert 0.8 < np.abs(d.glora_C.X.data).max() <= 1  # a column (n, 1): fan-in 1
        assert 0.5 / np.sqrt(m) < np.abs(d.glora_D.X.data).max() <= 1 / np.sqrt(m)  # (m,): PEFT's (1, m), fan-in m
    const = make_model()
    const.apply_glora(config_A_B="constant", init="random", target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    xs = np.array([layer.adapters["default"].glora_A.X.data[0] for _, layer in layers(const, "default")])
    assert np.all(np.abs(xs) < 0.02 * 5) and np.any(xs != 0)  # N(0, 0.02²)
    assert max_rel_err(rnd(IDS), base_logits) > 1e-3


@pytest.mark.spec("GLORA-5")
@pytest.mark.parametrize("ab, c, de, per_q, per_v", [
    ("lora", "lora", "constant", 2 * 8 * 64 + 8 * 33 + 2, 2 * 8 * 48 + 8 * 33 + 2),  # q 32 -> 32, v 32 -> 16
    ("vector", "vector", "vector", 2 * 32 + 32 + 2 * 32, 2 * 16 + 32 + 2 * 16),
    ("constant", "none", "none", 2, 2), ("none", "lora", "vector", 8 * 33 + 64, 8 * 33 + 32)])
def test_count_is_the_sum_of_the_support_tensors(ab, c, de, per_q, per_v):
    model = make_model()
    model.apply_glora(rank=8, config_A_B=ab, config_C=c, config_D_E=de, target_modules=("q_proj", "v_proj"))
    cfg = model.peft_configs["default"]
    assert model.parameter_counts()[0] == 2 * (per_q + per_v) == cfg.trainable_count(
        {p: (m.base_layer.in_features, m.base_layer.out_features) for p, m in layers(model, "default")}, model.config)


@pytest.mark.spec("GLORA-5")
@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=0), "rank"), (dict(config_A_B="lowrank"), "config_A_B"), (dict(config_C="constant"), "config_C"),
    (dict(config_D_E="lora"), "config_D_E"), (dict(init="pissa"), "init"), (dict(bias="lora_only"), "bias"),
    (dict(layers_to_transform=[0]), "layers_to_transform")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        GLoRAConfig(**kwargs)


@pytest.mark.spec("GLORA-5")
def test_gpt2_conv1d_is_refused_as_peft_does():
    from minipeft.adapters.glora import GLoRALinear
    from minipeft.nn.layers import Conv1D
    with pytest.raises(ConfigError, match=r"c_attn.*torch.nn.Linear only"):
        GLoRALinear.create(Conv1D(8, 24), GLoRAConfig(), "h.0.attn.c_attn", None)


@pytest.mark.spec("GLORA-6")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_model()
    model.apply_glora(rank=2, config_A_B="none", config_C="vector", target_modules=("v_proj",))
    randomize(model)
    cfg, keys = saved_and_reloaded(model, tmp_path, make_model, IDS)
    assert cfg["peft_type"] == "GLORA" and (cfg["r"], cfg["config_A_B"], cfg["config_C"], cfg["config_D_E"]) == (
        2, "none", "vector", "constant")
    assert cfg["init_weights"] is True and cfg["bias"] == "none" and "layers_to_transform" not in cfg
    assert keys == {
        f"base_model.model.model.layers.{i}.self_attn.v_proj.{leaf}": s for i in (0, 1)
        for leaf, s in (("glora_A.zeros", (16, 32)), ("glora_B.zeros", (16, 32)), ("glora_C.X", (32, 1)),
                        ("glora_D.X", (1,)), ("glora_E.X", (1,)))}
    assert GLoRAConfig.from_peft(dict(cfg, init_weights=False)).init == "random"


@pytest.mark.spec("GLORA-2", "GLORA-3")
def test_model_train_moves_every_leaf_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_glora(rank=4, target_modules=("q_proj", "v_proj"))
    before = {n: np.array(p.data) for n, p in model.net.named_trainable_parameters().items()}
    assert_training_lowers_the_loss(model)
    assert all(not np.array_equal(p.data, before[n]) for n, p in model.net.named_trainable_parameters().items())


# ---- against PEFT (test_peft_oracle.py's tiny random Llama: q/k/v/o biased, MLP bias-free; every trained tensor
# moved) ---------------------------------------------------------------------------------------------------------
CASES = {"default": ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
         "vector": ("llama", dict(r=2, config_A_B="vector", config_C="vector", config_D_E="vector", bias="glora_only",
                                  target_modules=["q_proj", "k_proj", "o_proj", "up_proj"])),
         "constant": ("llama", dict(r=3, config_A_B="constant", config_C="none", config_D_E="none",
                                    init_weights=False, target_modules=["v_proj", "gate_proj"])),
         "none_AB": ("llama", dict(r=2, config_A_B="none", config_C="lora", config_D_E="vector", bias="all",
                                   target_modules=["k_proj", "up_proj"]))}


def ours(name):  # PEFT's base_model.model.<path>.glora_X.default.<leaf> -> <path>.adapters.default.glora_X.<leaf>;
    # a trained bias base_model.model.<path>.base_layer.bias -> <path>.base_layer.bias
    name = name.removeprefix("base_model.model.")
    return re.sub(r"^(.+)\.(glora_[A-E])\.default\.", r"\1.adapters.default.\2.", name)


@pytest.mark.oracle
@pytest.mark.spec("GLORA-1", "GLORA-2", "GLORA-4", "GLORA-5", "GLORA-6")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    check_peft_case(lib, base, CASES[case], "GloraConfig", GLoRAConfig, tmp_path, f"GLoRA {case}")


@pytest.mark.oracle
@pytest.mark.spec("GLORA-2")
@pytest.mark.parametrize("case", ["default", "vector", "none_AB"])
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    pm = perturbed_peft_model(lib, base, CASES[case], "GloraConfig").eval()
    report_gradients_from_peft(lib, pm, base(CASES[case][0]), tmp_path, f"GLoRA {case}", ours, 1e-4)


@pytest.mark.oracle
@pytest.mark.spec("GLORA-3", "GLORA-5")
@pytest.mark.parametrize("case", ["default", "vector"])
def test_peft_default_init_is_the_base_and_counts_agree(lib, base, case):
    check_init_is_base_and_count(lib, base, CASES[case], "GloraConfig", GLoRAConfig, f"GLoRA {case}")


@pytest.mark.oracle
@pytest.mark.spec("GLORA-5")
def test_peft_refuses_gpt2_conv1d_too(lib, base):
    with pytest.raises(ValueError, match="not a plain torch.nn.Linear"):
        perturbed_peft_model(lib, base, ("gpt2", dict(target_modules=["c_attn"])), "GloraConfig")
