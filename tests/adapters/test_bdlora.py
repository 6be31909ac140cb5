"""spec/bdlora.md (BDLORA-n) on tiny random Llama models (test_lora.py's set-up), each claim rebuilt in NumPy
float64 from the spec's formula: dW = s B A with the block factor expanded;
and (oracle) against PEFT 0.21.2's LoraConfig(use_bdlora=...) on a random Llama."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close
from one_layer import check_refuses_a_4bit_base, check_train_moves_every_leaf
import minipeft as mp
from minipeft.adapters.bdlora import BDLoRAConfig
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from test_dora import SETTINGS
from test_hira import randomize
from test_lora import IDS, check_forward_merge_unmerge, layers, make_model, snapshot
from test_peft_oracle import V, base, lib  # noqa: F401 (fixtures)
from test_peft_oracle import check_both_ways_and_merged, perturbed_peft_model

ROLES = {"q_proj": "B", "k_proj": "B", "v_proj": "B", "o_proj": "A", "gate_proj": "B", "up_proj": "B",
         "down_proj": "A"}  # the guideline of PEFT's BdLoraConfig: column-sharded B, row-sharded A


def block_diag_np(M, n, q):
    """blockdiag(M) (p, q) for M (p, q / n): row block i of M on the diagonal, zeros elsewhere."""
    p, m = M.shape
    out = np.zeros((p, q))
    for i in range(n):
        out[i * p // n:(i + 1) * p // n, i * m:(i + 1) * m] = M[i * p // n:(i + 1) * p // n]
    return out


def bd_config(tm, n, **kw):
    return dict(target_modules=tm, use_bdlora={"target_modules_bd_a": [t for t in tm if ROLES[t] == "A"],
                                               "target_modules_bd_b": [t for t in tm if ROLES[t] == "B"],
                                               "nblocks": n}, **kw)


@pytest.mark.spec("BDLORA-1", "BDLORA-3", "BDLORA-4")
@SETTINGS
@given(r=st.sampled_from([2, 4, 8]), n=st.sampled_from([1, 2]), alpha=st.floats(0.5, 32), rslora=st.booleans(),
       tm=st.lists(st.sampled_from(sorted(ROLES)), min_size=1, max_size=4, unique=True).map(tuple))
def test_forward_and_merge_are_W0_plus_s_B_A_with_the_blocks_expanded(r, n, alpha, tm, rslora):
    model = make_model()
    W = snapshot(model)
    model.apply_bdlora(rank=r, alpha=alpha, use_rslora=rslora, **bd_config(tm, n))
    randomize(model)
    updates = {}
    for path, layer in layers(model, "default"):
        d, base = layer.adapters["default"], layer.base_layer
        A, B = (np.asarray(t.weight.data, np.float64) for t in (d.lora_A, d.lora_B))
        role = ROLES[path.rsplit(".", 1)[1]]
        assert A.shape == ((r, base.in_features // n) if role == "A" else (r, base.in_features))
        assert B.shape == ((base.out_features, r // n) if role == "B" else (base.out_features, r))
        A = block_diag_np(A, n, base.in_features) if role == "A" else A
        B = block_diag_np(B, n, r) if role == "B" else B
        updates[path + ".weight"] = (alpha / np.sqrt(r) if rslora else alpha / r) * B @ A
    check_forward_merge_unmerge(model, W, updates)


@pytest.mark.spec("BDLORA-2")
def test_init_is_the_base_with_kaiming_blocks_of_A_and_zero_blocks_of_B():
    model = make_model()
    before = model(IDS).numpy()
    model.apply_bdlora(rank=8, **bd_config(("q_proj", "o_proj", "down_proj"), 4))
    assert np.array_equal(model(IDS).numpy(), before)
    for path, layer in layers(model, "default"):
        d, i = layer.adapters["default"], layer.base_layer.in_features
        A = np.asarray(d.lora_A.weight.data)
        assert np.all(np.asarray(d.lora_B.weight.data) == 0)
        bound = np.sqrt(6 * 4 / i) if ROLES[path.rsplit(".", 1)[1]] == "A" else 1 / np.sqrt(i)  # kaiming a=0 / LoRA's
        assert np.abs(A).max() <= bound and np.abs(A).max() > 0.8 * bound


@pytest.mark.spec("BDLORA-5")
def test_only_the_blocks_train_and_the_count_is_the_blocks_size():
    model = make_model()
    model.apply_bdlora(rank=4, target_modules=("q_proj", "o_proj", "k_proj"),
                       use_bdlora={"target_modules_bd_a": ["o_proj"], "target_modules_bd_b": ["q_proj"],
                                   "nblocks": 2, "match_strict": False})  # k_proj: plain LoRA
    randomize(model)
    model(IDS).sum().backward()
    trained = {n: p for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in trained)
    assert all(p.grad is not None and np.abs(p.grad).max() > 0 for p in trained.values())
    # q (32 -> 32, B blocks), o (32 -> 32, A blocks), k (32 -> 16, plain), r = 4, n = 2, two layers
    assert model.parameter_counts()[0] == 2 * ((4 * 32 + 32 * 2) + (4 * 16 + 32 * 4) + 4 * (32 + 16))


@pytest.mark.spec("BDLORA-5")
def test_training_moves_every_leaf():
    model = mp.load_model(mp.DEMO_MODEL)
    model.apply_bdlora(rank=4, **bd_config(("q_proj", "v_proj", "o_proj"), 2))
    check_train_moves_every_leaf(model)


@pytest.mark.spec("BDLORA-1")
@pytest.mark.parametrize("kwargs, field", [
    (dict(use_bdlora={"target_modules_bd_a": ["q_proj"]}),
     r"use_bdlora \(for model.layers.0.self_attn.v_proj\).*neither"),
    (dict(use_bdlora={"target_modules_bd_a": ["proj"], "target_modules_bd_b": ["v_"]}), "in both"),
    (dict(use_bdlora={"target_modules_bd_a": ["q_proj"], "target_modules_bd_b": ["q_proj"]}), "names"),
    (dict(rank=6, use_bdlora={"target_modules_bd_b": ["proj"], "nblocks": 4}), r"nblocks'\] \(for .*q_proj\)"),
    (dict(use_bdlora={"target_modules_bd_b": ["proj"], "nblocks": 0}), r"nblocks'\]"),
    (dict(use_bdlora={"target_modules_bd_b": "q_proj"}), "target_modules_bd_b"),
    (dict(use_bdlora={"target_modules_bd_b": ["proj"], "shards": 2}), "use_bdlora"),
    (dict(lora_bias=True, use_bdlora={"target_modules_bd_b": ["proj"], "nblocks": 2}), "lora_bias")])
def test_bad_config_names_the_field_and_leaves_the_model_as_it_was(kwargs, field):
    model = make_model()
    W = snapshot(model)
    with pytest.raises(ConfigError, match=field):
        model.apply_bdlora(**{"target_modules": ("q_proj", "v_proj"), **kwargs})
    assert all(np.array_equal(p.data, W[n]) for n, p in model.net.named_parameters())
    assert not model.peft_configs


@pytest.mark.spec("BDLORA-1")
def test_a_4bit_base_and_a_block_factor_on_gpt2_conv1d_are_refused():
    check_refuses_a_4bit_base("bdlora")
    from minipeft import backend
    from minipeft.adapters.bdlora import BDLoRALinear
    from minipeft.nn.layers import Conv1D
    cfg = BDLoRAConfig(rank=2, use_bdlora={"target_modules_bd_b": ["c_attn"], "nblocks": 2})
    with pytest.raises(ConfigError, match=r"c_attn.*Conv1D.*torch.nn.Linear"):
        BDLoRALinear.create(Conv1D(8, 24), cfg, "h.0.attn.c_attn", backend.RNG(0))


@pytest.mark.spec("BDLORA-6")
def test_saved_keys_and_fields_are_peft_names_and_the_folder_loads_as_bdlora(tmp_path):
    model = make_model()
    model.apply_bdlora(rank=4, **bd_config(("q_proj", "o_proj"), 2))
    randomize(model)
    model.save_adapters(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_bdlora"] == {
        "target_modules_bd_a": ["o_proj"], "target_modules_bd_b": ["q_proj"], "nblocks": 2, "match_strict": True}
    keys, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in keys.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.{m}": s for i in (0, 1)
        for m, s in (("q_proj.lora_A.weight", (4, 32)), ("q_proj.lora_B.weight", (32, 2)),
                     ("o_proj.lora_A.weight", (4, 16)), ("o_proj.lora_B.weight", (32, 4)))}
    again = make_model()
    again.load_adapters(str(tmp_path))
    assert type(again.peft_configs["default"]) is BDLoRAConfig
    assert np.array_equal(again(IDS).numpy(), model(IDS).numpy())


# ---- against PEFT ---------------------------------------------------------------------------------------
BD = {"target_modules_bd_a": ["o_proj", "down_proj"], "target_modules_bd_b": ["q_proj", "k_proj", "v_proj", "up_proj"]}
CASES = {"attention": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                     use_bdlora={**BD, "nblocks": 2})),
         "mlp_rslora_patterns": ("llama", dict(r=4, lora_alpha=8, use_rslora=True,
                                               target_modules=["up_proj", "down_proj"],
                                               rank_pattern={"down_proj": 8}, alpha_pattern={"up_proj": 3},
                                               use_bdlora={**BD, "nblocks": 4})),
         "lenient_bias_dropout": ("llama", dict(r=4, lora_alpha=8, lora_dropout=0.1, lora_bias=True,
                                                target_modules=["o_proj", "k_proj", "q_proj"],
                                                use_bdlora={"target_modules_bd_a": ["o_proj"], "nblocks": 2,
                                                            "match_strict": False}))}


@pytest.mark.oracle
@pytest.mark.spec("BDLORA-1", "BDLORA-3", "BDLORA-4", "BDLORA-6")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_and_minipeft_agree_both_ways_and_on_merge(lib, base, case, tmp_path):
    kind, _ = CASES[case]
    pm = perturbed_peft_model(lib, base, CASES[case], "LoraConfig").eval()  # every block moved
    trained = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    check_both_ways_and_merged(lib, pm, base(kind), tmp_path, f"BD-LoRA {case}")
    model = mp.load_model(base(kind))
    model.load_adapters(str(tmp_path / "peft"))
    assert type(model.peft_configs["default"]) is BDLoRAConfig and model.parameter_counts()[0] == trained


@pytest.mark.oracle
@pytest.mark.spec("BDLORA-2", "BDLORA-5")
@pytest.mark.parametrize("case", ["attention", "lenient_bias_dropout"])
def test_init_is_the_base_as_in_peft_and_the_count_is_peft_s(lib, base, case):
    from test_peft_oracle import check_init_is_base_and_count
    check_init_is_base_and_count(lib, base, CASES[case], "LoraConfig", BDLoRAConfig, f"BD-LoRA {case}")


@pytest.mark.oracle
@pytest.mark.spec("BDLORA-5")
def test_step_gradients_equal_peft_s(lib, base, tmp_path):
    from test_kasa import our_name
    from test_peft_oracle import report_gradients_from_peft
    pm = perturbed_peft_model(lib, base, CASES["mlp_rslora_patterns"], "LoraConfig").eval()
    report_gradients_from_peft(lib, pm, base("llama"), tmp_path, "BD-LoRA mlp", our_name, 1e-4)
