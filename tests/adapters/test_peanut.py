"""spec/peanut.md (PEANUT-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy float64
from the spec's formula dW = s f(W0)^T; and (oracle) against PEFT's PEANUT on a random Llama."""
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import max_rel_err
from minipeft.adapters.peanut import ACTIVATIONS, PEANuTConfig, PEANuTLinear
from minipeft.autograd import Tensor
from minipeft.autograd.gradcheck import gradcheck
from minipeft.errors import ConfigError
from one_layer import check_refuses_a_4bit_base, check_train_moves_every_leaf, saved_and_reloaded
from test_dora import SETTINGS, targets
from test_hira import check_unmerge_gives_W0_bit_for_bit, randomize  # randomize: every leaf ~ N(0, scale²)
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import (base, check_init_is_base_and_count, check_peft_case, lib,  # noqa: F401
                              perturbed_peft_model, report_gradients_from_peft)

# PEANUT-7 in NumPy float64, written from each activation's definition
SIG = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
ERF = np.vectorize(__import__("math").erf)
NP_ACT = {"relu": lambda x: np.maximum(x, 0), "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x),
          "relu2": lambda x: np.maximum(x, 0) ** 2, "silu": lambda x: x * SIG(x), "swish": lambda x: x * SIG(x),
          "gelu": lambda x: 0.5 * x * (1 + ERF(x / np.sqrt(2))),
          "gelu_new": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
          "gelu_pytorch_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
          "quick_gelu": lambda x: x * SIG(1.702 * x), "sigmoid": SIG, "tanh": np.tanh, "linear": lambda x: x}


def delta_np(d, W0):
    """PEANUT-1, PEANUT-2 in float64: s (G_L B^T)^T with the encoder inputs added back in reverse order."""
    leaf = lambda f: np.asarray(f.weight.data, np.float64)  # noqa: E731
    sigma = NP_ACT[d.act]
    H = sigma(W0.T @ leaf(d.peanut_A).T)
    enc_inputs = []
    for E in d.peanut_encoders:
        enc_inputs.append(H)
        H = sigma(H @ leaf(E).T)
    for i, D in enumerate(d.peanut_decoders):
        H = sigma(H @ leaf(D).T) + enc_inputs[len(enc_inputs) - 1 - i]
    return d.s * (H @ leaf(d.peanut_B).T).T


@pytest.mark.spec("PEANUT-1", "PEANUT-2", "PEANUT-3", "PEANUT-5")
@SETTINGS
@given(r=st.integers(1, 12), depth=st.integers(0, 3), act=st.sampled_from(sorted(ACTIVATIONS)),
       scaling=st.sampled_from([1.0, 0.5, -2.0]), tm=targets)
def test_forward_and_merge_are_W0_plus_s_f_of_W0(r, depth, act, scaling, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_peanut(rank=r, depth=depth, act_fn=act, scaling=scaling, target_modules=tm)
    randomize(model)
    updates = {}
    for p, layer in layers(model, "default"):
        d = layer.adapters["default"]
        updates[p + ".weight"] = delta_np(d, W[p + ".weight"].astype(np.float64))
        assert np.linalg.matrix_rank(updates[p + ".weight"]) <= r  # PEANUT-2: B has r columns
    check_forward_merge_unmerge(model, W, updates)
    check_unmerge_gives_W0_bit_for_bit(model, W)  # PEANUT-5


@pytest.mark.spec("PEANUT-2")
def test_the_update_is_a_nonlinear_function_of_W0():
    """Unlike LoRA's B A, dW changes with W0 and, under a non-homogeneous sigma, not in proportion to it."""
    model = make_model()
    model.apply_peanut(rank=4, depth=1, act_fn="tanh", target_modules=("q_proj",))
    randomize(model)
    path, layer = layers(model, "default")[0]
    d, W0 = layer.adapters["default"], layer.base_layer.weight.data.astype(np.float64)
    assert np.allclose(d.delta_weight_of(layer.base_layer), delta_np(d, W0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(delta_np(d, 2 * W0), 2 * delta_np(d, W0), rtol=1e-2)


@pytest.mark.spec("PEANUT-4")
def test_inits_draw_from_the_stated_distributions():
    model = make_model()
    base_logits = model(IDS).numpy()
    model.apply_peanut(rank=16, depth=2, target_modules=("q_proj", "up_proj"))
    assert np.array_equal(model(IDS).numpy(), base_logits)  # B = 0: exactly the base
    for _, layer in layers(model, "default"):
        d, m = layer.adapters["default"], layer.base_layer.out_features
        assert np.all(d.peanut_B.weight.data == 0)
        for leaf, fan in [(d.peanut_A, m)] + [(E, 16) for E in d.peanut_encoders] + [(D, 16) for D in d.peanut_decoders]:
            w = np.abs(np.asarray(leaf.weight.data))
            assert w.max() <= 1 / np.sqrt(fan) and w.max() > 0.9 / np.sqrt(fan)  # U(+-1/sqrt(fan_in))
    rnd = make_model()
    rnd.apply_peanut(rank=16, init_weights=False, target_modules=("up_proj",))
    for _, layer in layers(rnd, "default"):
        B = np.abs(np.asarray(layer.adapters["default"].peanut_B.weight.data))
        assert B.max() <= 1 / 4 and B.max() > 0.9 / 4
    assert max_rel_err(rnd(IDS), base_logits) > 1e-4


@pytest.mark.spec("PEANUT-6")
def test_only_the_network_trains_and_the_count_is_2rm_plus_2Lr2():
    model = make_model()
    model.apply_peanut(rank=4, depth=2, target_modules=("q_proj", "v_proj"))
    randomize(model)
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(re.search(r"\.peanut_(A|B|encoders\.\d|decoders\.\d)\.weight$", n) for n in trained)
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in trained.values())
    # q_proj (32 -> 32), v_proj (32 -> 16) at r = 4, L = 2, two layers
    assert model.parameter_counts()[0] == 2 * ((2 * 4 * 32 + 2 * 2 * 16) + (2 * 4 * 16 + 2 * 2 * 16))


@pytest.mark.spec("PEANUT-6", "PEANUT-7")
@pytest.mark.parametrize("kwargs, field", [(dict(rank=0), "rank"), (dict(depth=-1), "depth"),
                                           (dict(act_fn="mish"), "act_fn"), (dict(scaling="1"), "scaling"),
                                           (dict(init_weights="gaussian"), "init_weights"),
                                           (dict(depth=1.5), "depth")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        PEANuTConfig(**kwargs)


@pytest.mark.spec("PEANUT-6")
def test_a_4bit_base_and_gpt2_conv1d_are_refused():
    check_refuses_a_4bit_base("peanut")
    from minipeft.nn.layers import Conv1D
    with pytest.raises(ConfigError, match=r"c_attn.*torch.nn.Linear only"):
        PEANuTLinear.create(Conv1D(8, 24), PEANuTConfig(), "h.0.attn.c_attn", None)


@pytest.mark.spec("PEANUT-7")
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_each_activation_is_its_formula_and_its_backward_the_finite_difference(act):
    x = np.random.default_rng(7).standard_normal((5, 6)) * 2
    x[np.abs(x) < 1e-3] = 0.5  # away from relu's kink, where a central difference straddles it
    assert np.allclose(ACTIVATIONS[act](Tensor(x)).numpy(), NP_ACT[act](x), rtol=1e-12, atol=1e-12)
    assert gradcheck(lambda t: ACTIVATIONS[act](t), [Tensor(x, requires_grad=True)])[0] < 1e-6


@pytest.mark.spec("PEANUT-8")
def test_saved_keys_and_fields_are_peft_names(tmp_path):
    model = make_model()
    model.apply_peanut(rank=4, depth=2, act_fn="gelu", scaling=0.5, target_modules=("v_proj",))
    randomize(model)
    cfg, keys = saved_and_reloaded(model, tmp_path, make_model, IDS)
    assert cfg["peft_type"] == "PEANUT" and (cfg["r"], cfg["depth"], cfg["act_fn"], cfg["scaling"]) == (4, 2, "gelu", 0.5)
    assert cfg["init_weights"] is True and "fan_in_fan_out" not in cfg
    want = {}
    for i in (0, 1):
        p = f"base_model.model.model.layers.{i}.self_attn.v_proj."
        want.update({p + "peanut_A.weight": (4, 16), p + "peanut_B.weight": (16, 4)})
        want.update({p + f"peanut_{kind}.{j}.weight": (4, 4) for kind in ("encoders", "decoders") for j in (0, 1)})
    assert keys == want


@pytest.mark.spec("PEANUT-3", "PEANUT-4")
def test_model_train_moves_every_leaf_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_peanut(rank=8, depth=1, target_modules=("q_proj", "v_proj"))
    check_train_moves_every_leaf(model)


# ---- against PEFT (test_peft_oracle.py's tiny random Llama, every trainable tensor moved) ---------------------------
CASES = {"default": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"])),
         "deep": ("llama", dict(r=6, depth=2, act_fn="gelu", scaling=0.7, target_modules=["q_proj", "k_proj", "up_proj"])),
         "tanh": ("llama", dict(r=3, depth=1, act_fn="tanh", init_weights=False, modules_to_save=["lm_head"],
                                target_modules=["o_proj", "down_proj"])),
         "select": ("llama", dict(r=2, depth=3, act_fn="silu", target_modules=["q_proj", "o_proj", "gate_proj"],
                                  exclude_modules=["o_proj"], layers_to_transform=[1], layers_pattern="layers")),
         "gelu_new": ("llama", dict(r=5, depth=1, act_fn="gelu_new", scaling=-1.5, target_modules="all-linear"))}


def ours(name):  # PEFT's base_model.model.<path>.peanut_X.default[.<i>].weight -> <path>.adapters.default.peanut_X[.<i>].weight
    name = name.removeprefix("base_model.model.")
    if ".peanut_" not in name:  # a modules_to_save copy
        return re.sub(r"^(.+)\.modules_to_save\.default\.", r"\1.", name)
    return re.sub(r"^(.+)\.(peanut_\w+)\.default\.", r"\1.adapters.default.\2.", name)


@pytest.mark.oracle
@pytest.mark.spec("PEANUT-1", "PEANUT-2", "PEANUT-3", "PEANUT-5", "PEANUT-6", "PEANUT-8")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    check_peft_case(lib, base, CASES[case], "PeanutConfig", PEANuTConfig, tmp_path, f"PEANuT {case}")


@pytest.mark.oracle
@pytest.mark.spec("PEANUT-1", "PEANUT-3")
@pytest.mark.parametrize("case", ["default", "deep", "select"])
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    pm = perturbed_peft_model(lib, base, CASES[case], "PeanutConfig").eval()
    report_gradients_from_peft(lib, pm, base(CASES[case][0]), tmp_path, f"PEANuT {case}", ours, 1e-4)


@pytest.mark.oracle
@pytest.mark.spec("PEANUT-4", "PEANUT-6")
@pytest.mark.parametrize("case", ["default", "deep"])
def test_peft_default_init_is_the_base_and_counts_agree(lib, base, case):
    check_init_is_base_and_count(lib, base, CASES[case], "PeanutConfig", PEANuTConfig, f"PEANuT {case}")


@pytest.mark.oracle
@pytest.mark.spec("PEANUT-7")
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_each_activation_equals_transformers_act2fn(lib, act):
    torch = lib[0]
    from transformers.activations import ACT2FN
    x = np.random.default_rng(3).standard_normal((4, 7)) * 3
    assert np.allclose(ACTIVATIONS[act](Tensor(x)).numpy(), ACT2FN[act](torch.tensor(x)).numpy(), rtol=1e-10,
                       atol=1e-12)


@pytest.mark.oracle
@pytest.mark.spec("PEANUT-6")
def test_peft_refuses_gpt2_conv1d_too(lib, base):
    with pytest.raises(NotImplementedError, match="PEANuT does not support"):
        perturbed_peft_model(lib, base, ("gpt2", dict(target_modules=["c_attn"])), "PeanutConfig")
