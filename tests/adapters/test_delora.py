"""spec/delora.md (DELORA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy
float64 from the spec's formula dW = (lambda / r) B diag(1 / (|a_i| |b_i|)) A diag(w); and (oracle) against PEFT's
DELORA on Llama."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from helpers import max_rel_err
from minipeft.adapters.delora import EPS, DeLoRAConfig, FlooredNorm
from minipeft.autograd.gradcheck import gradcheck
from minipeft.autograd.tensor import Tensor
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS, targets
from test_hira import randomize  # every leaf of every layer ~ N(0, scale²)
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import (base, check_both_ways_and_merged, check_step_gradients, hf_model, lib,  # noqa: F401
                              perturbed_peft_model, report_init_is_base)


def update_np(W0, d):
    """DELORA-1 in float64 from the spec: (lambda / r) B diag(1 / (|a_i| |b_i|)) A diag(||W0[:, k]||)."""
    A, B, lam = (np.asarray(t.data, np.float64) for t in (d.delora_A, d.delora_B, d.delora_lambda))
    an = np.maximum(np.linalg.norm(A, axis=1), EPS)
    bn = np.maximum(np.linalg.norm(B, axis=0), EPS)
    w = np.linalg.norm(W0.astype(np.float64), axis=0)
    return (B * (lam[0] / A.shape[0] / (an * bn))) @ A * w


@pytest.mark.spec("DELORA-1", "DELORA-4", "DELORA-6")
@SETTINGS
@given(r=st.integers(1, 8), lam=st.floats(0.1, 20), tm=targets)
def test_forward_and_merge_are_W0_plus_the_normalised_update(r, lam, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_delora(rank=r, delora_lambda=lam, target_modules=tm)
    randomize(model)
    updates = {p + ".weight": update_np(W[p + ".weight"], layer.adapters["default"])
               for p, layer in layers(model, "default")}
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("DELORA-2")
def test_the_floored_norm_and_its_gradient_against_float64_finite_differences():
    rng = np.random.default_rng(0)
    M = rng.standard_normal((5, 4))
    M[:, 1] *= 1e-6  # one column below eps: the constant eps, no gradient
    for axis in (0, 1):
        y = FlooredNorm.apply(Tensor(M), axis=axis, eps=EPS).data
        assert np.allclose(y, np.maximum(np.linalg.norm(M, axis=axis), EPS), rtol=1e-12)
        gradcheck(lambda t, axis=axis: (FlooredNorm.apply(t, axis=axis, eps=EPS) * Tensor(np.arange(1.0, 1 + M.shape[1 - axis])))
                  .sum(), [Tensor(M, requires_grad=True)], eps=1e-9)
    t = Tensor(M, requires_grad=True)
    FlooredNorm.apply(t, axis=0, eps=EPS).sum().backward()
    assert np.all(t.grad[:, 1] == 0) and np.all(t.grad[:, 0] != 0)


@pytest.mark.spec("DELORA-3")
@SETTINGS
@given(r=st.integers(1, 8), lam=st.floats(0.1, 20), seed=st.integers(0, 2**16))
def test_the_update_over_the_column_norms_is_bounded_by_lambda(r, lam, seed):
    model = make_model()
    W = snapshot(model)
    model.apply_delora(rank=r, delora_lambda=lam, target_modules=("q_proj", "down_proj"))
    randomize(model, seed=seed, scale=float(np.random.default_rng(seed).uniform(0.01, 3)))
    for p, layer in layers(model, "default"):
        d = layer.adapters["default"]
        d.delora_lambda.data = np.asarray([lam], np.float32)
        w = np.linalg.norm(W[p + ".weight"].astype(np.float64), axis=0)
        ratio = np.linalg.norm(np.asarray(d.delta_weight(), np.float64) / w)
        assert ratio <= lam * (1 + 1e-5)
        if r == 1:  # one unit rank-1 term: the bound is reached
            assert abs(ratio - lam) < 1e-4 * lam


@pytest.mark.spec("DELORA-5")
def test_inits_draw_from_the_stated_distributions():
    model = make_model()
    base_logits = model(IDS).numpy()
    model.apply_delora(rank=4, target_modules=("q_proj", "up_proj"))
    assert np.array_equal(model(IDS).numpy(), base_logits)  # B = 0: exactly the base
    for path, layer in layers(model, "default"):
        d, n = layer.adapters["default"], layer.base_layer.in_features
        A = np.asarray(d.delora_A.data)
        assert np.all(d.delora_B.data == 0) and np.abs(A).max() <= 1 / np.sqrt(n) and np.abs(A).max() > 0.8 / np.sqrt(n)
        assert d.delora_lambda.data.tolist() == [15.0]
        assert np.allclose(d.w_norm[0].data, np.linalg.norm(np.asarray(layer.base_layer.weight.data), axis=0))
    rnd = make_model()
    rnd.apply_delora(rank=8, init="random", target_modules=("up_proj",))
    B = np.concatenate([np.asarray(m.adapters["default"].delora_B.data).ravel() for _, m in layers(rnd, "default")])
    assert np.abs(B).max() <= 1 / np.sqrt(8) and np.abs(B).max() > 0.8 / np.sqrt(8)
    assert max_rel_err(rnd(IDS), base_logits) > 1e-3


@pytest.mark.spec("DELORA-5", "DELORA-7")
def test_at_init_only_B_has_a_gradient_and_every_leaf_trains_after():
    model = make_model()
    model.apply_delora(rank=4, target_modules=("q_proj", "v_proj"))
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".delora_A", ".delora_B", ".delora_lambda")) for n in trained)
    for n, p in trained.items():  # B = 0: A and lambda move nothing yet (and |b_i| = eps is a constant)
        assert (np.abs(p.grad).max() > 0) == n.endswith(".delora_B"), n
    moved = make_model()
    moved.apply_delora(rank=4, target_modules=("q_proj", "v_proj"))
    randomize(moved)
    moved(IDS).sum().backward()
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in moved.net.parameters() if p.requires_grad)


@pytest.mark.spec("DELORA-7")
def test_count_and_patterns():
    model = make_model()
    model.apply_delora(rank=4, target_modules=("q_proj", "v_proj"), rank_pattern={"v_proj": 2},
                       lambda_pattern={"q_proj": 3.0})
    # q_proj (32 -> 32) at r = 4, v_proj (32 -> 16) at r = 2, two layers, one lambda each
    assert model.parameter_counts()[0] == 2 * (4 * (32 + 32) + 1 + 2 * (32 + 16) + 1)
    for path, layer in layers(model, "default"):
        d = layer.adapters["default"]
        assert (d.delora_A.shape[0], float(d.delora_lambda.data[0])) == ((4, 3.0) if "q_proj" in path else (2, 15.0))


@pytest.mark.spec("DELORA-7")
@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=0), "rank"), (dict(delora_lambda=0), "delora_lambda"), (dict(module_dropout=1.0), "module_dropout"),
    (dict(init="pissa"), "init"), (dict(bias="lora_only"), "bias"), (dict(rank_pattern={"q": 0}), "rank_pattern"),
    (dict(lambda_pattern={"q": -1.0}), "lambda_pattern"), (dict(fan_in_fan_out=True), "fan_in_fan_out")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        DeLoRAConfig(**kwargs)


@pytest.mark.spec("DELORA-7")
def test_conv1d_and_a_4bit_base_are_refused():
    model = mp.load_model(mp.DEMO_MODEL, quantization=mp.QuantizationConfig(compute_dtype="float32"))
    with pytest.raises(ConfigError, match="nn.Linear only"):
        model.apply_delora(rank=2)


@pytest.mark.spec("DELORA-8")
def test_saved_keys_and_fields_are_peft_names_and_w_norm_comes_from_the_file(tmp_path):
    model = make_model()
    model.apply_delora(rank=4, module_dropout=0.1, target_modules=("q_proj",), lambda_pattern={"q_proj": 2})
    randomize(model)
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "DELORA" and cfg["r"] == 4 and cfg["delora_lambda"] == 15
    assert cfg["init_weights"] is True and cfg["module_dropout"] == 0.1 and cfg["lambda_pattern"] == {"q_proj": 2}
    assert "fan_in_fan_out" not in cfg
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in keys.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.q_proj.delora_{m}": s for i in (0, 1)
        for m, s in (("A", (4, 32)), ("B", (32, 4)), ("lambda", (1,)), ("w_norm", (32,)))}
    assert DeLoRAConfig.from_peft(dict(cfg, init_weights=False)).init == "random"
    other = make_model(seed=5)  # another base: its own column norms differ, the file's are used
    other.load_adapters(str(tmp_path))
    for (p, layer), (_, mine) in zip(layers(other, "default"), layers(model, "default")):
        assert np.array_equal(layer.adapters["default"].w_norm[0].data, mine.adapters["default"].w_norm[0].data)


# ---- against PEFT (test_peft_oracle.py's tiny random Llama, every delora_A, delora_B, delora_lambda moved) ---------
CASES = {"plain": ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
         "patterns": ("llama", dict(r=4, delora_lambda=3, target_modules=["q_proj", "v_proj", "down_proj"],
                                    rank_pattern={"down_proj": 2}, lambda_pattern={"v_proj": 7})),
         "random": ("llama", dict(r=2, init_weights=False, bias="delora_only", target_modules=["q_proj", "k_proj"]))}


def peft_model(lib, base, case, move_w_norm=False):
    pm = perturbed_peft_model(lib, base, CASES[case], "DeloraConfig").eval()
    if move_w_norm:  # a buffer, not trained: moved so that reading it from the file (not recomputing it) shows
        torch = lib[0]
        moved = [n for n, b in pm.named_buffers() if "delora_w_norm" in n]
        assert len(moved) == 6  # 3 targets x 2 layers
        with torch.no_grad():
            for n, b in pm.named_buffers():
                if "delora_w_norm" in n:
                    b.mul_(1.5)
    return pm


@pytest.mark.oracle
@pytest.mark.spec("DELORA-1", "DELORA-4", "DELORA-6", "DELORA-7", "DELORA-8")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    pm = peft_model(lib, base, case, move_w_norm=case == "patterns")
    count = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    check_both_ways_and_merged(lib, pm, base(CASES[case][0]), tmp_path, f"DeLoRA {case}")
    model = mp.load_model(base(CASES[case][0]))
    model.load_adapters(str(tmp_path / "peft"))  # PEFT's folder, as check_both_ways_and_merged saved it
    assert type(model.peft_configs["default"]) is DeLoRAConfig
    assert model.parameter_counts()[0] == count


@pytest.mark.oracle
@pytest.mark.spec("DELORA-2", "DELORA-4")
@pytest.mark.parametrize("case", ["plain", "patterns"])
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    check_step_gradients(lib, peft_model(lib, base, case), base(CASES[case][0]), tmp_path,
                         "delora_A|delora_B|delora_lambda", f"DeLoRA {case}")


@pytest.mark.oracle
@pytest.mark.spec("DELORA-5", "DELORA-7")
def test_peft_default_init_is_the_base_and_gpt2_is_refused_by_both(lib, base):
    peft, (kind, kw) = lib[2], CASES["plain"]
    hf, model, _ = report_init_is_base(lib, base(kind), "DeloraConfig", kw,
                                    DeLoRAConfig.from_peft(dict(peft_type="DELORA", **kw)), "DeLoRA")
    assert model.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
    gpt2_kw = dict(r=4, target_modules=["c_attn"])
    with pytest.raises(TypeError, match="only `torch.nn.Linear`"):
        peft.get_peft_model(hf_model(lib, base("gpt2")), peft.DeloraConfig(task_type="CAUSAL_LM", **gpt2_kw))
    with pytest.raises(ConfigError, match="nn.Linear only"):
        mp.load_model(base("gpt2")).apply_adapter(DeLoRAConfig.from_peft(dict(peft_type="DELORA", **gpt2_kw)))
