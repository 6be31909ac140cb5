"""OFT against HF PEFT (spec/oft.md), in the set-up of test_peft_oracle.py: a tiny random Llama,
 every oft_R.weight perturbed with seeded noise (so R != I). Cases cover the
Cayley-Neumann default, exact Cayley, r instead of oft_block_size, block_share and coft. Checked: PEFT's
save loads here with equal logits and the reverse; gradients of one step; merge_and_unload against
PEFT's merged model; unmerge back to W0; parameter count. Run with `pytest -s` for the errors."""
import re

import numpy as np
import pytest

import minipeft
from helpers import max_rel_err
from minipeft.adapters.oft import OFTConfig
from test_peft_oracle import (IDS, base, hf_logits, lib, minipeft_saved_in_peft, perturbed_peft_model,  # noqa: F401
                              report, report_gradients_from_peft, report_merge_and_unload)

pytestmark = pytest.mark.oracle
GRAD_TOL = 1e-4

CASES = {
    "neumann": ("llama", dict(oft_block_size=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])),
    "exact": ("llama", dict(oft_block_size=4, use_cayley_neumann=False, target_modules=["q_proj", "down_proj", "up_proj"])),
    "r_share": ("llama", dict(r=4, oft_block_size=0, block_share=True, num_cayley_neumann_terms=3,
                              target_modules=["q_proj", "v_proj"])),
    "coft": ("llama", dict(oft_block_size=8, coft=True, eps=0.3, target_modules=["q_proj", "down_proj"])),
}


def peft_model(lib, base, case):
    return perturbed_peft_model(lib, base, CASES[case], "OFTConfig")


@pytest.mark.spec("OFT-2", "OFT-3", "OFT-5", "OFT-9")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_loads_in_minipeft(lib, base, tmp_path, case):
    pm = peft_model(lib, base, case).eval()
    pm.save_pretrained(tmp_path)
    theirs = hf_logits(lib, pm)  # coft projects PEFT's weight in this forward; save after it
    pm.save_pretrained(tmp_path)
    model = minipeft.load_model(base(CASES[case][0]))
    model.load_adapters(str(tmp_path))
    assert type(model.peft_configs["default"]) is OFTConfig
    report(f"PEFT->minipeft {case}", max_rel_err(model(IDS), theirs))


@pytest.mark.spec("OFT-2", "OFT-3", "OFT-9")
@pytest.mark.parametrize("case", list(CASES))
def test_minipeft_saved_loads_in_peft(lib, base, tmp_path, case):
    kind, kw = CASES[case]
    model, pm = minipeft_saved_in_peft(lib, base(kind), OFTConfig.from_peft(dict(peft_type="OFT", **kw)), tmp_path)
    report(f"minipeft->PEFT {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("OFT-4")
@pytest.mark.parametrize("case", ["neumann", "exact"])
def test_init_is_base(lib, base, case):
    kind, kw = CASES[case]
    model = minipeft.load_model(base(kind))
    before = model(IDS).data
    model.apply_adapter(OFTConfig.from_peft(dict(peft_type="OFT", **kw)))
    assert np.array_equal(model(IDS).data, before)


LEAF = re.compile(r"base_model\.model\.(.+)\.oft_R\.default\.weight$")


@pytest.mark.spec("OFT-8")
@pytest.mark.parametrize("case", ["neumann", "exact", "r_share"])
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    report_gradients_from_peft(lib, peft_model(lib, base, case).eval(), base(CASES[case][0]), tmp_path, case,
                               lambda n: "{}.adapters.default.oft_R.weight".format(LEAF.match(n).group(1)), GRAD_TOL)


@pytest.mark.spec("OFT-7")
@pytest.mark.parametrize("case", ["neumann", "exact", "coft"])
def test_merge_and_unload_equals_peft(lib, base, tmp_path, case):
    report_merge_and_unload(lib, peft_model(lib, base, case).eval(), base(CASES[case][0]), tmp_path, case)


@pytest.mark.spec("OFT-8")
@pytest.mark.parametrize("case", list(CASES))
def test_parameter_count_equals_peft(lib, base, case):
    pm = peft_model(lib, base, case)
    theirs = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    kind, kw = CASES[case]
    model = minipeft.load_model(base(kind))
    model.apply_adapter(OFTConfig.from_peft(dict(peft_type="OFT", **kw)))
    assert model.parameter_counts()[0] == theirs
