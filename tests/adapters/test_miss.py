"""spec/miss.md (MISS-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy float64
from the spec's formulas (the shared block tiled over the input's shards; bat's W_ij D_i + D_i block by block);
and (oracle) against PEFT's MISS on Llama in every mode."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import assert_training_lowers_the_loss, max_rel_err
from minipeft.adapters.miss import MiSSConfig
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import IDS as IDS_P
from test_peft_oracle import (base, check_peft_case, check_step_gradients, hf_logits, hf_model,  # noqa: F401
                              lib, perturbed_peft_model, report)

DIVISORS = st.sampled_from([1, 2, 4, 8, 16])  # divide every width of the tiny llama (16, 32, 64)


def randomize(model, seed=1, scale=0.2):
    rng = np.random.default_rng(seed)
    for _, layer in layers(model, "default"):
        d = layer.adapters["default"]
        d.miss_block.data = (rng.standard_normal(d.miss_block.shape) * scale).astype(np.float32)


def update_np(W0, D, mode):
    """dW (out, in) in float64 from the spec: MISS-1 (shards share D+^T) or MISS-2 (bat, block by block)."""
    W0, D = np.asarray(W0, np.float64), np.asarray(D, np.float64)
    m, n = W0.shape
    if mode == "bat":
        r = D.shape[-1]
        dW = np.zeros_like(W0)
        for i in range(m // r):
            for j in range(n // r):
                Wij = W0[i * r:(i + 1) * r, j * r:(j + 1) * r]
                dW[i * r:(i + 1) * r, j * r:(j + 1) * r] = Wij @ D[i] + D[i]
        return dW
    Dp = np.tile(D, (1, m // D.shape[1])) if mode == "mini" else D  # (r, out)
    r = Dp.shape[0]
    return np.concatenate([Dp.T] * -(-n // r), axis=1)[:, :n]


def check_against_the_formula(model, W, mode):
    updates = {p + ".weight": update_np(W[p + ".weight"], layer.adapters["default"].miss_block.data, mode)
               for p, layer in layers(model, "default")}
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("MISS-1", "MISS-4")
@SETTINGS
@given(r=st.integers(1, 12), mode=st.sampled_from(["default", "random", "mini"]), mini_r=DIVISORS, tm=targets)
def test_forward_and_merge_add_the_shared_block_to_every_shard(r, mode, mini_r, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_miss(rank=r, init=mode, mini_r=mini_r, target_modules=tm)  # r = 5, 7, 9 ... leave a remainder
    randomize(model)
    check_against_the_formula(model, W, mode)


@pytest.mark.spec("MISS-2", "MISS-4")
@SETTINGS
@given(r=DIVISORS, tm=targets)
def test_bat_forward_and_merge_are_the_blockwise_affine_update(r, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_miss(rank=r, init="bat", target_modules=tm)
    randomize(model)
    check_against_the_formula(model, W, "bat")
    model.merge_adapter()
    model.unmerge_adapter()
    for path, layer in layers(model, "default"):  # MISS-4: bat's kept W0 comes back bit for bit
        assert np.array_equal(layer.base_layer.weight.data, W[path + ".weight"])


@pytest.mark.spec("MISS-1")
@SETTINGS
@given(r=st.integers(1, 9), n=st.integers(9, 40), m=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_the_shard_update_has_rank_at_most_r_and_equals_the_padded_forward(r, n, m, seed):
    rng = np.random.default_rng(seed)
    D, x = rng.standard_normal((r, m)), rng.standard_normal((3, n))
    dW = update_np(np.zeros((m, n)), D, "default")
    assert np.linalg.matrix_rank(dW) <= r
    padded = np.concatenate([x, np.zeros((3, -n % r))], axis=1)  # PEFT's F.pad, then the sum of the shards
    assert np.allclose(padded.reshape(3, -1, r).sum(axis=1) @ D, x @ dW.T)


@pytest.mark.spec("MISS-4")
@SETTINGS
@given(r=st.sampled_from([1, 2, 3, 4]), blocks=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_peft_s_inverse_unmerge_gives_the_same_W0(r, blocks, seed):
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((r * blocks, r * 2))
    D = rng.standard_normal((blocks, r, r)) * 0.3
    W = W0 + update_np(W0, D, "bat")
    back = W.copy()
    for i in range(blocks):
        rows = slice(i * r, (i + 1) * r)
        back[rows] = (W[rows].reshape(r, 2, r) - D[i][:, None, :]).reshape(r, 2 * r)
        for j in range(2):
            cols = slice(j * r, (j + 1) * r)
            back[rows, cols] = back[rows, cols] @ np.linalg.inv(np.eye(r) + D[i])
    assert np.allclose(back, W0, atol=1e-9)


@pytest.mark.spec("MISS-3")
@pytest.mark.parametrize("kw", [dict(rank=5), dict(rank=4, init="bat"), dict(rank=3, init="mini", mini_r=8)])
def test_zero_inits_give_exactly_the_base(kw):
    model = make_model()
    before = model(IDS).numpy()
    model.apply_miss(target_modules=("q_proj", "v_proj", "down_proj"), **kw)
    assert np.array_equal(model(IDS).numpy(), before)
    assert all(np.all(layer.adapters["default"].miss_block.data == 0) for _, layer in layers(model, "default"))


@pytest.mark.spec("MISS-3")
def test_random_init_is_kaiming_uniform_on_r_by_out():
    model = make_model()
    before = model(IDS).numpy()
    model.apply_miss(rank=8, init="random", target_modules=("up_proj",))  # out 64
    D = np.concatenate([np.asarray(m.adapters["default"].miss_block.data).ravel() for _, m in layers(model, "default")])
    assert np.abs(D).max() <= 1 / 8 and np.abs(D).max() > 0.9 / 8 and abs(D.mean()) < 0.02
    assert max_rel_err(model(IDS), before) > 1e-3


@pytest.mark.spec("MISS-5")
@pytest.mark.parametrize("kw, per_layer", [
    (dict(rank=4), lambda n, m: 4 * m), (dict(rank=4, init="bat"), lambda n, m: 4 * m),
    (dict(rank=3, init="mini", mini_r=8), lambda n, m: 3 * 8)])
def test_only_the_block_trains_and_the_count_is_the_spec_s(kw, per_layer):
    model = make_model()
    model.apply_miss(target_modules=("q_proj", "v_proj", "down_proj"), **kw)
    randomize(model)
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(".miss_block") for n in trained)
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in trained.values())
    sizes = [(layer.base_layer.in_features, layer.base_layer.out_features) for _, layer in layers(model, "default")]
    assert model.parameter_counts()[0] == sum(per_layer(n, m) for n, m in sizes)


@pytest.mark.spec("MISS-5")
@pytest.mark.parametrize("kwargs, field", [(dict(rank=0), "rank"), (dict(mini_r=0), "mini_r"),
                                           (dict(dropout=1.0), "dropout"), (dict(init="pissa"), "init"),
                                           (dict(bias="lora"), "bias")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        MiSSConfig(**kwargs)


@pytest.mark.spec("MISS-5")
@pytest.mark.parametrize("kw, match", [
    (dict(rank=33, target_modules=("q_proj",)), r"rank \(for model.layers.0.self_attn.q_proj\)=33.*in_features 32"),
    (dict(rank=3, init="bat", target_modules=("q_proj",)), "r must divide in_features 32 and out_features 32"),
    (dict(rank=32, init="bat", target_modules=("v_proj",)), "out_features 16"),
    (dict(rank=2, init="mini", mini_r=3, target_modules=("v_proj",)), r"mini_r \(for .*v_proj\)=3.*out_features 16")])
def test_shapes_peft_refuses_are_config_errors_naming_the_layer(kw, match):
    model = make_model()
    before = model(IDS).numpy()
    with pytest.raises(ConfigError, match=match):
        model.apply_miss(**kw)
    assert np.array_equal(model(IDS).numpy(), before)


@pytest.mark.spec("MISS-5")
def test_gpt2_conv1d_and_a_4bit_base_are_refused():
    from minipeft.adapters.miss import MiSSLinear

    class Conv1DLike:
        fan_in_fan_out, in_features, out_features = True, 8, 8
    with pytest.raises(ConfigError, match="Conv1D"):
        MiSSLinear.create(Conv1DLike(), MiSSConfig(rank=2), "h.0.attn.c_attn", None)
    model = mp.load_model(mp.DEMO_MODEL, quantization=mp.QuantizationConfig(compute_dtype="float32"))
    with pytest.raises(ConfigError, match="float Linear"):
        model.apply_miss(rank=8)


@pytest.mark.spec("MISS-1", "MISS-2", "MISS-5")
@pytest.mark.parametrize("kw", [dict(rank=8), dict(rank=8, init="bat")])
def test_model_train_lowers_the_loss(kw):
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_miss(**kw)
    assert_training_lowers_the_loss(model)


@pytest.mark.spec("MISS-6")
@pytest.mark.parametrize("kw, shape, init_weights", [
    (dict(rank=4, init="bat"), (8, 4, 4), "bat"), (dict(rank=3, init="mini", mini_r=8), (3, 8), "mini"),
    (dict(rank=5, init="random", dropout=0.1, bias="miss_only"), (5, 32), False)])
def test_saved_keys_and_fields_are_peft_names(tmp_path, kw, shape, init_weights):
    model = make_model()
    model.apply_miss(target_modules=("q_proj",), **kw)
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "MISS" and cfg["r"] == kw["rank"] and cfg["init_weights"] == init_weights
    assert cfg["mini_r"] == kw.get("mini_r", 1) and cfg["miss_dropout"] == kw.get("dropout", 0.0)
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    want = {f"base_model.model.model.layers.{i}.self_attn.q_proj.miss_block": shape for i in (0, 1)}
    if kw.get("bias") == "miss_only":  # the adapted layers' biases train and are saved
        want.update({f"base_model.model.model.layers.{i}.self_attn.q_proj.base_layer.bias": (32,) for i in (0, 1)})
    assert {k: v.shape for k, v in keys.items()} == want
    assert MiSSConfig.from_peft(dict(cfg, init_weights=True)).init == "default"


# ---- against PEFT (test_peft_oracle.py's tiny random Llama, every trainable tensor perturbed) ------------------
TM = ["q_proj", "v_proj", "down_proj"]  # in 32, 32, 64; out 32, 16, 32
CASES = {"default": ("llama", dict(r=4, target_modules=TM)),
         "remainder": ("llama", dict(r=5, target_modules=TM)),  # 32 % 5 = 2, 64 % 5 = 4: the padded shard
         "random": ("llama", dict(r=6, init_weights=False, target_modules=TM)),
         "bat": ("llama", dict(r=4, init_weights="bat", target_modules=TM)),
         "mini": ("llama", dict(r=3, init_weights="mini", mini_r=8, target_modules=TM)),
         "bias": ("llama", dict(r=4, bias="MiSS_only", miss_dropout=0.1, target_modules=["q_proj", "k_proj"]))}


@pytest.mark.oracle
@pytest.mark.spec("MISS-1", "MISS-2", "MISS-4", "MISS-5", "MISS-6")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, tmp_path, case):
    check_peft_case(lib, base, CASES[case], "MissConfig", MiSSConfig, tmp_path, f"MiSS {case}")  # every tensor moved


@pytest.mark.oracle
@pytest.mark.spec("MISS-1", "MISS-2")
@pytest.mark.parametrize("case", ["remainder", "bat", "mini"])
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    pm = perturbed_peft_model(lib, base, CASES[case], "MissConfig").eval()
    check_step_gradients(lib, pm, base(CASES[case][0]), tmp_path, "miss_block", f"MiSS {case}")


@pytest.mark.oracle
@pytest.mark.spec("MISS-3")
@pytest.mark.parametrize("case", ["default", "bat", "mini"])
def test_init_is_the_base_in_both(lib, base, case):
    peft, (kind, kw) = lib[2], CASES[case]
    hf = peft.get_peft_model(hf_model(lib, base(kind)), peft.MissConfig(task_type="CAUSAL_LM", **kw)).eval()
    with hf.disable_adapter():
        want = hf_logits(lib, hf)
    report(f"MiSS {case} PEFT init vs base", max_rel_err(hf_logits(lib, hf), want))
    model = mp.load_model(base(kind))
    model.apply_adapter(MiSSConfig.from_peft(dict(peft_type="MISS", **kw)))
    report(f"MiSS {case} minipeft init vs base", max_rel_err(model(IDS_P), want))
    assert model.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)


@pytest.mark.oracle
@pytest.mark.spec("MISS-5")
@pytest.mark.parametrize("kind, kw, error", [
    ("llama", dict(r=3, init_weights="bat", target_modules=["q_proj"]), ValueError),
    ("llama", dict(r=2, init_weights="mini", mini_r=3, target_modules=["v_proj"]), ValueError),
    ("llama", dict(r=33, target_modules=["q_proj"]), ValueError),
    ("gpt2", dict(r=4, target_modules=["c_attn"]), TypeError)])
def test_what_peft_refuses_minipeft_refuses(lib, base, kind, kw, error):
    peft = lib[2]
    with pytest.raises(error):
        peft.get_peft_model(hf_model(lib, base(kind)), peft.MissConfig(task_type="CAUSAL_LM", **kw))
    with pytest.raises(ConfigError):
        mp.load_model(base(kind)).apply_adapter(MiSSConfig.from_peft(dict(peft_type="MISS", **kw)))
