"""spec/unilora.md (UNILORA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy from the
spec's rule (one flat slot list over every layer's A and B, a balanced seeded index map, scales 1 / sqrt(count)); and
(oracle) against PEFT's UNILORA on Llama and GPT-2's Conv1D, with and without save_indices."""
import json
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import max_rel_err
import minipeft as mp
from minipeft.adapters.unilora import UniLoRAConfig, index_map
from minipeft.errors import CheckpointError, ConfigError
from minipeft.safetensors_io import read_safetensors, write_safetensors
from one_layer import check_refuses_a_4bit_base, train_next
from test_dora import SETTINGS, targets
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import (base, check_peft_case, lib,  # noqa: F401
                              perturbed_peft_model, report_gradients_from_peft)


def randomize(model, seed=1, scale=0.3):
    """theta (shared by every layer) ~ N(0, scale²)."""
    theta = model.shared_tensors["default"]["unilora_theta_d"]
    theta.data = (np.random.default_rng(seed).standard_normal(theta.shape) * scale).astype(np.float32)


def slots_np(model):
    """UNILORA-1/2 from the spec: the flat slots of every layer (module order, A then B, row-major), the index map
    drawn the spec's way, and each slot's value theta[idx] / sqrt(count)."""
    cfg = model.peft_configs["default"]
    theta = np.asarray(model.shared_tensors["default"]["unilora_theta_d"].data, np.float64)
    shapes = [((cfg.rank, l.base_layer.in_features), (l.base_layer.out_features, cfg.rank))
              for _, l in layers(model, "default")]
    D = sum(a[0] * a[1] + b[0] * b[1] for a, b in shapes)
    g = np.random.default_rng(cfg.proj_seed)
    idx = np.repeat(np.arange(cfg.theta_d_length), D // cfg.theta_d_length)
    if D % cfg.theta_d_length:
        idx = np.concatenate([idx, g.choice(cfg.theta_d_length, D % cfg.theta_d_length, replace=False)])
    g.shuffle(idx)
    count = np.bincount(idx, minlength=cfg.theta_d_length)
    return theta, idx, theta[idx] / np.sqrt(count[idx]), shapes


@pytest.mark.spec("UNILORA-1", "UNILORA-2", "UNILORA-3", "UNILORA-5")
@SETTINGS
@given(r=st.integers(1, 6), d=st.integers(1, 3000), seed=st.integers(0, 2**16), tm=targets)
def test_forward_and_merge_are_B_A_read_from_theta(r, d, seed, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_unilora(rank=r, theta_d_length=d, proj_seed=seed, target_modules=tm)
    randomize(model)
    _, _, values, shapes = slots_np(model)
    updates, t = {}, 0
    for (p, layer), (sa, sb) in zip(layers(model, "default"), shapes):
        A = values[t:t + sa[0] * sa[1]].reshape(sa)
        B = values[t + A.size:t + A.size + sb[0] * sb[1]].reshape(sb)
        t += A.size + B.size
        updates[p + ".weight"] = B @ A
        assert np.allclose(layer.adapters["default"].delta_weight(), B @ A, rtol=1e-5, atol=1e-6)
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("UNILORA-1", "UNILORA-2")
@SETTINGS
@given(D=st.integers(0, 5000), d=st.integers(1, 700), seed=st.integers(0, 2**32 - 1))
def test_the_map_is_balanced_and_the_projection_an_isometry(D, d, seed):
    idx = index_map(D, d, seed)
    count = np.bincount(idx, minlength=d)
    assert idx.shape == (D,) and count.sum() == D and count.max() - count.min() <= 1  # floor(D/d) or ceil(D/d)
    assert np.array_equal(idx, index_map(D, d, seed))  # the seed decides it
    theta = np.random.default_rng(seed % 1000).standard_normal(d)
    slots = theta[idx] / np.sqrt(count[idx])
    used = count > 0
    assert np.isclose(slots @ slots, theta[used] @ theta[used])  # ||P theta|| = ||theta|| on the used entries


@pytest.mark.spec("UNILORA-4")
def test_inits_draw_from_the_stated_distributions():
    model = make_model()
    base_logits = model(IDS).numpy()
    model.apply_unilora(theta_d_length=4000, init_theta_d_bound=0.05, target_modules=("q_proj", "up_proj"))
    theta = np.asarray(model.shared_tensors["default"]["unilora_theta_d"].data)
    assert 0.045 < np.abs(theta).max() <= 0.05 and abs(theta.mean()) < 0.005
    assert max_rel_err(model(IDS), base_logits) > 1e-7  # dW = B A != 0 at step 0, as PEFT's
    rnd = make_model()
    rnd.apply_unilora(theta_d_length=4000, init="random", target_modules=("up_proj",))
    t = np.asarray(rnd.shared_tensors["default"]["unilora_theta_d"].data)
    assert 0.9 < t.std() < 1.1


@pytest.mark.spec("UNILORA-6")
def test_count_is_d_whatever_the_layers():
    for tm in (("q_proj",), ("q_proj", "v_proj", "down_proj")):
        model = make_model()
        model.apply_unilora(theta_d_length=77, target_modules=tm)
        assert model.parameter_counts()[0] == 77


@pytest.mark.spec("UNILORA-6")
@pytest.mark.parametrize("kwargs, field", [
    (dict(rank=0), "rank"), (dict(theta_d_length=0), "theta_d_length"), (dict(proj_seed=-1), "proj_seed"),
    (dict(dropout=1.0), "dropout"), (dict(init_theta_d_bound=0), "init_theta_d_bound"), (dict(init="pissa"), "init"),
    (dict(bias="lora_only"), "bias"), (dict(save_indices="yes"), "save_indices"),
    (dict(exclude_modules=("k_proj",)), "exclude_modules")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        UniLoRAConfig(**kwargs)


@pytest.mark.spec("UNILORA-6")
def test_a_4bit_base_is_refused_naming_the_layer():
    check_refuses_a_4bit_base("unilora")


@pytest.mark.spec("UNILORA-7")
@pytest.mark.parametrize("save_indices", [False, True])
def test_saved_keys_and_fields_are_peft_names(tmp_path, save_indices):
    model = make_model()
    model.apply_unilora(rank=2, theta_d_length=50, dropout=0.1, save_indices=save_indices, target_modules=("v_proj",))
    randomize(model)
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "UNILORA" and (cfg["r"], cfg["theta_d_length"], cfg["proj_seed"]) == (2, 50, 42)
    assert cfg["init_weights"] is True and cfg["unilora_dropout"] == 0.1 and cfg["save_indices"] is save_indices
    assert "exclude_modules" not in cfg and cfg["fan_in_fan_out"] is False
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    want = {"base_model.unilora_theta_d": ((50,), np.float32)}
    if save_indices:
        want.update({f"base_model.model.model.layers.{i}.self_attn.v_proj.{leaf}": (s, dt) for i in (0, 1)
                     for leaf, s, dt in (("unilora_indices_A", (2, 32), np.int64),
                                         ("unilora_indices_B", (16, 2), np.int64),
                                         ("unilora_scales_A", (2, 32), np.float32),
                                         ("unilora_scales_B", (16, 2), np.float32))})
    assert {k: (v.shape, v.dtype) for k, v in keys.items()} == want
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert np.array_equal(again(IDS).numpy(), model(IDS).numpy())


@pytest.mark.spec("UNILORA-7")
def test_a_saved_map_is_read_from_the_file_and_checked(tmp_path):
    model = make_model()
    model.apply_unilora(rank=2, theta_d_length=50, save_indices=True, target_modules=("q_proj",))
    randomize(model)
    model.save_adapters(str(tmp_path))
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.q_proj.unilora_indices_A"
    keys[key] = np.roll(keys[key], 1)  # another map than the seed's: the file's wins
    write_safetensors(str(tmp_path / "adapter_model.safetensors"), keys, {"format": "pt"})
    again = make_model()
    again.load_adapters(str(tmp_path))
    d = again.net.get_submodule("model.layers.1.self_attn.q_proj").adapters["default"]
    assert np.array_equal(np.asarray(d.indices["A"].data), keys[key])
    keys[key] = keys[key] + 50  # past theta's end
    write_safetensors(str(tmp_path / "adapter_model.safetensors"), keys, {"format": "pt"})
    with pytest.raises(CheckpointError, match="unilora_indices_A holds indices outside theta's 50"):
        make_model().load_adapters(str(tmp_path))


@pytest.mark.spec("UNILORA-7")
def test_the_size_guard_reads_d_from_the_file_not_r(tmp_path):
    model = make_model()
    model.apply_unilora(rank=8, theta_d_length=4, target_modules=("q_proj",))  # r > d: a file of 4 numbers
    model.save_adapters(str(tmp_path))
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert np.array_equal(again(IDS).numpy(), model(IDS).numpy())
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    for field, value in (("theta_d_length", 5), ("r", 70_000)):  # d beyond theta's length; an absurd r
        (tmp_path / "adapter_config.json").write_text(json.dumps(dict(cfg, **{field: value})))
        with pytest.raises(CheckpointError, match="refused before allocating"):
            make_model().load_adapters(str(tmp_path))


@pytest.mark.spec("UNILORA-3", "UNILORA-6")
def test_model_train_moves_theta_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_unilora(rank=4, theta_d_length=2048, target_modules=("q_proj", "v_proj"))
    before = {n: np.array(p.data) for n, p in model.net.named_trainable_parameters().items()}
    h = train_next(model, lr=0.05)
    assert h["loss"][-1] < 0.8 * h["loss"][0]
    assert all(not np.array_equal(p.data, before[n]) for n, p in model.net.named_trainable_parameters().items())


# ---- against PEFT (test_peft_oracle.py's tiny random Llama / GPT-2, theta moved) ---------------------------------
CASES = {"default": ("llama", dict(r=4, target_modules=["q_proj", "v_proj"])),
         "all_linear": ("llama", dict(r=2, theta_d_length=1000, proj_seed=7, target_modules="all-linear")),
         "indices": ("llama", dict(r=3, theta_d_length=97, save_indices=True, bias="unilora_only",
                                   target_modules=["k_proj", "o_proj", "up_proj", "down_proj"])),
         "random": ("llama", dict(r=8, theta_d_length=5000, init_weights=False, target_modules=["gate_proj"])),
         "select": ("llama", dict(r=2, theta_d_length=64, target_modules=["q_proj", "k_proj", "up_proj"],
                                  layers_to_transform=[1], layers_pattern="layers", unilora_dropout=0.1)),
         "gpt2": ("gpt2", dict(r=4, theta_d_length=300, target_modules=["c_attn", "c_proj", "c_fc"]))}


def ours(name):  # PEFT names the shared theta under the first adapted layer, as minipeft's parameter walk does:
    # base_model.model.<first>.unilora_theta_d.default -> <first>.adapters.default.unilora_theta_d; a trained bias
    # base_model.model.<path>.base_layer.bias -> <path>.base_layer.bias
    name = name.removeprefix("base_model.model.")
    return re.sub(r"\.unilora_theta_d\.default$", ".adapters.default.unilora_theta_d", name)


@pytest.mark.oracle
@pytest.mark.spec("UNILORA-1", "UNILORA-2", "UNILORA-3", "UNILORA-5", "UNILORA-6", "UNILORA-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    check_peft_case(lib, base, CASES[case], "UniLoraConfig", UniLoRAConfig, tmp_path, f"UniLoRA {case}")


@pytest.mark.oracle
@pytest.mark.spec("UNILORA-2", "UNILORA-3")
@pytest.mark.parametrize("case", ["indices", "gpt2"])
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    pm = perturbed_peft_model(lib, base, CASES[case], "UniLoraConfig").eval()
    report_gradients_from_peft(lib, pm, base(CASES[case][0]), tmp_path, f"UniLoRA {case}", ours, 1e-4)


@pytest.mark.oracle
@pytest.mark.spec("UNILORA-4", "UNILORA-6")
@pytest.mark.parametrize("case", ["default", "gpt2"])
def test_peft_init_moves_the_output_and_counts_agree(lib, base, case):
    from test_peft_oracle import IDS as HF_IDS, hf_logits, hf_model
    peft = lib[2]
    kind, kw = CASES[case]
    hf = peft.get_peft_model(hf_model(lib, base(kind)), peft.UniLoraConfig(task_type="CAUSAL_LM", **kw)).eval()
    model = mp.load_model(base(kind))
    model.apply_adapter(UniLoRAConfig.from_peft(dict(peft_type="UNILORA", **kw)))
    with hf.disable_adapter():
        plain = hf_logits(lib, hf)
    assert max_rel_err(hf_logits(lib, hf), plain) > 1e-7 and max_rel_err(model(HF_IDS), plain) > 1e-7
    assert model.parameter_counts()[0] == sum(p.numel() for p in hf.parameters() if p.requires_grad)
