"""spec/velora.md (VELORA-n): on one layer, each claim rebuilt in NumPy float64 from the spec's formula (v the unit
mean sub-token, dL/dA = g^T X~ with X~ = c pad^-1((u . v) v), dL/dx = g A); on tiny random Llama models (test_lora.py's
set-up) the forward is LoRA's and the gradients equal float64 finite differences of the function VELORA-4 says
backward differentiates; and (oracle) against PEFT 0.21.2's LoraConfig(velora_config=...) both ways, on merge, and
on the training-mode gradients of every init_type."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close, max_rel_err
from one_layer import check_refuses_a_4bit_base, check_train_moves_every_leaf
from minipeft import backend
from minipeft.adapters.lora import LoRAConfig
from minipeft.adapters.velora import VeLoRAConfig, VeLoRALinear
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError
from minipeft.nn.layers import Linear
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets
from test_hira import randomize
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import V, base, lib  # noqa: F401 (fixtures)
from test_peft_oracle import check_both_ways_and_merged, hf_model, perturbed_peft_model
from test_peft_oracle import IDS as OIDS, report, report_gradients

INIT_TYPES = ["batch_average", "batch_average_once", "random"]


def subtokens_np(x, G):
    """(N, in) -> (N, G, D): x with zero columns appended to G D = G ceil(in / G), cut into G sub-tokens."""
    N, n = x.shape
    D = -(-n // G)
    return np.concatenate([x, np.zeros((N, G * D - n))], axis=1).reshape(N, G, D)


def unit_mean_np(x, G):
    """VELORA-1: the mean sub-token over every token and group, made unit (1 / sqrt(D) if it is 0)."""
    m = subtokens_np(x, G).reshape(-1, subtokens_np(x, G).shape[-1]).mean(axis=0)
    m = np.ones_like(m) if np.linalg.norm(m) == 0 else m
    return m / np.linalg.norm(m)


def reconstructed_np(x, v, G, c):
    """VELORA-3: X~ = c pad^-1((u_tg . v) v), (N, in)."""
    N, n = x.shape
    k = subtokens_np(x, G) @ v  # (N, G)
    return c * (k[:, :, None] * v[None, None, :]).reshape(N, -1)[:, :n]


def one_layer(n, m, r, G, c, init_type, seed=0, alpha=8.0):
    """A VeLoRA delta on a random Linear (n -> m), every tensor random, A and B trainable."""
    rng = np.random.default_rng(seed)
    base = Linear(n, m, bias=True)
    base.weight.data, base.bias.data = (rng.standard_normal(s).astype(np.float32) for s in ((m, n), (m,)))
    cfg = VeLoRAConfig(rank=r, alpha=alpha, velora_config={"num_groups": G, "scale": c, "init_type": init_type})
    d = VeLoRALinear.create(base, cfg, "q_proj", backend.RNG(seed))
    d.lora_A.weight.data, d.lora_B.weight.data = (rng.standard_normal(s).astype(np.float32) for s in ((r, n), (m, r)))
    d.requires_grad_(True)
    return base, d


def step(base, d, x, C):
    """Forward h = adapt(x, base(x)) and backward of sum(h * C): (h, dL/dx, dL/dA, dL/dB)."""
    d.lora_A.weight.grad = d.lora_B.weight.grad = None
    xt = Tensor(x.astype(np.float32), requires_grad=True)
    h = d.adapt(xt, base(xt), base)
    (h * Tensor(C.astype(np.float32))).sum().backward()
    return h.numpy(), xt.grad, d.lora_A.weight.grad, d.lora_B.weight.grad


shapes = dict(n=st.integers(6, 40), m=st.integers(6, 12), r=st.integers(1, 6), G=st.integers(1, 12),
              c=st.floats(0.25, 4.0), N=st.integers(1, 5), seed=st.integers(0, 10_000))


@pytest.mark.spec("VELORA-3", "VELORA-2")
@SETTINGS
@given(**shapes)
def test_training_backward_is_g_transposed_times_the_reconstruction_and_exact_for_x_and_B(n, m, r, G, c, N, seed):
    base, d = one_layer(n, m, r, G, c, "batch_average", seed)
    rng = np.random.default_rng(seed + 1)
    x, C = rng.standard_normal((N, 3, n)), rng.standard_normal((N, 3, m))
    d.train()
    h, gx, gA, gB = step(base, d, x, C)
    W0, b0 = (np.asarray(t.data, np.float64) for t in (base.weight, base.bias))
    A, B = (np.asarray(t.weight.data, np.float64) for t in (d.lora_A, d.lora_B))
    x2, C2 = x.reshape(-1, n), C.reshape(-1, m)
    assert_close(h.reshape(-1, m), x2 @ W0.T + b0 + d.s * x2 @ A.T @ B.T, 1e-5, atol=1e-5, label="h (LoRA's)")
    v = unit_mean_np(x2, G)
    assert_close(d.embed[0].data, v, 1e-5, atol=1e-6, label="v")
    g = d.s * C2 @ B  # dL/d(x A^T), (N, r)
    assert_close(gA, g.T @ reconstructed_np(x2, v, G, c), 1e-4, atol=1e-4, label="dL/dA = g^T X~")
    assert_close(gx.reshape(-1, n), C2 @ W0 + g @ A, 1e-4, atol=1e-4, label="dL/dx exact")
    assert_close(gB, d.s * C2.T @ (x2 @ A.T), 1e-4, atol=1e-4, label="dL/dB exact")
    d.eval()  # eval: A is LoRA's plain projection, exact gradient
    _, _, gA_eval, _ = step(base, d, x, C)
    assert_close(gA_eval, g.T @ x2, 1e-4, atol=1e-4, label="eval dL/dA exact")


@pytest.mark.spec("VELORA-3")
def test_the_compression_is_exact_only_when_sub_tokens_are_parallel_to_v():
    base, d = one_layer(24, 8, 4, 24, 1.0, "batch_average")  # D = 1: every sub-token is parallel to v = +-1
    rng = np.random.default_rng(3)
    x, C = rng.standard_normal((2, 5, 24)), rng.standard_normal((2, 5, 8))
    d.train()
    _, _, gA, _ = step(base, d, x, C)
    exact = (d.s * C.reshape(-1, 8) @ np.asarray(d.lora_B.weight.data, np.float64)).T @ x.reshape(-1, 24)
    assert_close(gA, exact, 1e-5, atol=1e-5, label="D = 1: LoRA's gradient")
    base, d = one_layer(24, 8, 4, 4, 1.0, "batch_average")  # D = 6
    d.train()
    _, _, gA, _ = step(base, d, x, C)
    assert max_rel_err(gA, exact) > 0.1  # compressed: not LoRA's gradient


@pytest.mark.spec("VELORA-1")
@SETTINGS
@given(n=st.integers(2, 30), G=st.integers(1, 10), init_type=st.sampled_from(INIT_TYPES), seed=st.integers(0, 999))
def test_v_is_the_unit_mean_sub_token_of_the_batch_as_each_init_type_says(n, G, init_type, seed):
    base, d = one_layer(n, 4, 2, G, 1.0, init_type, seed)
    D = -(-n // G)
    v0 = np.array(d.embed[0].data, dtype=np.float64)
    assert v0.shape == (D,) and d.embed[0].requires_grad is False
    if init_type == "random":
        assert abs(np.linalg.norm(v0) - 1) < 1e-6
    else:
        assert np.all(v0 == 0)
    rng = np.random.default_rng(seed)
    x1, x2 = rng.standard_normal((2, 3, n)) + 0.5, rng.standard_normal((3, 2, n)) - 0.5
    C = rng.standard_normal((2, 3, 4))
    d.eval()
    step(base, d, x1, C)  # eval: v untouched
    assert np.array_equal(d.embed[0].data, v0)
    d.train()
    step(base, d, x1, C)
    step(base, d, x2, rng.standard_normal((3, 2, 4)))
    want = {"random": v0, "batch_average_once": unit_mean_np(x1.reshape(-1, n), G),
            "batch_average": unit_mean_np(x2.reshape(-1, n), G)}[init_type]
    assert_close(d.embed[0].data, want, 1e-5, atol=1e-6, label=f"v ({init_type})")
    assert d.embed[0].grad is None  # never trained


@pytest.mark.spec("VELORA-1")
def test_a_zero_mean_batch_gives_v_ones_over_root_D():
    base, d = one_layer(10, 3, 2, 2, 1.0, "batch_average")
    x = np.zeros((1, 2, 10))
    x[0, 1] = np.arange(10.0)
    x[0, 0] = -x[0, 1]  # the two tokens cancel: m = 0
    d.train()
    step(base, d, x, np.ones((1, 2, 3)))
    assert_close(d.embed[0].data, np.full(5, 1 / np.sqrt(5)), 1e-6, label="v = 1 / sqrt(D)")


@pytest.mark.spec("VELORA-2")
@SETTINGS
@given(r=st.integers(1, 8), alpha=st.floats(0.5, 32), tm=targets, rslora=st.booleans(), G=st.integers(1, 40),
       init_type=st.sampled_from(INIT_TYPES))
def test_forward_in_training_and_eval_and_merge_are_lora_s(r, alpha, tm, rslora, G, init_type):
    model = make_model()
    W = snapshot(model)
    model.apply_velora(rank=r, alpha=alpha, target_modules=tm, use_rslora=rslora,
                       velora_config={"num_groups": G, "init_type": init_type})
    randomize(model)
    updates = {}
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        A, B = (np.asarray(t.weight.data, np.float64) for t in (d.lora_A, d.lora_B))
        updates[path + ".weight"] = (alpha / np.sqrt(r) if rslora else alpha / r) * B @ A
    model.net.train()
    trained = model(IDS).numpy()  # the VeLoRA projection: the same forward
    model.net.eval()
    assert_close(trained, model(IDS), 1e-6, label="train-mode forward vs eval")
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("VELORA-4", "VELORA-3")
@pytest.mark.parametrize("G, init_type", [(5, "batch_average"), (3, "random"), (12, "batch_average_once")])
def test_training_gradients_equal_finite_differences_of_the_function_backward_differentiates(G, init_type):
    model = make_model()
    model.apply_velora(rank=4, target_modules=("q_proj", "v_proj", "down_proj"),
                       velora_config={"num_groups": G, "scale": 1.7, "init_type": init_type})
    randomize(model)
    model.net.train()
    pairs = training_directional_gradients(model)
    for analytic, numeric in pairs:
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
    model.net.eval()  # the same derivatives of the plain LoRA forward (exact backward) are other numbers
    exact = training_directional_gradients(model)
    assert max(abs(a - e) / abs(e) for (a, _), (e, _) in zip(pairs, exact)) > 1e-3


def training_directional_gradients(model, seed=2):
    """test_every_method's directional check in float64, for the mode the model is in: the analytic derivative
    from one backward, then central differences with every delta inside gradient_reference (VELORA-4)."""
    import contextlib
    from test_every_method import finite_differences
    for _, p in model.net.named_parameters():
        p.data = p.data.astype(np.float64)
    params = [p for _, p in model.net.named_parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    rng = np.random.default_rng(seed)
    C = rng.standard_normal(model(IDS).shape)
    (model(IDS) * Tensor(C)).sum().backward()
    grads = [np.asarray(p.grad) for p in params]
    with contextlib.ExitStack() as held:
        for _, layer in layers(model, "default"):
            held.enter_context(layer.adapters["default"].gradient_reference(layer.base_layer))
        return finite_differences(lambda: float(np.sum(model(IDS).numpy() * C)), params, grads, rng, 3, 1e-6)


@pytest.mark.spec("VELORA-5")
def test_only_a_and_b_train_the_count_is_lora_s_and_training_moves_them():
    model = make_model()
    model.apply_velora(rank=4, target_modules=("q_proj", "down_proj"), velora_config={"num_groups": 4})
    trained = model.net.named_trainable_parameters()
    assert trained and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in trained)
    assert model.parameter_counts()[0] == 2 * (4 * (32 + 32) + 4 * (64 + 32))  # q 32 -> 32, down 64 -> 32
    demo = mp.load_model(mp.DEMO_MODEL)
    demo.apply_velora(rank=4, target_modules=("q_proj", "v_proj"), velora_config={"num_groups": 8})
    check_train_moves_every_leaf(demo)
    v = [layer.adapters["default"].embed[0].data for _, layer in layers(demo, "default")]
    assert all(np.abs(np.linalg.norm(e) - 1) < 1e-5 for e in v)  # set by model.train's batches


@pytest.mark.spec("VELORA-7")
@pytest.mark.parametrize("kwargs, field", [
    (dict(velora_config={"num_groups": 0}), r"velora_config\['num_groups'\]"),
    (dict(velora_config={"num_groups": 2.5}), r"velora_config\['num_groups'\]"),
    (dict(velora_config={"scale": 0}), r"velora_config\['scale'\]"),
    (dict(velora_config={"scale": "big"}), r"velora_config\['scale'\]"),
    (dict(velora_config={"init_type": "svd"}), r"velora_config\['init_type'\]"),
    (dict(velora_config={"groups": 4}), "velora_config"),
    (dict(velora_config=[4]), "velora_config")])
def test_bad_config_names_the_field_and_leaves_the_model_as_it_was(kwargs, field):
    model = make_model()
    W = snapshot(model)
    with pytest.raises(ConfigError, match=field):
        model.apply_velora(**{"target_modules": ("q_proj", "v_proj"), **kwargs})
    assert all(np.array_equal(p.data, W[n]) for n, p in model.net.named_parameters())
    assert not model.peft_configs


@pytest.mark.spec("VELORA-7")
def test_a_4bit_base_is_refused():
    check_refuses_a_4bit_base("velora")


@pytest.mark.spec("VELORA-6")
def test_saved_keys_and_fields_are_peft_names_and_the_folder_loads_as_velora(tmp_path):
    model = make_model()
    model.apply_velora(rank=4, target_modules=("q_proj",), velora_config={"num_groups": 5, "init_type": "random"})
    randomize(model)
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["velora_config"] == {"num_groups": 5, "scale": 1.0,
                                                                   "init_type": "random"}
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in keys.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.{m}": s for i in (0, 1)
        for m, s in (("lora_A.weight", (4, 32)), ("lora_B.weight", (32, 4)), ("lora_velora_embed", (7,)))}
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert type(again.peft_configs["default"]) is VeLoRAConfig
    for (_, a), (_, b) in zip(layers(again, "default"), layers(model, "default")):
        assert np.array_equal(a.adapters["default"].embed[0].data, b.adapters["default"].embed[0].data)
    assert np.array_equal(again(IDS).numpy(), model(IDS).numpy())
    cfg["velora_config"] = None  # PEFT's plain LoRA: lora_velora_embed is a key no LoRA has
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="lora_velora_embed"):
        make_model().load_adapters(str(tmp_path))
    assert type(LoRAConfig.from_peft(cfg)) is LoRAConfig


# ---- against PEFT ---------------------------------------------------------------------------------------
CASES = {"basic": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], velora_config={})),
         "padded_rslora": ("llama", dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"],
                                         velora_config={"num_groups": 5, "scale": 1.5})),
         "patterns_bias": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"],
                                         rank_pattern={"k_proj": 2}, alpha_pattern={"o_proj": 3}, lora_bias=True,
                                         velora_config={"num_groups": 4, "init_type": "random"})),
         "gpt2": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                               velora_config={"num_groups": 3, "init_type": "batch_average_once"}))}


@pytest.mark.oracle
@pytest.mark.spec("VELORA-2", "VELORA-6", "VELORA-8")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    kind, _ = CASES[case]
    pm = perturbed_peft_model(lib, base, CASES[case], "LoraConfig").eval()
    trained = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    check_both_ways_and_merged(lib, pm, base(kind), tmp_path, f"VeLoRA {case}")
    model = mp.load_model(base(kind))
    model.load_adapters(str(tmp_path / "peft"))
    assert type(model.peft_configs["default"]) is VeLoRAConfig and model.parameter_counts()[0] == trained


@pytest.mark.oracle
@pytest.mark.spec("VELORA-1", "VELORA-3", "VELORA-5", "VELORA-8")
@pytest.mark.parametrize("init_type", INIT_TYPES)
@pytest.mark.parametrize("G", [5, 64])
def test_training_mode_gradients_and_v_equal_peft_s(lib, base, init_type, G, tmp_path):
    """One training-mode next-token step in both libraries from PEFT's perturbed state (dropout 0)."""
    import re
    from minipeft.autograd import functional as F
    torch = lib[0]
    case = ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          velora_config={"num_groups": G, "scale": 1.5, "init_type": init_type}))
    pm = perturbed_peft_model(lib, base, case, "LoraConfig")
    pm.save_pretrained(tmp_path)
    pm.train()
    logits = pm(torch.tensor(OIDS)).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.tensor(OIDS[:, 1:]).reshape(-1)).backward()
    pattern = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.default\.weight$")
    theirs = {"{}.adapters.default.{}.weight".format(*pattern.match(n).groups()): p.grad.numpy()
              for n, p in pm.named_parameters() if p.requires_grad}
    model = mp.load_model(base("llama"))
    model.load_adapters(str(tmp_path))
    model.net.train()
    out = model(OIDS)
    F.cross_entropy(out[:, :-1].reshape(-1, V), Tensor(OIDS[:, 1:].reshape(-1))).backward()
    report_gradients(f"VeLoRA {init_type} G={G} (training)", model, theirs)
    sd = pm.base_model.model.state_dict()
    for path, layer in layers(model, "default"):
        report(f"VeLoRA {init_type} v {path}", max_rel_err(layer.adapters["default"].embed[0].data,
                                                           sd[f"{path}.lora_velora_embed.default"].numpy()))
    with pytest.raises(AssertionError):  # the check can fail: eval-mode (exact LoRA) gradients are other numbers
        model.net.zero_grad()
        model.net.eval()
        out = model(OIDS)
        F.cross_entropy(out[:, :-1].reshape(-1, V), Tensor(OIDS[:, 1:].reshape(-1))).backward()
        report_gradients("exact", model, theirs)
