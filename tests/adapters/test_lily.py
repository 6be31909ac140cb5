"""spec/lily.md (LILY-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy float64
from the spec's formula h = W0 x + b + s (A x) sum_e pbar_e B_e; and (oracle) against PEFT's LILY on random Llamas."""
import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import hf_llama_folder, max_rel_err, tiny_llama
from minipeft import backend
from minipeft.adapters.lily import LilyConfig, LilyLinear, condensed, groups
from minipeft.autograd import Tensor
from minipeft.errors import CheckpointError, ConfigError
from minipeft.safetensors_io import read_safetensors, write_safetensors
from one_layer import check_refuses_a_4bit_base, check_train_moves_every_leaf, saved_and_reloaded
from test_dora import SETTINGS, targets
from test_hira import randomize  # every leaf ~ N(0, scale²)
from test_lora import IDS, layers, make_model
from test_peft_oracle import (base, check_init_is_base_and_count, hf_model, lib,  # noqa: F401
                              perturbed_peft_model, report_gradients_from_peft)
from test_peft_oracle_init import both_ways


def leaf(t):
    return np.asarray(backend.to_host(t.weight.data), np.float64)


def lily_np(d, x, W0, b):
    """LILY-1 in float64: z = A x, pbar = mean over every token of softmax(R z), h = W0 x + b + s z sum_e pbar_e B_e."""
    A, B, R = leaf(d.lily_A), leaf(d.lily_B), leaf(d.lily_router)
    E, r = R.shape
    z = x @ A.T  # (.., r)
    logits = z @ R.T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    pbar = p.reshape(-1, E).mean(0)  # (E,)
    B_mix = np.einsum("e,eim->im", pbar, B.reshape(E, r, -1))  # (r, m)
    return x @ W0.T + b + d.s * z @ B_mix


@pytest.mark.spec("LILY-1")
@SETTINGS
@given(r=st.integers(1, 9), E=st.integers(2, 5), stride=st.integers(1, 3), scaling=st.sampled_from([1.0, 0.3, -2.0]),
       rows=st.integers(1, 3), T=st.integers(1, 5), tm=targets)
def test_each_layer_is_W0x_plus_s_z_times_the_batch_mix_of_experts(r, E, stride, scaling, rows, T, tm):
    model = make_model()
    model.apply_lily(rank=r, num_B=E, stride_A=stride, scaling=scaling, target_modules=tm)
    randomize(model)
    rng = np.random.default_rng(r * 7 + T)
    for _, layer in layers(model, "default"):
        bl = layer.base_layer
        x = rng.standard_normal((rows, T, bl.in_features))
        want = lily_np(layer.adapters["default"], x, leaf(bl), np.asarray(bl.bias.data, np.float64))
        got = layer(Tensor(x.astype(np.float32))).numpy()
        assert max_rel_err(got, want) < 1e-5


@pytest.mark.spec("LILY-1")
def test_one_example_s_output_depends_on_the_rest_of_its_batch():
    """pbar averages the router over every token of the batch, as PEFT's forward: an example alone and in a batch
    gives different outputs, each the formula's on its own batch."""
    model = make_model()
    model.apply_lily(rank=4, num_B=3, target_modules=("q_proj",))
    randomize(model)
    _, layer = layers(model, "default")[0]
    x = np.random.default_rng(0).standard_normal((2, 5, 32))
    W0, b = leaf(layer.base_layer), np.asarray(layer.base_layer.bias.data, np.float64)
    both = layer(Tensor(x.astype(np.float32))).numpy()
    alone = layer(Tensor(x[:1].astype(np.float32))).numpy()
    assert max_rel_err(both[:1], alone) > 1e-4
    d = layer.adapters["default"]
    assert max_rel_err(both, lily_np(d, x, W0, b)) < 1e-5 and max_rel_err(alone, lily_np(d, x[:1], W0, b)) < 1e-5


def shared(model, path_a, path_b, leaf_name):
    a, b = (model.net.get_submodule(p).adapters["default"] for p in (path_a, path_b))
    return getattr(a, leaf_name).weight is getattr(b, leaf_name).weight


@pytest.mark.spec("LILY-2")
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_A_is_shared_by_stride_A_consecutive_layers_and_B_by_every_layer_of_a_target(stride):
    model = tiny_llama(num_hidden_layers=5)
    model.apply_lily(rank=4, stride_A=stride, num_B=2, target_modules=("q_proj", "down_proj"))
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        paths = [f"model.layers.{i}.{name}" for i in range(5)]
        for i, p in enumerate(paths):
            assert shared(model, paths[0], p, "lily_B")
            assert shared(model, paths[stride * (i // stride)], p, "lily_A")
            assert i == 0 or not shared(model, paths[i - 1], p, "lily_router")
            assert i % stride != 0 or i == 0 or not shared(model, paths[i - 1], p, "lily_A")
    assert not shared(model, "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "lily_B")


@pytest.mark.spec("LILY-2")
def test_a_regex_is_one_entry_so_layers_of_one_shape_share_across_names():
    model = make_model()
    model.apply_lily(rank=4, stride_A=2, target_modules=r".*\.(q_proj|o_proj|v_proj)")
    q0, o0, q1, v0, v1 = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
                          "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                          "model.layers.1.self_attn.v_proj")
    assert shared(model, q0, o0, "lily_A") and shared(model, q0, q1, "lily_B") and not shared(model, q0, q1, "lily_A")
    assert shared(model, v0, v1, "lily_A") and not shared(model, q0, v0, "lily_B")  # v_proj is (16, 32): its own group
    assert groups({"a.q": (3, 4), "a.k": (3, 4), "b.q": (3, 5)}, "x") == [["a.q", "a.k"], ["b.q"]]


@pytest.mark.spec("LILY-3")
def test_all_linear_is_full_paths_below_20_layers_and_condensed_from_20():
    small = tiny_llama()  # 2 layers: 14 linear layers, each its own group
    small.apply_lily(rank=2, target_modules="all-linear")
    cfg = small.peft_configs["default"]
    assert len(cfg.target_modules) == 14 and all(t.startswith("model.layers.") for t in cfg.target_modules)
    assert not shared(small, "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "lily_B")
    big = tiny_llama(num_hidden_layers=3)  # 21: condensed to the 7 names
    big.apply_lily(rank=2, target_modules="all-linear")
    assert big.peft_configs["default"].target_modules == ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                                           "up_proj", "v_proj")
    assert shared(big, "model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj", "lily_B")


@pytest.mark.spec("LILY-3")
def test_condensing_takes_the_shortest_suffixes_that_match_no_other_module():
    qv = [f"model.decoder.layers.{i}.self_attn.{n}" for i in range(30) for n in ("q_proj", "v_proj")]
    assert condensed(qv, [f"model.encoder.layers.{i}.self_attn.k_proj" for i in range(30)]) == ("q_proj", "v_proj")
    enc = [f"model.encoder.layers.{i}.self_attn.q_proj" for i in range(30)]
    # q_proj, self_attn.q_proj, <i>.self_attn.q_proj and layers.<i>.self_attn.q_proj also end encoder paths
    assert set(condensed(qv, enc)) == {"v_proj"} | {f"decoder.layers.{i}.self_attn.q_proj" for i in range(30)}
    assert condensed(["a.b"], ["a.b.c"]) == ("b",)


@pytest.mark.spec("LILY-3")
def test_a_path_ending_with_two_entries_is_refused():
    model = make_model()
    with pytest.raises(ConfigError, match=r"q_proj ends with q_proj and self_attn.q_proj"):
        model.apply_lily(rank=2, target_modules=("q_proj", "self_attn.q_proj"))
    assert not model.peft_configs


@pytest.mark.spec("LILY-4")
def test_inits_draw_from_the_stated_distributions():
    model = make_model()
    base_logits = model(IDS).numpy()
    model.apply_lily(rank=16, num_B=3, target_modules=("q_proj", "up_proj"))
    assert np.array_equal(model(IDS).numpy(), base_logits)  # B = 0: exactly the base
    for _, layer in layers(model, "default"):
        d, n = layer.adapters["default"], layer.base_layer.in_features
        assert np.all(leaf(d.lily_B) == 0)
        for t, fan in ((d.lily_A, n), (d.lily_router, 16)):
            w = np.abs(leaf(t))
            assert w.max() <= 1 / np.sqrt(fan) and w.max() > 0.9 / np.sqrt(fan)  # U(+-1/sqrt(fan_in))
    rnd = make_model()
    rnd.apply_lily(rank=16, init_weights=False, target_modules=("up_proj",))
    B = np.abs(leaf(layers(rnd, "default")[0][1].adapters["default"].lily_B))
    assert B.shape == (32, 64) and B.max() <= 1 / 8 and B.max() > 0.9 / 8  # U(+-1/sqrt(m)), m = 64
    assert max_rel_err(rnd(IDS), base_logits) > 1e-4


@pytest.mark.spec("LILY-5")
@SETTINGS
@given(r=st.integers(1, 6), E=st.integers(2, 4), stride=st.integers(1, 4), L=st.integers(1, 4), tm=targets)
def test_the_count_is_ceil_L_over_stride_A_r_n_plus_E_r_m_plus_L_E_r(r, E, stride, L, tm):
    model = tiny_llama(num_hidden_layers=L)
    model.apply_lily(rank=r, num_B=E, stride_A=stride, target_modules=tm)
    shapes = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32), "gate_proj": (32, 64),
              "up_proj": (32, 64), "down_proj": (64, 32)}
    want = sum(math.ceil(L / stride) * r * shapes[t][0] + E * r * shapes[t][1] + L * E * r for t in tm)
    assert model.parameter_counts()[0] == want


@pytest.mark.spec("LILY-5")
def test_only_lily_tensors_train_and_each_gets_a_gradient():
    model = make_model()
    model.apply_lily(rank=4, stride_A=2, target_modules=("q_proj", "v_proj"))
    randomize(model)
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(re.search(r"\.lily_(A|B|router)\.weight$", n) for n in trained)
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in trained.values())
    assert len(trained) == 2 * (1 + 1 + 2)  # per target: one A (stride 2 over 2 layers), one B, two routers


@pytest.mark.spec("LILY-5")
@pytest.mark.parametrize("kwargs, field", [(dict(rank=0), "rank"), (dict(stride_A=0), "stride_A"),
                                           (dict(num_B=1), "num_B"), (dict(scaling="1"), "scaling"),
                                           (dict(init_weights="zeros"), "init_weights"), (dict(stride_A=1.5), "stride_A")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        LilyConfig(**kwargs)


@pytest.mark.spec("LILY-6")
def test_merging_is_refused_before_any_layer_changes():
    model = make_model()
    model.apply_lora(rank=2, target_modules=("q_proj",), name="lora")
    model.apply_lily(rank=4, target_modules=("q_proj",))
    model.set_active_adapter(["lora", "default"])
    randomize(model)
    weights = {n: np.array(p.data) for n, p in model.net.named_parameters()}
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ConfigError, match="Lily cannot be merged"):
            merge()
        assert all(np.array_equal(p.data, weights[n]) for n, p in model.net.named_parameters())
    with pytest.raises(ConfigError, match="no fixed dW"):
        layers(model, "default")[0][1].adapters["default"].merge_into(layers(model, "default")[0][1].base_layer)


@pytest.mark.spec("LILY-6")
def test_a_4bit_base_and_gpt2_conv1d_are_refused():
    check_refuses_a_4bit_base("lily")
    from minipeft.nn.layers import Conv1D
    with pytest.raises(ConfigError, match=r"c_attn.*torch.nn.Linear only"):
        LilyLinear.create_all({"h.0.attn.c_attn": Conv1D(8, 24)}, LilyConfig(), None)


@pytest.mark.spec("LILY-7")
def test_saved_keys_fields_and_shared_copies(tmp_path):
    model = make_model()
    model.apply_lily(rank=4, stride_A=2, num_B=3, scaling=0.5, target_modules=("v_proj",))
    randomize(model)
    cfg, keys = saved_and_reloaded(model, tmp_path, make_model, IDS)
    assert cfg["peft_type"] == "LILY" and (cfg["r"], cfg["stride_A"], cfg["num_B"], cfg["scaling"]) == (4, 2, 3, 0.5)
    assert cfg["init_weights"] is True and "fan_in_fan_out" not in cfg
    want = {}
    for i in (0, 1):
        p = f"base_model.model.model.layers.{i}.self_attn.v_proj."
        want.update({p + "lily_A.weight": (4, 32), p + "lily_B.weight": (12, 16), p + "lily_router.weight": (3, 4)})
    assert keys == want
    tensors, meta = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert np.array_equal(tensors[next(k for k in want if "0.self_attn.v_proj.lily_A" in k)],
                          tensors[next(k for k in want if "1.self_attn.v_proj.lily_A" in k)])
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lily_B.weight"] += 1.0  # copies of one shared B differ
    write_safetensors(str(tmp_path / "adapter_model.safetensors"), tensors, meta)
    with pytest.raises(CheckpointError, match="copies of one shared tensor"):
        make_model().load_adapters(str(tmp_path))


@pytest.mark.spec("LILY-1", "LILY-4")
def test_model_train_moves_every_leaf_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_lily(rank=8, stride_A=2, target_modules=("q_proj", "v_proj"))
    check_train_moves_every_leaf(model)


# ---- against PEFT (test_peft_oracle.py's tiny random Llama, every trainable tensor moved) ---------------------------
CASES = {"default": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"])),
         "stride": ("llama", dict(r=6, stride_A=2, num_B=3, scaling=0.7, target_modules=["q_proj", "k_proj", "down_proj"])),
         "regex": ("llama", dict(r=3, stride_A=2, num_B=4, target_modules=r".*\.(q_proj|o_proj|up_proj)")),
         "random": ("llama", dict(r=3, num_B=2, init_weights=False, modules_to_save=["lm_head"],
                                  target_modules=["o_proj", "down_proj"])),
         "select": ("llama", dict(r=2, stride_A=3, num_B=2, target_modules=["q_proj", "o_proj", "gate_proj"],
                                  exclude_modules=["o_proj"], layers_to_transform=[1], layers_pattern="layers")),
         "all_linear": ("llama", dict(r=5, num_B=3, scaling=-1.5, target_modules="all-linear"))}


def ours(name):  # PEFT's base_model.model.<path>.lily_X.default.weight -> <path>.adapters.default.lily_X.weight
    name = name.removeprefix("base_model.model.")
    if ".lily_" not in name:  # a modules_to_save copy
        return re.sub(r"^(.+)\.modules_to_save\.default\.", r"\1.", name)
    return re.sub(r"^(.+)\.(lily_\w+)\.default\.", r"\1.adapters.default.\2.", name)


def check_case(lib, folder, kw, tmp_path, label):
    """PEFT's and minipeft's Lily of kw on folder: equal trainable counts, then both_ways (every tensor perturbed,
    each library's save loads in the other with its logits); the loaded config is PEFT's rewritten one."""
    peft = lib[2]
    pm = peft.get_peft_model(hf_model(lib, folder), peft.LilyConfig(task_type="CAUSAL_LM", **kw))
    model = mp.load_model(folder)
    model.apply_adapter(LilyConfig.from_peft(dict(peft_type="LILY", **kw)))
    assert model.parameter_counts()[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    both_ways(lib, folder, pm, model, label, tmp_path)
    theirs = pm.peft_config["default"].target_modules
    mine = model.peft_configs["default"].target_modules
    assert (mine == theirs) if isinstance(theirs, str) else sorted(mine) == sorted(theirs)


@pytest.mark.oracle
@pytest.mark.spec("LILY-1", "LILY-2", "LILY-3", "LILY-5", "LILY-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways(lib, base, case, tmp_path):
    kind, kw = CASES[case]
    check_case(lib, base(kind), kw, tmp_path, f"Lily {case}")


@pytest.mark.oracle
@pytest.mark.spec("LILY-2", "LILY-3", "LILY-5", "LILY-7")
@pytest.mark.parametrize("kw", [dict(r=4, stride_A=2, num_B=3, target_modules=["q_proj", "v_proj", "down_proj"]),
                                dict(r=3, stride_A=2, num_B=2, target_modules="all-linear")],  # 21 layers: condensed
                         ids=["stride_over_3_layers", "all_linear_condensed"])
def test_on_a_3_layer_llama_the_sharing_and_names_are_peft_s(lib, tmp_path, kw):
    folder = hf_llama_folder(str(tmp_path / "base3"), vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, tie_word_embeddings=False)
    check_case(lib, folder, kw, tmp_path, f"Lily 3 layers {kw['target_modules']}")


@pytest.mark.oracle
@pytest.mark.spec("LILY-3")
def test_condensing_equals_peft_s_find_minimal_target_modules(lib):
    from peft.tuners.tuners_utils import _find_minimal_target_modules
    qv = [f"model.decoder.layers.{i}.self_attn.{n}" for i in range(25) for n in ("q_proj", "v_proj")]
    for others in ([f"model.encoder.layers.{i}.self_attn.k_proj" for i in range(25)],
                   [f"model.encoder.layers.{i}.self_attn.q_proj" for i in range(25)],
                   [f"model.decoder.layers.{i}.self_attn.q_proj" for i in range(25, 30)]):
        assert set(condensed(qv, others)) == _find_minimal_target_modules(qv, others)


@pytest.mark.oracle
@pytest.mark.spec("LILY-1")
@pytest.mark.parametrize("case", ["default", "stride", "regex"])
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    pm = perturbed_peft_model(lib, base, CASES[case], "LilyConfig").eval()
    report_gradients_from_peft(lib, pm, base(CASES[case][0]), tmp_path, f"Lily {case}", ours, 1e-4)


@pytest.mark.oracle
@pytest.mark.spec("LILY-4", "LILY-5")
@pytest.mark.parametrize("case", ["default", "stride"])
def test_peft_default_init_is_the_base_and_counts_agree(lib, base, case):
    check_init_is_base_and_count(lib, base, CASES[case], "LilyConfig", LilyConfig, f"Lily {case}")


@pytest.mark.oracle
@pytest.mark.spec("LILY-6")
def test_peft_refuses_merge_and_gpt2_conv1d_too(lib, base):
    pm = perturbed_peft_model(lib, base, CASES["default"], "LilyConfig")
    with pytest.raises(NotImplementedError, match="not supported for Lily"):
        pm.merge_and_unload()
    with pytest.raises(NotImplementedError, match="Lily does not support"):
        perturbed_peft_model(lib, base, ("gpt2", dict(target_modules=["c_attn"])), "LilyConfig")
