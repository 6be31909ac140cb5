"""DoRA and IA3 against HF PEFT (spec/dora.md, spec/ia3.md), in the set-up of test_peft_oracle.py: a
tiny random Llama (q/k/v/o biases, so IA3's bias scaling shows) or GPT-2 (Conv1D, fan_in_fan_out),
every trainable tensor perturbed with seeded noise (so B != 0, m != ‖W0‖ and l != 1). Checked:
PEFT's save loads here with equal logits and the reverse; one training step's gradients from the
same state; merge_and_unload against PEFT's merged model. Run with `pytest -s` for the errors."""
import re

import numpy as np
import pytest

import minipeft
from helpers import max_rel_err
from minipeft.adapters.base import AdapterConfig
from minipeft.adapters.registry import config_class
from minipeft.autograd import Tensor
from minipeft.autograd import functional as F
from test_peft_oracle import (IDS, V, base, hf_logits, hf_model, lib, minipeft_saved_in_peft, perturb_peft,  # noqa: F401
                              report, report_gradients)

pytestmark = pytest.mark.oracle
GRAD_TOL = 1e-4

# name -> (base kind, PEFT config class name, its kwargs); minipeft reads the same dict via from_peft
CASES = {
    "dora": ("llama", "LoraConfig", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"])),
    "dora_rslora_mlp": ("llama", "LoraConfig", dict(r=4, lora_alpha=8, use_dora=True, use_rslora=True,
                                                    target_modules=["k_proj", "o_proj", "up_proj", "down_proj"])),
    "dora_patterns": ("llama", "LoraConfig", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"],
                                                  rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 32})),
    "dora_gpt2": ("gpt2", "LoraConfig", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["c_attn", "c_fc"],
                                             fan_in_fan_out=True)),
    "ia3": ("llama", "IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "ia3_mixed": ("llama", "IA3Config", dict(target_modules=["q_proj", "o_proj", "up_proj", "down_proj"],
                                             feedforward_modules=["up_proj", "down_proj"])),
    "ia3_regex": ("llama", "IA3Config", dict(target_modules=r".*\.(k_proj|v_proj|down_proj)",
                                             feedforward_modules=r".*\.down_proj")),
    "ia3_gpt2": ("gpt2", "IA3Config", dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                           fan_in_fan_out=True)),
}


def peft_model(lib, base, case):
    torch, _, peft = lib
    kind, cls, kw = CASES[case]
    pm = peft.get_peft_model(hf_model(lib, base(kind)), getattr(peft, cls)(task_type="CAUSAL_LM", **kw))
    perturb_peft(lib, pm)
    return pm


def our_config(case) -> AdapterConfig:
    _, cls, kw = CASES[case]
    d = dict(peft_type="IA3" if cls == "IA3Config" else "LORA", **kw)
    return config_class(d["peft_type"], "CASES", d).from_peft(d)


@pytest.mark.spec("DORA-2", "DORA-6", "IA3-2", "IA3-3", "IA3-6")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_loads_in_minipeft(lib, base, tmp_path, case):
    pm = peft_model(lib, base, case).eval()
    pm.save_pretrained(tmp_path)
    model = minipeft.load_model(base(CASES[case][0]))
    model.load_adapters(str(tmp_path))
    assert type(model.peft_configs["default"]) is type(our_config(case))
    report(f"PEFT->minipeft {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("DORA-2", "DORA-6", "IA3-2", "IA3-3", "IA3-6")
@pytest.mark.parametrize("case", list(CASES))
def test_minipeft_saved_loads_in_peft(lib, base, tmp_path, case):
    model, pm = minipeft_saved_in_peft(lib, base(CASES[case][0]), our_config(case), tmp_path)
    report(f"minipeft->PEFT {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


LEAF = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B|lora_magnitude_vector|ia3_l)\.default(\.weight)?$")


def our_name(peft_name: str) -> str:
    path, leaf, _ = LEAF.match(peft_name).groups()
    return f"{path}.adapters.default.{leaf}" + (".weight" if leaf in ("lora_A", "lora_B") else "")


@pytest.mark.spec("DORA-3", "DORA-4", "IA3-5")
@pytest.mark.parametrize("case", list(CASES))
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    """Mean next-token cross-entropy on IDS from the same adapter state: every trainable gradient. Both
    models in eval mode: GPT-2's own dropout (p = 0.1) draws from different generators in train mode."""
    torch = lib[0]
    pm = peft_model(lib, base, case).eval()
    pm.save_pretrained(tmp_path)
    logits = pm(torch.tensor(IDS)).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), torch.tensor(IDS[:, 1:]).reshape(-1)).backward()
    theirs = {our_name(n): p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    model = minipeft.load_model(base(CASES[case][0]))
    model.load_adapters(str(tmp_path))
    out = model(IDS)
    F.cross_entropy(out[:, :-1].reshape(-1, V), Tensor(IDS[:, 1:].reshape(-1))).backward()
    report_gradients(case, model, theirs, GRAD_TOL)


@pytest.mark.spec("DORA-5", "IA3-4")
@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unload_equals_peft(lib, base, tmp_path, case):
    pm = peft_model(lib, base, case).eval()
    pm.save_pretrained(tmp_path)
    unmerged = hf_logits(lib, pm)
    merged = pm.merge_and_unload()
    theirs = hf_logits(lib, merged)
    model = minipeft.load_model(base(CASES[case][0]))
    model.load_adapters(str(tmp_path))
    ours = model.merge_and_unload()(IDS).data
    report(f"merge_and_unload vs PEFT {case}", max_rel_err(ours, theirs))
    report(f"merge_and_unload vs unmerged PEFT {case}", max_rel_err(ours, unmerged))
    sd = {k: v.detach().numpy() for k, v in merged.state_dict().items()}
    mine = {k: np.asarray(v) for k, v in model.net.state_dict().items()}
    worst = max(max_rel_err(mine[k], sd[k]) for k in mine if k in sd)
    report(f"merged weights vs PEFT {case}", worst)
