"""spec/qalora.md (QALORA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy
float64 from the spec's formulas: W~ = alpha q + beta per group, dW = (s / L) (B A) ⊗ 1_L, beta' = beta + s B A / L."""
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close
from minipeft import backend
from minipeft.adapters.qalora import QALoRAConfig
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError
from minipeft.quant.intgroup import group_dequantize, group_quantize
from minipeft.quant.linear4bit import quantize_model
from one_layer import check_mixed_batch, saved_and_reloaded, train_next
from test_dora import SETTINGS, targets
from test_lora import IDS, SHAPES, check_forward_merge_unmerge, layers, make_model, snapshot


def quant_np(W, bits, L):
    """QALORA-1 in float64: (codes, alpha, beta, W~)."""
    out, n = W.shape
    Wg = W.astype(np.float64).reshape(out, n // L, L)
    beta = Wg.min(-1)
    alpha = (Wg.max(-1) - beta) / (2 ** bits - 1)
    q = np.clip(np.round((Wg - beta[..., None]) / np.where(alpha > 0, alpha, 1)[..., None]), 0, 2 ** bits - 1)
    return q.reshape(out, n), alpha, beta, (alpha[..., None] * q + beta[..., None]).reshape(out, n)


def randomize(model, seed=1, scale=0.3):
    """Random A and B (B != 0) for the default adapter."""
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, "default"):
        for _, p in layer.adapters["default"].named_parameters():
            p.data = (rng.standard_normal(p.shape) * scale).astype(np.float32)


def delta_np(d):
    """QALORA-4: (s / L) (B A) ⊗ 1_L, (out, in), float64."""
    A, B = (np.asarray(t.weight.data, np.float64) for t in (d.lora_A, d.lora_B))
    return np.repeat(B @ A * (d.s / d.L), d.L, axis=1)


@pytest.mark.spec("QALORA-1")
@SETTINGS
@given(out=st.integers(1, 6), groups=st.integers(1, 4), L=st.sampled_from([1, 2, 4, 8, 32]),
       bits=st.sampled_from([2, 3, 4, 8]), seed=st.integers(0, 99))
def test_group_quantization_is_min_max_round_to_nearest_per_group(out, groups, L, bits, seed):
    W = (np.random.default_rng(seed).standard_normal((out, groups * L)) * 0.5).astype(np.float32)
    t = group_quantize(W, bits, L)
    q, alpha, beta, Wq = quant_np(W, bits, L)
    assert t.codes.dtype == np.uint8 and t.codes.max() <= 2 ** bits - 1
    u = ((W.astype(np.float64).reshape(out, groups, L) - beta[..., None])
         / np.where(alpha > 0, alpha, 1)[..., None]).reshape(out, -1)  # (W0 - beta) / alpha before rounding
    off = t.codes != q  # float32 against float64: only where the value sits on a rounding tie
    assert np.all(np.abs(np.abs(u[off] - np.floor(u[off])) - 0.5) < 1e-4) and np.all(np.abs(t.codes - q.astype(int)) <= 1)
    assert_close(t.scale, alpha, 1e-6, atol=1e-7, label="alpha")
    assert_close(t.zero, beta, 1e-7, label="beta")
    Wt = group_dequantize(t)
    assert np.all(np.abs(Wt - W) <= np.repeat(t.scale, L, axis=1) / 2 + 1e-6)  # |W0 - W~| <= alpha / 2
    for o in range(out):
        for g in range(groups):
            assert len(np.unique(Wt[o, g * L:(g + 1) * L])) <= 2 ** bits
    again = group_quantize(Wt, bits, L)  # W~ is its own quantization
    assert np.array_equal(again.codes, t.codes)
    assert_close(again.scale, t.scale, 1e-5, label="alpha again")


@pytest.mark.spec("QALORA-1")
def test_a_constant_group_is_kept_exactly_and_bad_arguments_are_refused():
    W = np.array([[0.5, 0.5, 0.5, 0.5, -1.0, 2.0, 0.0, 1.0]], np.float32)
    t = group_quantize(W, 2, 4)
    assert t.scale[0, 0] == 0 and np.all(t.codes[0, :4] == 0)
    assert np.array_equal(group_dequantize(t)[0, :4], W[0, :4])
    assert list(t.codes[0, 4:]) == [0, 3, 1, 2]  # (-1, 2, 0, 1) - (-1) over alpha = 1
    with pytest.raises(ConfigError, match="bits=5"):
        group_quantize(W, 5, 4)
    with pytest.raises(ConfigError, match="not a multiple of group_size=3"):
        group_quantize(W, 4, 3)


@pytest.mark.spec("QALORA-2")
def test_applying_replaces_each_targeted_W0_by_its_quantization_and_loading_does_the_same():
    model = make_model()
    W0 = snapshot(model)
    model.apply_qalora(rank=2, bits=3, group_size=8, target_modules=("q_proj", "down_proj"))
    after = snapshot(model)
    for name, W in W0.items():
        path = name.removesuffix(".weight")
        if name.endswith(".weight") and path.split(".")[-1] in ("q_proj", "down_proj"):
            assert np.array_equal(after[path + ".base_layer.weight"], group_dequantize(group_quantize(W, 3, 8)))
    untouched = {n for n in W0 if "q_proj" not in n and "down_proj" not in n}
    assert all(np.array_equal(after[n], W0[n]) for n in untouched)
    plain = make_model()  # the INT-3 model by hand: the float model with W~ in place of W0
    for path, layer in layers(model, "default"):
        plain.net.get_submodule(path).weight.data = layer.base_layer.weight.data.copy()
    assert np.array_equal(model(IDS).numpy(), plain(IDS).numpy())  # B = 0: exactly the quantized model
    randomize(model)
    with model.disable_adapters():
        assert np.array_equal(model(IDS).numpy(), plain(IDS).numpy())  # W~ is the base now


@pytest.mark.spec("QALORA-2")
def test_a_4bit_base_and_a_group_that_does_not_divide_are_refused_leaving_the_model_as_it_was():
    model = make_model()
    W0 = snapshot(model)
    with pytest.raises(ConfigError, match=r"group_size \(for model\.layers\.1\.self_attn\.q_proj\)=64.*in_features=32"):
        model.apply_qalora(group_size=64, rank=2,  # layer 0's down_proj (in 64) comes first and is fine
                           target_modules=r"model\.layers\.0\.mlp\.down_proj|model\.layers\.1\.self_attn\.q_proj")
    assert all(np.array_equal(p, W0[n]) for n, p in snapshot(model).items()) and not layers(model, "default")
    quantize_model(model.net, mp.QuantizationConfig(compute_dtype="float32"))
    with pytest.raises(ConfigError, match="quantizes a float layer itself"):
        model.apply_qalora(rank=2, group_size=8)


@pytest.mark.spec("QALORA-3", "QALORA-4", "QALORA-5")
@SETTINGS
@given(r=st.integers(1, 6), L=st.sampled_from([1, 4, 8, 16]), bits=st.sampled_from([2, 4]), tm=targets)
def test_forward_and_merge_are_the_quantized_W_plus_the_group_constant_update(r, L, bits, tm):
    model = make_model()
    model.apply_qalora(rank=r, bits=bits, group_size=L, target_modules=tm)
    W = snapshot(model)  # W~ in place of each targeted W0
    randomize(model)
    updates = {path + ".weight": delta_np(layer.adapters["default"]) for path, layer in layers(model, "default")}
    check_forward_merge_unmerge(model, {n.replace(".base_layer", ""): v for n, v in W.items()}, updates)
    for path, layer in layers(model, "default"):  # unmerge: W~ bit for bit
        assert np.array_equal(layer.base_layer.weight.data, W[path + ".base_layer.weight"])


@pytest.mark.spec("QALORA-3")
def test_the_adapter_sees_the_group_means_with_one_dropout_mask_on_them():
    model = make_model()
    model.apply_qalora(rank=3, group_size=8, dropout=0.4, target_modules=("down_proj",))
    randomize(model)
    layer = model.net.get_submodule("model.layers.0.mlp.down_proj")
    layer.train()
    d = layer.adapters["default"]
    x = np.random.default_rng(3).standard_normal((5, 64))
    pooled = x.reshape(5, 8, 8).mean(-1)  # (5, G)
    mask = np.asarray(backend.RNG(0).keep_mask((5, 8), 0.4))
    d.rng = backend.RNG(0)
    Wq, b = (np.asarray(t.data, np.float64) for t in (layer.base_layer.weight, layer.base_layer.bias))
    A, B = (np.asarray(t.weight.data, np.float64) for t in (d.lora_A, d.lora_B))
    want = x @ Wq.T + b + d.s * (pooled * mask) @ A.T @ B.T
    assert_close(layer(Tensor(x.astype(np.float32))), want, 1e-5, label="dropout on pool(x)")


@pytest.mark.spec("QALORA-3")
def test_init_draws_A_xavier_uniform_and_B_zero():
    model = make_model()
    model.apply_qalora(rank=4, group_size=2, target_modules=("gate_proj", "up_proj"))  # in 32: G = 16
    A = np.concatenate([l.adapters["default"].lora_A.weight.numpy().ravel() for _, l in layers(model, "default")])
    bound = np.sqrt(6 / (16 + 4))
    assert np.abs(A).max() <= bound and abs(A.std() - bound / np.sqrt(3)) < 0.05 * bound
    assert all(np.all(l.adapters["default"].lora_B.weight.numpy() == 0) for _, l in layers(model, "default"))
    assert all(l.adapters["default"].lora_A.weight.shape == (4, 16) for _, l in layers(model, "default"))


@pytest.mark.spec("QALORA-4")
@pytest.mark.parametrize("r,L,want", [(4, 8, 4), (12, 8, 8), (6, 32, 2)])
def test_the_rank_of_the_update_is_at_most_r_groups_and_out(r, L, want):
    model = make_model()
    model.apply_qalora(rank=r, group_size=L, target_modules=("down_proj",))  # (32, 64): G = 64 / L
    randomize(model)
    for _, layer in layers(model, "default"):
        dW = delta_np(layer.adapters["default"])
        assert np.linalg.matrix_rank(dW) == want == min(r, 64 // L, 32)
        assert_close(layer.adapters["default"].delta_weight(), dW, 1e-6, label="delta_weight")


@pytest.mark.spec("QALORA-5")
def test_the_merge_moves_only_the_zeros_and_the_merged_model_is_still_the_int_model():
    model = make_model()
    model.apply_qalora(rank=3, bits=4, group_size=8, target_modules=("q_proj", "up_proj"))
    randomize(model)
    out = model(IDS).numpy()
    held = {p: l.adapters["default"] for p, l in layers(model, "default")}
    model.merge_adapter()
    for path, d in held.items():
        W = model.net.get_submodule(path).base_layer.weight.data
        A, B = (np.asarray(t.weight.data, np.float64) for t in (d.lora_A, d.lora_B))
        zero = d.quant.zero + d.s * B @ A / 8  # beta' = beta + s B A / L
        Wq = np.repeat(d.quant.scale, 8, axis=1) * d.quant.codes + np.repeat(zero, 8, axis=1)
        assert_close(W, Wq, 1e-6, label="alpha q + beta'")
        again = group_quantize(W, 4, 8)  # the merged weight quantizes to itself: same codes and scales
        assert np.array_equal(again.codes, d.quant.codes)
        assert_close(again.scale, d.quant.scale, 1e-5, label="alpha")
        assert_close(again.zero, zero, 1e-6, label="beta'")
    merged = model.merge_and_unload()
    assert not layers(merged, "default")
    assert_close(merged(IDS), out, 1e-5, label="merge_and_unload vs unmerged")


@pytest.mark.spec("QALORA-5")
def test_merging_over_another_merged_adapter_is_refused():
    model = make_model()
    model.apply_adapter(mp.LoRAConfig(rank=2, target_modules=("q_proj",)), "first")
    model.apply_adapter(QALoRAConfig(rank=2, group_size=8, target_modules=("q_proj",)), "second")
    for _, layer in layers(model, "first"):
        layer.adapters["first"].lora_B.weight.data += 0.1  # B != 0: the LoRA merge moves W
    model.set_active_adapter(["first", "second"])
    with pytest.raises(ConfigError, match="holds another merged adapter; unmerge the others first"):
        model.merge_adapter()


@pytest.mark.spec("QALORA-2", "QALORA-5")
def test_two_adapters_share_the_layers_quantization_mix_in_a_batch_and_merge_alone():
    model = make_model()
    for name, seed in (("a", 1), ("b", 2)):
        model.apply_adapter(QALoRAConfig(rank=2, group_size=8, target_modules=("q_proj", "v_proj")), name)
        for _, layer in layers(model, name):
            for _, p in layer.adapters[name].named_parameters():
                p.data = (np.random.default_rng(seed).standard_normal(p.shape) * 0.3).astype(np.float32)
    W = snapshot(model)
    for _, layer in layers(model, "a"):
        assert layer.adapters["a"].quant is layer.adapters["b"].quant is layer.base_layer.group_quant
    ids = np.concatenate([IDS, IDS[:1]])  # 3 rows
    check_mixed_batch(model, ["b", "__base__", "a"], ids)
    model.set_active_adapter("b")
    out = model(IDS).numpy()
    model.merge_adapter()
    assert_close(model(IDS), out, 1e-5, label="b merged alone")
    model.unmerge_adapter()
    assert all(np.array_equal(p, W[n]) for n, p in snapshot(model).items())
    with pytest.raises(ConfigError, match=r"bits, group_size \(for model\.layers\.0\.self_attn\.q_proj\)=\(2, 8\)"):
        model.apply_adapter(QALoRAConfig(rank=2, bits=2, group_size=8, target_modules=("q_proj",)), "c")


@pytest.mark.spec("QALORA-6")
def test_the_count():
    model = make_model()
    model.apply_qalora(rank=2, group_size=8, target_modules=("q_proj", "down_proj"))
    want = sum(2 * (SHAPES[k][1] // 8 + SHAPES[k][0]) for k in ("self_attn.q_proj", "mlp.down_proj")) * 2
    assert model.parameter_counts()[0] == want
    # LLaMA-7B's q_proj (4096 x 4096) at the authors' r = 64, L = 32: 64 (128 + 4096), against LoRA's 64 * 8192
    assert QALoRAConfig(rank=64, group_size=32).trainable_count({"q": (4096, 4096)}, None) == 64 * (128 + 4096)


@pytest.mark.spec("QALORA-6")
@pytest.mark.parametrize("kw,match", [({"rank": 0}, "rank"), ({"alpha": 0}, "alpha"), ({"dropout": 1.0}, "dropout"),
                                      ({"bits": 5}, "bits"), ({"group_size": 0}, "group_size"),
                                      ({"group_size": 2.5}, "group_size"), ({"qalora_group_size": -1}, "group_size")])
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        QALoRAConfig(**kw)


@pytest.mark.spec("QALORA-7")
def test_files_hold_the_pooled_A_and_load_onto_the_float_model_to_the_same_logits(tmp_path):
    model = make_model()
    model.apply_qalora(rank=3, bits=2, group_size=8, target_modules=("q_proj", "down_proj"))
    randomize(model)
    cfg, shapes = saved_and_reloaded(model, tmp_path, make_model, IDS)
    assert cfg["peft_type"] == "MINIPEFT_QALORA"
    assert (cfg["r"], cfg["lora_alpha"], cfg["bits"], cfg["qalora_group_size"]) == (3, 16, 2, 8)
    want = {}
    for path, layer in layers(model, "default"):
        n, m = layer.base_layer.in_features, layer.base_layer.out_features
        want.update({f"base_model.model.{path}.lora_A.weight": (3, n // 8), f"base_model.model.{path}.lora_B.weight": (m, 3)})
    assert shapes == want


@pytest.mark.spec("QALORA-6")
def test_training_moves_A_and_B_only_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_qalora(rank=4, group_size=16)
    start = {n: p.numpy().copy() for n, p in model.net.named_parameters()}
    h = train_next(model, lr=3e-2)
    assert h["loss"][-1] < 0.9 * h["loss"][0]
    moved = {n for n, p in model.net.named_parameters() if not np.array_equal(p.numpy(), start[n])}
    assert moved and all(".lora_A." in n or ".lora_B." in n for n in moved), sorted(moved)[:4]


@pytest.mark.oracle
@pytest.mark.spec("QALORA-3")
def test_peft_use_qalora_forward_is_this_one_times_the_number_of_groups():
    """PEFT 0.21's QALoraLinearVariant.forward on the same A, B: mean pooling times in / L (spec/qalora.md)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft.tuners.lora.variants import QALoraLinearVariant
    model = make_model()
    model.apply_qalora(rank=3, group_size=8, target_modules=("down_proj",))
    randomize(model)
    layer = model.net.get_submodule("model.layers.0.mlp.down_proj")
    d = layer.adapters["default"]
    A, B = (torch.tensor(np.asarray(t.weight.data)) for t in (d.lora_A, d.lora_B))
    lin_A, lin_B = torch.nn.Linear(8, 3, bias=False), torch.nn.Linear(3, 32, bias=False)
    with torch.no_grad():
        lin_A.weight.copy_(A)
        lin_B.weight.copy_(B)
    module = types.SimpleNamespace(lora_A={"default": lin_A}, lora_B={"default": lin_B}, in_features=64,
                                   lora_dropout={"default": torch.nn.Identity()}, scaling={"default": d.s},
                                   qalora_group_size={"default": 8}, training=False)
    x = np.random.default_rng(2).standard_normal((2, 5, 64)).astype(np.float32)
    with torch.no_grad():
        theirs = QALoraLinearVariant.forward(module, "default", torch.tensor(x), torch.zeros(2, 5, 32)).numpy()
    ours = d.adapt(Tensor(x), Tensor(np.zeros((2, 5, 32), np.float32)), layer.base_layer).numpy()
    print(f"\n  PEFT use_qalora / minipeft: {np.abs(theirs).max() / np.abs(ours).max():.4f} (G = 8)")
    assert_close(theirs, ours * 8, 1e-5, label="PEFT = G x minipeft")
