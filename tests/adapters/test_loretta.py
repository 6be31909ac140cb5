"""spec/loretta.md (LORETTA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy
float64 from the spec's formula: a TT matrix from its cores by einsum over the rank indices, rep's
dW = s (A B)^T, adp's a(z) = c (f(z D + b_D) U + b_U) on the layer's output or input."""
import dataclasses
import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_close
from minipeft.adapters.loretta import TT_SHAPES, LoRETTAConfig, tt_count, tt_shape
from minipeft.autograd import Tensor
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from one_layer import check_train_moves_every_leaf
from test_dora import SETTINGS, targets
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from tests.test_every_method import directional_gradients

ACTS = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh, "silu": lambda z: z / (1 + np.exp(-z))}


def cores_np(tt):
    return [np.asarray(getattr(tt, str(i)).data, np.float64) for i in range(tt.d)]


def tt_matrix_np(cores, rows, cols):
    """LORETTA-1 rebuilt: T(i_1..i_d) = G_1[i_1] ... G_d[i_d] by one einsum per core, read row-major as (rows, cols)."""
    T = cores[0][0]  # (k_1, r_1)
    for G in cores[1:]:
        T = np.einsum("...a,akb->...kb", T, G)  # (k_1, .., k_i, r_i)
    return T[..., 0].reshape(rows, cols)


def randomize(model, seed=1, scale=0.5):
    rng = np.random.default_rng(seed)
    for _, p in model.net.named_trainable_parameters().items():
        p.data = (rng.standard_normal(p.shape) * scale).astype(np.float32)


def adp_np(d, z):
    """LORETTA-7 rebuilt: c (f(z D + b_D) U + b_U)."""
    D = tt_matrix_np(cores_np(d.adapter_down), d.adapter_down.rows, d.adapter_down.cols)
    U = tt_matrix_np(cores_np(d.adapter_up), d.adapter_up.rows, d.adapter_up.cols)
    bD, bU = (np.asarray(t.bias.data, np.float64) for t in (d.adapter_down, d.adapter_up))
    return d.s * (ACTS[d.non_linearity](z @ D + bD) @ U + bU)


@pytest.mark.spec("LORETTA-1", "LORETTA-5", "LORETTA-6")
@SETTINGS
@given(r=st.integers(1, 6), tensor_rank=st.integers(1, 4), alpha=st.sampled_from([1, 8, 16]), tm=targets)
def test_rep_forward_and_merge_are_W0_plus_s_A_B_transposed(r, tensor_rank, alpha, tm):
    model = make_model()
    W = snapshot(model)
    cfg = LoRETTAConfig(rank=r, tensor_rank=tensor_rank, alpha=alpha, target_modules=tm)
    model.apply_loretta(cfg)
    randomize(model)
    updates = {}
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        A = tt_matrix_np(cores_np(d.lora_A), d.n, r)  # (in, r)
        B = tt_matrix_np(cores_np(d.lora_B), r, d.m)  # (r, out)
        updates[path + ".weight"] = alpha / r * (A @ B).T
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("LORETTA-1", "LORETTA-7")
@pytest.mark.parametrize("f", ["relu", "tanh", "silu"])
@pytest.mark.parametrize("path,input_side", [("model.layers.0.mlp.down_proj", False),
                                             ("model.layers.1.mlp.gate_proj", True)])
def test_adp_is_y_plus_a_of_y_or_W0_of_x_plus_a_of_x(f, path, input_side):
    model = make_model()
    name = path.rsplit(".", 1)[-1]
    model.apply_loretta(variant="adp", bottleneck_size=6, tensor_rank=3, non_linearity=f, scaling=0.7,
                        target_modules=(name,), input_modules=(name,) if input_side else ())
    randomize(model, scale=0.4)
    layer = model.net.get_submodule(path)
    d = layer.adapters["default"]
    W0, b = (np.asarray(t.data, np.float64) for t in (layer.base_layer.weight, layer.base_layer.bias))
    x = np.random.default_rng(2).standard_normal((3, 5, W0.shape[1]))
    want = (x + adp_np(d, x)) @ W0.T + b if input_side else x @ W0.T + b + adp_np(d, x @ W0.T + b)
    assert d.adapter_down.rows == (W0.shape[1] if input_side else W0.shape[0])
    assert_close(layer(Tensor(x.astype(np.float32))), want, 1e-5, label=f"adp {f} input={input_side}")


@pytest.mark.spec("LORETTA-8")
def test_adp_refuses_to_merge_naming_the_layer():
    model = make_model()
    model.apply_loretta(variant="adp", bottleneck_size=4, target_modules=("q_proj",))
    before = model(IDS).numpy()
    with pytest.raises(ConfigError, match=r"LoRETTA_adp at model\.layers\.0\.self_attn\.q_proj: .*non-linearity.*"
                                          r"variant='rep'"):
        model.merge_adapter()
    assert_close(model(IDS), before, 1e-7, label="nothing merged")
    with pytest.raises(ConfigError, match="LoRETTA_adp"):
        model.merge_and_unload()


@pytest.mark.spec("LORETTA-2")
def test_shapes_the_authors_table_the_fallback_and_overrides():
    for q, table in TT_SHAPES.items():
        for size, shape in table.items():
            assert math.prod(shape) == size * q, (q, size)
    assert TT_SHAPES[8][768] == (8, 8, 12, 8) and TT_SHAPES[8][4096] == (16, 16, 8, 4, 4)
    assert TT_SHAPES[64][4096] == (16, 16, 16, 4, 4, 4) and 1024 not in TT_SHAPES[32]  # their 32/1024 multiplies to 16384
    assert tt_shape(32 * 8) == (8, 8, 4) and tt_shape(64 * 8) == (8, 8, 8) and tt_shape(17) == (17,)
    assert tt_shape(11008 * 8) == (43, 8, 8, 8, 4)  # 11008 = 2^8 * 43: LLaMA-2-7B's MLP width, not in their table
    cfg = LoRETTAConfig(rank=8)
    assert cfg.shape_for(768) == (8, 8, 12, 8) and cfg.shape_for(32) == (8, 8, 4)
    assert LoRETTAConfig(rank=8, tensor_shapes={"32": [4, 4, 4, 4]}).shape_for(32) == (4, 4, 4, 4)
    assert LoRETTAConfig(variant="adp", bottleneck_size=64).shape_for(768) == (8, 8, 12, 8, 8)
    model = make_model()
    model.apply_loretta(rank=4, tensor_rank=4, tensor_shapes={32: [2, 4, 4, 4]}, target_modules=("q_proj", "k_proj"))
    d = model.net.get_submodule("model.layers.0.self_attn.k_proj").adapters["default"]  # k_proj (16, 32)
    assert [getattr(d.lora_A, str(i)).shape for i in range(d.lora_A.d)] == [(1, 2, 4), (4, 4, 4), (4, 4, 4), (4, 4, 1)]
    assert d.lora_B.d == len(tt_shape(16 * 4))
    with pytest.raises(ConfigError, match=r"tensor_shapes\['32'\] \(for model\.layers\.0\.self_attn\.q_proj\).*"
                                          r"multiplies to 64, not size \* r = 128"):
        make_model().apply_loretta(rank=4, tensor_shapes={"32": [4, 4, 4]}, target_modules=("q_proj",))


@pytest.mark.spec("LORETTA-3")
def test_counts_of_the_authors_configs():
    rep = LoRETTAConfig(rank=8, tensor_rank=5)  # their README's LoRETTA_rep
    assert tt_count((8, 8, 12, 8), 5) == 580 and rep.trainable_count({"a": (768, 768)}, None) == 1160
    assert 2 * 768 * 8 == 12288  # LoRA at r = 8 on the same layer
    adp = LoRETTAConfig(variant="adp", bottleneck_size=64, tensor_rank=5)  # their README's LoRETTA_adp
    assert adp.trainable_count({"a": (768, 768)}, None) == 2 * 780 + 64 + 768 == 2392
    llama7b = {f"model.layers.{i}.self_attn.{n}": (4096, 4096) for i in range(32) for n in ("q_proj", "v_proj")}
    assert rep.trainable_count(llama7b, None) == 102_400  # LoRA r = 8: 4 194 304
    mlp = {f"model.layers.{i}.mlp.{n}": ((11008, 4096) if n == "down_proj" else (4096, 11008))
           for i in range(32) for n in ("gate_proj", "up_proj", "down_proj")}
    placed = LoRETTAConfig(variant="adp", input_modules=("gate_proj", "up_proj"))  # their llama mapping: size 4096 each
    assert tt_count(TT_SHAPES[64][4096], 5) == 1100 and placed.trainable_count(mlp, None) == 610_560
    for cfg, kw in ((rep, {}), (placed, {"target_modules": ("gate_proj", "up_proj", "down_proj", "q_proj")})):
        model = make_model()
        model.apply_loretta(dataclasses.replace(cfg, **kw))
        sizes = {p: (m.base_layer.in_features, m.base_layer.out_features) for p, m in layers(model, "default")}
        assert model.parameter_counts()[0] == cfg.trainable_count(sizes, None) > 0


@pytest.mark.spec("LORETTA-4")
def test_the_authors_init_gives_entries_of_variance_one_over_P_plus_Q_and_zero_init_gives_the_base():
    model = make_model()
    model.apply_loretta(rank=8, tensor_rank=5, tensor_shapes={"768": [8, 8, 12, 8]}, target_modules=("q_proj",))
    from minipeft import backend
    from minipeft.adapters.loretta import TensorTrain
    rng = backend.RNG(0)
    samples = [tt_matrix_np(cores_np(TensorTrain(768, 8, (8, 8, 12, 8), 5, rng, False, False)), 768, 8)
               for _ in range(40)]
    v = np.var(np.stack(samples))
    assert abs(v * (768 + 8) - 1) < 0.15, v * (768 + 8)  # each entry N(0, 1 / (P + Q)) in distribution
    assert abs(np.mean(np.stack(samples))) < 0.1 / math.sqrt(768 + 8)
    tt = TensorTrain(32, 6, (4, 8, 6), 3, rng, True, False)
    assert [getattr(tt, str(i)).shape for i in range(3)] == [(1, 4, 3), (3, 8, 3), (3, 6, 1)]
    assert np.all(np.abs(tt.bias.data) <= 1 / math.sqrt(6)) and np.std(tt.bias.data) > 0
    base = make_model()(IDS).numpy()
    for variant in ("rep", "adp"):
        moved = make_model()
        moved.apply_loretta(variant=variant, bottleneck_size=8, target_modules=("q_proj", "down_proj"))
        assert np.abs(moved(IDS).numpy() - base).max() > 1e-3  # the authors' init: dW != 0
        zero = make_model()
        zero.apply_loretta(variant=variant, bottleneck_size=8, zero_init=True, target_modules=("q_proj", "down_proj"))
        assert np.array_equal(zero(IDS).numpy(), base)
        zero(IDS).sum().backward()
        for _, layer in layers(zero, "default"):
            last = layer.adapters["default"].lora_B if variant == "rep" else layer.adapters["default"].adapter_up
            assert np.abs(getattr(last, str(last.d - 1)).grad).max() > 0


@pytest.mark.spec("LORETTA-9")
@pytest.mark.parametrize("kw", [dict(variant="adp", bottleneck_size=5, non_linearity="tanh", target_modules=("q_proj", "up_proj"),
                                     input_modules=("up_proj",), dropout=0.0),
                                dict(variant="rep", rank=3, tensor_rank=2, target_modules=("v_proj", "down_proj"))])
def test_only_the_cores_and_biases_train_and_their_gradients_equal_finite_differences(kw):
    model = make_model()
    model.apply_loretta(**kw)
    model(IDS).sum().backward()
    trained = model.net.named_trainable_parameters()
    assert trained and all(".adapters.default." in n and n.rsplit(".", 2)[-2] in ("lora_A", "lora_B", "adapter_down",
                                                                                    "adapter_up") for n in trained)
    assert all(np.abs(p.grad).max() > 0 for p in trained.values())
    for p in trained.values():
        p.grad = None  # directional_gradients reads the gradient of its own backward
    randomize(model, scale=0.3)
    for analytic, numeric in directional_gradients(model):
        assert abs(analytic - numeric) <= 1e-6 + 1e-5 * abs(numeric), (analytic, numeric)


@pytest.mark.spec("LORETTA-9")
@pytest.mark.parametrize("kw,match", [({"variant": "tt"}, "variant"), ({"rank": 0}, "rank"),
                                      ({"bottleneck_size": -1}, "bottleneck_size"), ({"tensor_rank": 0}, "tensor_rank"),
                                      ({"tensor_rank": 2.5}, "tensor_rank"), ({"alpha": 0}, "alpha"),
                                      ({"scaling": 0.0}, "scaling"), ({"dropout": 1.0}, "dropout"),
                                      ({"non_linearity": "softplus"}, "non_linearity"),
                                      ({"input_modules": ["up_proj"]}, "input_modules.*only variant 'adp'"),
                                      ({"tensor_shapes": {"32": [4, 0]}}, r"tensor_shapes\['32'\]"),
                                      ({"tensor_shapes": {"x": [4, 8]}}, r"tensor_shapes\['x'\]"),
                                      ({"tensor_rnak": 3}, "did you mean tensor_rank")])
def test_bad_configs_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        LoRETTAConfig(**kw)


@pytest.mark.spec("LORETTA-10")
@pytest.mark.parametrize("variant", ["rep", "adp"])
def test_files_hold_the_cores_and_load_back_bit_for_bit(variant, tmp_path):
    model = make_model()
    model.apply_loretta(variant=variant, rank=4, bottleneck_size=6, tensor_rank=3, target_modules=("q_proj", "gate_proj"),
                        input_modules=("gate_proj",) if variant == "adp" else ())
    randomize(model)
    out = model(IDS).numpy()
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MINIPEFT_LORETTA" and (cfg["variant"], cfg["tensor_rank"]) == (variant, 3)
    assert cfg["input_modules"] == (["gate_proj"] if variant == "adp" else [])
    tensors, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    want = {}
    for p, layer in layers(model, "default"):
        d = layer.adapters["default"]
        for leaf in ("lora_A", "lora_B") if variant == "rep" else ("adapter_down", "adapter_up"):
            tt = getattr(d, leaf)
            want.update({f"base_model.model.{p}.{leaf}.{i}": getattr(tt, str(i)).shape for i in range(tt.d)})
            if variant == "adp":
                want[f"base_model.model.{p}.{leaf}.bias"] = (tt.cols,)
    assert {k: v.shape for k, v in tensors.items()} == want
    again = make_model()
    again.load_adapters(str(tmp_path))
    mine = model.net.named_trainable_parameters()
    assert all(np.array_equal(p.data, mine[n].data) for n, p in again.net.named_trainable_parameters().items())
    assert_close(again(IDS), out, 1e-6, label="reloaded")


@pytest.mark.oracle
@pytest.mark.spec("LORETTA-10")
def test_peft_refuses_the_folder_naming_its_type(tmp_path):
    peft = pytest.importorskip("peft")
    model = make_model()
    model.apply_loretta(variant="adp", bottleneck_size=4)
    model.save_adapters(str(tmp_path))
    with pytest.raises(KeyError, match="MINIPEFT_LORETTA"):
        peft.PeftConfig.from_pretrained(str(tmp_path))


@pytest.mark.spec("LORETTA-5", "LORETTA-7", "LORETTA-9")
@pytest.mark.parametrize("kw", [dict(variant="rep"), dict(variant="adp", bottleneck_size=16, zero_init=True,
                                                         target_modules=("gate_proj", "up_proj", "down_proj"),
                                                         input_modules=("gate_proj", "up_proj"))])
def test_model_train_lowers_the_loss_and_moves_every_core(kw):
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_loretta(**kw)
    check_train_moves_every_leaf(model, lr=3e-2)


@pytest.mark.spec("LORETTA-7", "LORETTA-10")
def test_cli_trains_the_adp_variant_and_reloads_it(tmp_path, capsys):
    from minipeft.cli import main
    data = tmp_path / "next.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"next {w} =", "completion": " " + "".join(chr(ord(c) + 1) for c in w)})
                            + "\n" for w in ["abc", "cat", "dog", "pen"]))
    out = tmp_path / "adp"
    assert main(["train", "--model", mp.DEMO_MODEL, "--data", str(data), "--output", str(out), "--method", "loretta",
                 "--set", "variant=adp", "--set", "bottleneck_size=8", "--target-modules", "down_proj",
                 "--max-steps", "2", "--batch-size", "2", "--lr", "1e-2"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["variant"] == "adp"
    model = mp.load_model(mp.DEMO_MODEL)
    model.load_adapters(str(out))
    assert model.peft_configs["default"].variant == "adp" and model.peft_configs["default"].bottleneck_size == 8
