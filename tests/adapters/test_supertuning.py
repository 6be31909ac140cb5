"""spec/supertuning.md (SUPERTUNING-n) on tiny random Llama models (test_lora.py's set-up) and one random Linear,
each claim rebuilt in NumPy float64 from the spec: q = the N largest |W0| (stable order), dW = scatter(v at q)
+ s B A; and (oracle) against PEFT's SUPERTUNING on a random Llama, also one whose |W0| tie."""
import json
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import minipeft as mp
from minipeft import backend
from helpers import max_rel_err
from minipeft.adapters.supertuning import SuperTuningConfig, SuperTuningLinear
from minipeft.errors import CheckpointError, ConfigError
from minipeft.safetensors_io import read_safetensors, write_safetensors
from one_layer import check_on_the_backend, check_train_moves_every_leaf, saved_and_reloaded
from test_dora import SETTINGS, targets
from test_hira import randomize  # every leaf of every layer ~ N(0, scale²)
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import IDS as IDS_PEFT
from test_peft_oracle import (base, check_init_is_base_and_count, check_peft_case, hf_model, lib,  # noqa: F401
                              minipeft_saved_in_peft, perturbed_peft_model, report, report_gradients_from_peft)


def support_np(W0, N, top=True):
    """SUPERTUNING-1 in NumPy: the N flat positions of the largest |W0| (smallest if not top), ties to the lower."""
    score = np.abs(np.asarray(W0, np.float64)).reshape(-1)
    return np.argsort(-score if top else score, kind="stable")[:N]


def update_np(d):
    """SUPERTUNING-2 in float64: scatter(v at q) + s B A."""
    dW = np.zeros(d.shape[0] * d.shape[1])
    np.add.at(dW, np.asarray(d.indices[0].data, np.int64), np.asarray(d.supertuning_values.data, np.float64))
    dW = dW.reshape(d.shape)
    if hasattr(d, "supertuning_lora_A"):
        dW += d.sc * np.asarray(d.supertuning_lora_B.weight.data, np.float64) @ np.asarray(
            d.supertuning_lora_A.weight.data, np.float64)
    return dW


@pytest.mark.spec("SUPERTUNING-1", "SUPERTUNING-2", "SUPERTUNING-3", "SUPERTUNING-5")
@SETTINGS
@given(p=st.floats(0.0, 0.99), r=st.one_of(st.none(), st.integers(1, 4)), top=st.booleans(), tm=targets)
def test_support_forward_and_merge(p, r, top, tm):
    model = make_model()
    W = snapshot(model)
    model.apply_supertuning(sparsity=p, rank=r, select_top=top, target_modules=tm)
    randomize(model)
    updates = {}
    for path, layer in layers(model, "default"):
        d, W0 = layer.adapters["default"], W[path + ".weight"]
        N = int(W0.size * (1 - p))
        assert np.array_equal(np.asarray(d.indices[0].data), support_np(W0, N, top))
        assert d.indices[0].data.dtype == np.int32 and d.supertuning_values.shape == (N,)
        if r is not None:
            assert d.sc == 2.0  # alpha = 2 r unless given
        updates[path + ".weight"] = update_np(d)
        assert np.allclose(d.delta_weight(), updates[path + ".weight"], rtol=1e-5, atol=1e-6)
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("SUPERTUNING-1")
def test_equal_magnitudes_go_to_the_lower_index():
    model = make_model()
    q = model.net.model.layers[0].self_attn.q_proj
    W0 = np.zeros((32, 32), np.float32)
    W0.reshape(-1)[[5, 9, 40, 41, 700]] = [2.0, -3.0, 3.0, -2.0, 3.0]  # |W0| = 3 at 9, 40, 700; 2 at 5, 41
    q.weight.data = W0
    model.apply_supertuning(sparsity=1 - 5 / 1024, target_modules=("layers.0.self_attn.q_proj",))
    assert np.asarray(layers(model, "default")[0][1].adapters["default"].indices[0].data).tolist() == [9, 40, 700, 5,
                                                                                                        41]
    bottom = make_model()
    bottom.net.model.layers[0].self_attn.q_proj.weight.data = W0
    bottom.apply_supertuning(sparsity=1 - 3 / 1024, select_top=False, target_modules=("layers.0.self_attn.q_proj",))
    assert np.asarray(layers(bottom, "default")[0][1].adapters["default"].indices[0].data).tolist() == [0, 1, 2]


@pytest.mark.spec("SUPERTUNING-4")
def test_init_is_the_base_and_the_random_init():
    model = make_model()
    base_logits = model(IDS).numpy()
    model.apply_supertuning(sparsity=0.9, rank=8, target_modules=("q_proj", "up_proj"))
    assert np.array_equal(model(IDS).numpy(), base_logits)
    for _, layer in layers(model, "default"):
        d, n = layer.adapters["default"], layer.base_layer.in_features
        assert np.all(d.supertuning_values.data == 0) and np.all(d.supertuning_lora_B.weight.data == 0)
        A = np.abs(d.supertuning_lora_A.weight.data)
        assert 0.8 / np.sqrt(n) < A.max() <= 1 / np.sqrt(n)
    rnd = make_model()
    rnd.apply_supertuning(sparsity=0.5, rank=16, init_weights=False, target_modules=("up_proj",))
    v = np.concatenate([np.asarray(m.adapters["default"].supertuning_values.data) for _, m in layers(rnd, "default")])
    assert abs(v.mean()) < 0.1 and 0.9 < v.std() < 1.1  # N(0, 1), 2 x 1024 draws
    for _, layer in layers(rnd, "default"):
        B = np.abs(layer.adapters["default"].supertuning_lora_B.weight.data).max()
        assert 0.8 / np.sqrt(16) < B <= 1 / np.sqrt(16)
    assert max_rel_err(rnd(IDS), base_logits) > 1e-3


@pytest.mark.spec("SUPERTUNING-6")
@SETTINGS
@given(p=st.floats(0.0, 0.99), r=st.one_of(st.none(), st.integers(1, 4)), tm=targets)
def test_count_is_N_plus_r_in_plus_out(p, r, tm):
    model = make_model()
    model.apply_supertuning(sparsity=p, rank=r, target_modules=tm)
    want = sum(int(m.base_layer.in_features * m.base_layer.out_features * (1 - p))
               + (r or 0) * (m.base_layer.in_features + m.base_layer.out_features) for _, m in layers(model, "default"))
    assert model.parameter_counts()[0] == want


@pytest.mark.spec("SUPERTUNING-2", "SUPERTUNING-3", "SUPERTUNING-6")
def test_one_layer_gradients_on_the_backend(any_backend):
    cfg = SuperTuningConfig(sparsity=0.7, rank=2, alpha=3.0, init_weights=False)
    check_on_the_backend(lambda base: SuperTuningLinear.create(base, cfg, "layer", backend.RNG(0)), update_np,
                         "supertuning_values")


@pytest.mark.spec("SUPERTUNING-8")
@pytest.mark.parametrize("kwargs, field", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"), (dict(rank=0), "rank"),
    (dict(alpha=4.0), "alpha"), (dict(rank=2, dropout=1.0), "dropout")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SuperTuningConfig(**kwargs)


@pytest.mark.spec("SUPERTUNING-8")
def test_no_entry_left_names_the_layer():
    with pytest.raises(ConfigError, match=r"sparsity.*q_proj"):
        make_model().apply_supertuning(sparsity=0.9995, target_modules=("q_proj",))


@pytest.mark.spec("SUPERTUNING-1", "SUPERTUNING-8")
def test_without_saved_indices_ties_are_refused():
    model = make_model()
    q = model.net.model.layers[0].self_attn.q_proj
    q.weight.data = np.round(q.weight.data * 4) / 4  # many equal |W0|
    with pytest.raises(ConfigError, match=r"save_precomputed_indices.*q_proj"):
        model.apply_supertuning(sparsity=0.9, save_precomputed_indices=False, target_modules=("q_proj",))
    model.apply_supertuning(sparsity=0.9, target_modules=("q_proj",))  # saved indices: fine


@pytest.mark.spec("SUPERTUNING-7", "SUPERTUNING-8")
def test_saved_keys_fields_and_the_file_s_indices(tmp_path):
    model = make_model()
    model.apply_supertuning(sparsity=0.9, rank=2, dropout=0.1, target_modules=("v_proj",))
    randomize(model)
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SUPERTUNING" and (cfg["r"], cfg["lora_alpha"], cfg["sparsity"]) == (2, 4, 0.9)
    assert cfg["select_top"] is True and cfg["lora_dropout"] == 0.1 and cfg["save_precomputed_indices"] is True
    assert "fan_in_fan_out" not in cfg and "layers_to_transform" not in cfg
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: (v.shape, str(v.dtype)) for k, v in keys.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.v_proj.{m}": s for i in (0, 1)
        for m, s in (("supertuning_values", ((51,), "float32")), ("supertuning_indices", ((51,), "int32")),
                     ("supertuning_lora_A.weight", ((2, 32), "float32")),
                     ("supertuning_lora_B.weight", ((16, 2), "float32")))}
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert np.array_equal(again(IDS).numpy(), model(IDS).numpy())
    # the file's positions are used as they are (SUPERTUNING-1): reversed, the model follows them
    k = "base_model.model.model.layers.0.self_attn.v_proj.supertuning_indices"
    write_safetensors(str(tmp_path / "adapter_model.safetensors"), dict(keys, **{k: keys[k][::-1].copy()}),
                      {"format": "pt"})
    third = make_model()
    third.load_adapters(str(tmp_path))
    d = third.net.model.layers[0].self_attn.v_proj.adapters["default"]
    assert np.array_equal(np.asarray(d.indices[0].data), keys[k][::-1])
    write_safetensors(str(tmp_path / "adapter_model.safetensors"), dict(keys, **{k: keys[k] + 512}), {"format": "pt"})
    with pytest.raises(CheckpointError, match="supertuning_indices fall outside"):
        make_model().load_adapters(str(tmp_path))


@pytest.mark.spec("SUPERTUNING-7")
def test_without_saved_indices_the_load_rebuilds_them(tmp_path):
    model = make_model()
    model.apply_supertuning(sparsity=0.95, select_top=False, save_precomputed_indices=False,
                            target_modules=("q_proj", "down_proj"))
    randomize(model)
    _, keys = saved_and_reloaded(model, tmp_path, make_model, IDS)
    assert not any("indices" in k for k in keys) and len(keys) == 4


@pytest.mark.spec("SUPERTUNING-3", "SUPERTUNING-6")
def test_model_train_moves_every_leaf_and_lowers_the_loss():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_supertuning(sparsity=0.95, rank=2, target_modules=("q_proj", "v_proj"))
    check_train_moves_every_leaf(model)


# ---- against PEFT (test_peft_oracle.py's tiny random Llama, every trainable tensor moved) ------------------------
CASES = {"super": ("llama", dict(sparsity=0.9, target_modules=["q_proj", "v_proj", "down_proj"])),
         "supra": ("llama", dict(sparsity=0.8, r=4, lora_alpha=6, select_top=False, init_weights=False,
                                 target_modules=["k_proj", "o_proj", "up_proj"])),
         "no_indices": ("llama64", dict(sparsity=0.97, r=2, save_precomputed_indices=False,
                                        target_modules=["q_proj", "gate_proj"]))}


def ours(name):  # PEFT's base_model.model.<path>.<leaf>.default[.weight] -> <path>.adapters.default.<leaf>[.weight]
    name = name.removeprefix("base_model.model.")
    return re.sub(r"^(.+)\.(supertuning_\w+)\.default", r"\1.adapters.default.\2", name)


@pytest.mark.oracle
@pytest.mark.spec("SUPERTUNING-1", "SUPERTUNING-2", "SUPERTUNING-3", "SUPERTUNING-5", "SUPERTUNING-6",
                  "SUPERTUNING-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    check_peft_case(lib, base, CASES[case], "SupertuningConfig", SuperTuningConfig, tmp_path, f"SuperTuning {case}")
    model = mp.load_model(base(CASES[case][0]))
    model.apply_adapter(SuperTuningConfig.from_peft(dict(peft_type="SUPERTUNING", **CASES[case][1])))
    pm = perturbed_peft_model(lib, base, CASES[case], "SupertuningConfig")
    for path, layer in layers(model, "default"):  # no ties in these |W0|: PEFT's topk order is SUPERTUNING-1's
        theirs = pm.base_model.model.get_submodule(path).supertuning_indices["default"].numpy()
        assert np.array_equal(np.asarray(layer.adapters["default"].indices[0].data), theirs)


@pytest.mark.oracle
@pytest.mark.spec("SUPERTUNING-1", "SUPERTUNING-8")
def test_equal_magnitudes_torch_s_order_the_file_settles_it(lib, base, tmp_path):
    torch = lib[0]
    score = torch.tensor([1.0, 3, 3, 2, 3, 1, 1, 0, 3])
    assert torch.topk(score, 3).indices.tolist() == [4, 8, 2]  # torch's order among ties; minipeft's: 1, 2, 4
    hf = hf_model(lib, base("llama"))
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.round(p * 4) / 4)  # |W0| in steps of 0.25: ties everywhere
    tied = str(tmp_path / "tied")
    hf.save_pretrained(tied)
    case = ("tied", dict(sparsity=0.9, r=2, target_modules=["q_proj", "v_proj", "up_proj"]))
    check_peft_case(lib, lambda kind: tied, case, "SupertuningConfig", SuperTuningConfig, tmp_path, "SuperTuning tied")
    ours_, theirs = minipeft_saved_in_peft(lib, tied, SuperTuningConfig.from_peft(dict(peft_type="SUPERTUNING",
                                                                                          **case[1])), tmp_path / "o")
    with torch.no_grad():  # minipeft's own (stable-order) positions, read by PEFT from the file
        report("SuperTuning tied, minipeft's own support -> PEFT", max_rel_err(ours_(IDS_PEFT), theirs(
            torch.tensor(IDS_PEFT)).logits.numpy()))
    drawn = perturbed_peft_model(lib, lambda kind: tied, case, "SupertuningConfig")  # PEFT's own topk
    assert any(not np.array_equal(np.asarray(layer.adapters["default"].indices[0].data),
                                  drawn.base_model.model.get_submodule(path).supertuning_indices["default"].numpy())
               for path, layer in layers(ours_, "default"))  # the two orders differ on these ties
    pm = perturbed_peft_model(lib, lambda kind: tied, (case[0], dict(case[1], save_precomputed_indices=False)),
                              "SupertuningConfig")
    pm.save_pretrained(tmp_path / "no_indices")
    with pytest.raises(CheckpointError, match="save_precomputed_indices"):
        mp.load_model(tied).load_adapters(str(tmp_path / "no_indices"))


@pytest.mark.oracle
@pytest.mark.spec("SUPERTUNING-3", "SUPERTUNING-6")
def test_training_step_gradients_agree(lib, base, tmp_path):
    pm = perturbed_peft_model(lib, base, CASES["supra"], "SupertuningConfig").eval()
    report_gradients_from_peft(lib, pm, base("llama"), tmp_path, "SuperTuning supra", ours, 1e-4)


@pytest.mark.oracle
@pytest.mark.spec("SUPERTUNING-4", "SUPERTUNING-6")
@pytest.mark.parametrize("case", ["super", "no_indices"])
def test_peft_default_init_is_the_base_and_counts_agree(lib, base, case):
    check_init_is_base_and_count(lib, base, CASES[case], "SupertuningConfig", SuperTuningConfig, f"SuperTuning {case}")


@pytest.mark.oracle
@pytest.mark.spec("SUPERTUNING-8")
def test_gpt2_conv1d_is_refused_as_peft_refuses_it(lib, base):
    peft = lib[2]
    with pytest.raises(TypeError, match="only `torch.nn.Linear`"):
        peft.get_peft_model(hf_model(lib, base("gpt2")), peft.SupertuningConfig(target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match=r"c_attn.*Conv1D"):
        mp.load_model(base("gpt2")).apply_supertuning(target_modules=("c_attn",))
