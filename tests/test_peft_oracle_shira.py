"""SHiRA against HF PEFT (spec/shira.md), in the set-up of test_peft_oracle.py: a tiny random Llama,
every shira_weight entry perturbed with seeded noise. PEFT saves the mask (shira_indices) in the file;
minipeft draws the same mask from random_seed (SHIRA-1), checked against PEFT's indices, and reads the
file's on load. Checked: PEFT's save loads here with equal logits and the reverse; one training step's
gradients; merge_and_unload against PEFT's merged model; init and the trainable count; the
r (in + out) > in * out error; GPT-2's Conv1D refused as PEFT refuses it. `pytest -s` prints the errors."""
import numpy as np
import pytest

import minipeft
from helpers import max_rel_err
from minipeft.adapters.shira import SHiRAConfig
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from test_peft_oracle import (IDS, base, report_merge_and_unload, check_step_gradients, hf_logits,  # noqa: F401
                              hf_model, lib, minipeft_saved_in_peft, perturb_peft, report)

pytestmark = pytest.mark.oracle
GRAD_TOL = 1e-4

# name -> (base kind, PEFT ShiraConfig kwargs); minipeft reads the same dict via SHiRAConfig.from_peft
CASES = {
    "seeded": ("llama", dict(r=2, random_seed=3, target_modules=["q_proj", "k_proj", "down_proj"])),
    "unseeded": ("llama", dict(r=4, target_modules=["v_proj", "up_proj"])),  # a fresh torch.Generator's seed
    "wide": ("llama64", dict(r=8, random_seed=2**40 + 7, target_modules=["q_proj", "o_proj", "gate_proj"])),
}


def peft_model(lib, base, case, **extra):
    _, _, peft = lib
    kind, kw = CASES[case]
    pm = peft.get_peft_model(hf_model(lib, base(kind)), peft.ShiraConfig(task_type="CAUSAL_LM", **kw, **extra))
    perturb_peft(lib, pm)
    return pm


def ours(case, **extra):
    return SHiRAConfig.from_peft(dict(peft_type="SHIRA", **CASES[case][1], **extra))


@pytest.mark.spec("SHIRA-1", "SHIRA-2", "SHIRA-3", "SHIRA-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_loads_in_minipeft_and_masks_agree(lib, base, tmp_path, case):
    pm = peft_model(lib, base, case).eval()
    pm.save_pretrained(tmp_path)
    model = minipeft.load_model(base(CASES[case][0]))
    model.load_adapters(str(tmp_path))
    assert type(model.peft_configs["default"]) is SHiRAConfig
    drawn = minipeft.load_model(base(CASES[case][0]))
    drawn.apply_adapter(ours(case))
    n = 0
    for name, m in pm.named_modules():
        if hasattr(m, "shira_indices") and "default" in m.shira_indices:
            path = name.removeprefix("base_model.model.")
            theirs = m.shira_indices["default"].numpy()
            assert np.array_equal(np.asarray(drawn.net.get_submodule(path).adapters["default"].indices[0].data), theirs)
            assert np.array_equal(np.asarray(model.net.get_submodule(path).adapters["default"].indices[0].data), theirs)
            n += 1
    assert n > 0
    report(f"PEFT->minipeft {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("SHIRA-2", "SHIRA-3", "SHIRA-7")
@pytest.mark.parametrize("case", list(CASES))
def test_minipeft_saved_loads_in_peft(lib, base, tmp_path, case):
    model, pm = minipeft_saved_in_peft(lib, base(CASES[case][0]), ours(case), tmp_path)
    saved, _ = read_safetensors(str(tmp_path / "adapter_model.safetensors"))
    assert all(v.dtype == np.int32 for k, v in saved.items() if k.endswith(".shira_indices"))
    report(f"minipeft->PEFT {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("SHIRA-4", "SHIRA-6")
@pytest.mark.parametrize("case", list(CASES))
def test_init_and_parameter_count_equal_peft(lib, base, case):
    _, _, peft = lib
    kind, kw = CASES[case]
    for init in (True, False):
        pm = peft.get_peft_model(hf_model(lib, base(kind)),
                                 peft.ShiraConfig(task_type="CAUSAL_LM", init_weights=init, **kw)).eval()
        model = minipeft.load_model(base(kind))
        plain = model(IDS).data
        model.apply_adapter(ours(case, init_weights=init))
        assert model.parameter_counts()[0] == sum(p.numel() for p in pm.parameters() if p.requires_grad)
        if init:
            assert np.array_equal(model(IDS).data, plain)
            report(f"init vs PEFT {case}", max_rel_err(plain, hf_logits(lib, pm)))
        else:
            assert max_rel_err(model(IDS), plain) > 1e-3 and max_rel_err(hf_logits(lib, pm), plain) > 1e-3


@pytest.mark.spec("SHIRA-6")
@pytest.mark.parametrize("case", list(CASES))
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    check_step_gradients(lib, peft_model(lib, base, case).eval(), base(CASES[case][0]), tmp_path,
                         "shira_weight", case, GRAD_TOL)


@pytest.mark.spec("SHIRA-5")
@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unload_equals_peft(lib, base, tmp_path, case):
    report_merge_and_unload(lib, peft_model(lib, base, case).eval(), base(CASES[case][0]), tmp_path, case)


@pytest.mark.spec("SHIRA-8")
def test_errors_like_peft(lib, base):
    _, _, peft = lib
    kw = dict(r=11, target_modules=["v_proj"])  # v_proj 32 -> 16: 11 * 48 = 528 > 512
    with pytest.raises(ValueError, match="more shira params"):
        peft.get_peft_model(hf_model(lib, base()), peft.ShiraConfig(task_type="CAUSAL_LM", **kw))
    with pytest.raises(ConfigError, match=r"rank=11.*528 entries, more than in \* out = 512"):
        minipeft.load_model(base()).apply_adapter(SHiRAConfig(rank=11, target_modules=("v_proj",)))
    with pytest.raises((TypeError, ValueError)):
        peft.get_peft_model(hf_model(lib, base("gpt2")), peft.ShiraConfig(r=1, target_modules=["c_attn"]))
    with pytest.raises(ConfigError, match="only nn.Linear"):
        minipeft.load_model(base("gpt2")).apply_adapter(SHiRAConfig(rank=1, target_modules=("c_attn",)))
