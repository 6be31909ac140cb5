"""spec/multilora.md (MULTILORA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in
NumPy float64 from the spec's formula: dW = Σ_i s_i B_i A_i."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close
from minipeft import backend
from minipeft.adapters.lora import LoRAConfig, LoRALinear
from minipeft.adapters.multilora import MultiLoRAConfig, MultiLoRALinear
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError
from one_layer import check_dropout_forward, check_mixed_batch, random_base, saved_and_reloaded, train_next
from test_dora import SETTINGS, targets
from test_lora import IDS, SHAPES, check_forward_merge_unmerge, layers, make_model, snapshot


def randomize_scales(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, "default"):
        s = layer.adapters["default"].multilora_scaling
        s.data = rng.standard_normal(s.shape).astype(np.float32)


def delta_np(d):
    A, B, s = (np.asarray(t.data, np.float64) for t in (d.multilora_A, d.multilora_B, d.multilora_scaling))
    return sum(s[i] * B[i] @ A[i] for i in range(len(s)))


@pytest.mark.spec("MULTILORA-1", "MULTILORA-4")
@SETTINGS
@given(r=st.integers(1, 6), n=st.integers(1, 5), tm=targets)
def test_forward_and_merge_are_W0_plus_the_sum_of_scaled_modules(r, n, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_multilora(rank=r, num_loras=n, target_modules=tm)
    randomize_scales(model)
    updates = {path + ".weight": delta_np(layer.adapters["default"]) for path, layer in layers(model, "default")}
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("MULTILORA-1")
def test_dropout_is_one_mask_on_the_input_of_every_module():
    model = make_model()
    model.apply_multilora(rank=2, num_loras=3, dropout=0.4, target_modules=("k_proj",))
    randomize_scales(model)
    check_dropout_forward(model, 0.4, delta_np, "multilora dropout")


@pytest.mark.spec("MULTILORA-2")
def test_init_draws_A_and_B_kaiming_uniform_with_zero_scales_and_only_s_moves_first():
    model = make_model()
    base = model(IDS).numpy()
    model.apply_multilora(rank=4, num_loras=3, target_modules="all-linear")
    assert np.array_equal(model(IDS).numpy(), base)  # s = 0: exactly the base
    for _, layer in layers(model, "default"):
        d, n_in = layer.adapters["default"], layer.base_layer.in_features
        A, B, s = (t.numpy() for t in (d.multilora_A, d.multilora_B, d.multilora_scaling))
        assert np.all(s == 0)
        assert np.abs(A).max() <= 1 / np.sqrt(n_in) and np.abs(A).max() > 0.9 / np.sqrt(n_in)
        assert np.abs(B).max() <= 1 / np.sqrt(4) and np.abs(B).max() > 0.9 / np.sqrt(4)
        assert not np.array_equal(A[0], A[1]) and not np.array_equal(B[1], B[2])  # each module its own draw
    model(IDS).sum().backward()
    for n, p in model.net.named_parameters():
        if p.requires_grad:
            peak = np.abs(p.grad).max()
            assert (peak > 0) if n.endswith("multilora_scaling") else (peak == 0), n


@pytest.mark.spec("MULTILORA-2")
def test_the_draws_are_uniform_at_kaimings_bound():
    model = make_model()
    model.apply_multilora(rank=8, num_loras=4, target_modules=("gate_proj", "up_proj"))  # in = 32
    A = np.concatenate([l.adapters["default"].multilora_A.numpy().ravel() for _, l in layers(model, "default")])
    bound = 1 / np.sqrt(32)
    assert abs(A.mean()) < 0.02 * bound and abs(A.std() - bound / np.sqrt(3)) < 0.03 * bound


@pytest.mark.spec("MULTILORA-1")
def test_a_mixed_batch_gives_each_row_its_own_modules():
    model = make_model()
    for name, seed in (("a", 1), ("b", 2)):
        model.apply_adapter(MultiLoRAConfig(rank=2, num_loras=3, target_modules=("q_proj", "down_proj")), name)
        for _, layer in layers(model, name):
            s = layer.adapters[name].multilora_scaling
            s.data = np.random.default_rng(seed).standard_normal(s.shape).astype(np.float32)
    check_mixed_batch(model, ["a", "__base__", "b"], np.concatenate([IDS, IDS[:1]]))


@pytest.mark.spec("MULTILORA-3")
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_one_module_scaled_by_alpha_over_r_is_lora(fan_in_fan_out):
    rng = np.random.default_rng(4)
    base, W0 = random_base(fan_in_fan_out, rng)
    lora = LoRALinear.create(base, LoRAConfig(rank=3, alpha=12), "p", backend.RNG(0))
    lora.lora_B.weight.data = rng.standard_normal(lora.lora_B.weight.shape).astype(np.float32)
    multi = MultiLoRALinear.create(base, MultiLoRAConfig(rank=3, num_loras=1), "p", backend.RNG(1))
    multi.multilora_A.data = lora.lora_A.weight.data[None]
    multi.multilora_B.data = lora.lora_B.weight.data[None]
    multi.multilora_scaling.data = np.array([12 / 3], np.float32)
    x = Tensor(rng.standard_normal((5, 12)).astype(np.float32))
    y = base(x)
    assert_close(multi.adapt(x, y, base), lora.adapt(x, y, base), 1e-6, label="n = 1 is LoRA")
    assert_close(multi.delta_weight(), lora.delta_weight(), 1e-6, label="dW")


@pytest.mark.spec("MULTILORA-5")
def test_the_count_and_the_rank_of_the_sum():
    model = make_model()
    model.apply_multilora(rank=2, num_loras=3, target_modules=("q_proj", "down_proj"))
    randomize_scales(model)
    want = sum(3 * (2 * (SHAPES[k][0] + SHAPES[k][1]) + 1) for k in ("self_attn.q_proj", "mlp.down_proj")) * 2
    assert model.parameter_counts()[0] == want
    for _, layer in layers(model, "default"):
        assert np.linalg.matrix_rank(delta_np(layer.adapters["default"])) == 6  # n r, above one module's r
    assert MultiLoRAConfig(rank=16, num_loras=5).trainable_count({"q": (4096, 4096)}, None) == 5 * (16 * 8192 + 1)


@pytest.mark.spec("MULTILORA-5")
@pytest.mark.parametrize("kw,match", [({"rank": 0}, "rank"), ({"num_loras": 0}, "num_loras"),
                                      ({"num_loras": 2.5}, "num_loras"), ({"dropout": -0.1}, "dropout"),
                                      ({"lora_alpha": 8}, "lora_alpha")])
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        MultiLoRAConfig(**kw)


@pytest.mark.spec("MULTILORA-5")
def test_a_rank_above_a_layer_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"rank \(for model\.layers\.0\.self_attn\.k_proj\).*min\(in=32, out=16\)"):
        make_model().apply_multilora(rank=17, target_modules=("k_proj",))


@pytest.mark.spec("MULTILORA-6")
def test_files_hold_the_stacked_modules_and_load_to_the_same_logits(tmp_path):
    model = make_model()
    model.apply_multilora(rank=3, num_loras=2, target_modules=("q_proj", "k_proj"))
    randomize_scales(model)
    cfg, shapes = saved_and_reloaded(model, tmp_path, make_model, IDS)
    assert cfg["peft_type"] == "MINIPEFT_MULTILORA" and (cfg["r"], cfg["num_loras"]) == (3, 2)
    want = {}
    for path, layer in layers(model, "default"):
        n, m = layer.base_layer.in_features, layer.base_layer.out_features
        key = f"base_model.model.{path}"
        want.update({key + ".multilora_A": (2, 3, n), key + ".multilora_B": (2, m, 3), key + ".multilora_scaling": (2,)})
    assert shapes == want


@pytest.mark.spec("MULTILORA-1")
def test_training_moves_every_factor_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_multilora(rank=4, num_loras=3, target_modules="all-linear")
    start = {n: p.numpy().copy() for n, p in model.net.named_parameters() if p.requires_grad}
    h = train_next(model)
    assert h["loss"][-1] < 0.8 * h["loss"][0]
    moved = {n for n, p in model.net.named_parameters() if n in start and not np.array_equal(p.numpy(), start[n])}
    assert moved == set(start)  # A and B too, once the scales left 0
