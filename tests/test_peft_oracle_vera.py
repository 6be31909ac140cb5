"""VeRA against HF PEFT (spec/vera.md), in the set-up of test_peft_oracle.py: a tiny random Llama or
GPT-2 (Conv1D, fan_in_fan_out), the trainable vectors λ_b, λ_d perturbed with seeded noise (so
λ_b != 0). A and B come from the file in both directions (save_projection=True), which is what makes
the two libraries agree although they draw them from different generators. Checked: PEFT's save
loads here with equal logits and the reverse; one training step's gradients from the same state;
merge_and_unload against PEFT's merged model. Run with `pytest -s` for the errors."""
import numpy as np
import pytest

import minipeft
from helpers import max_rel_err
from minipeft.adapters.vera import VeRAConfig
from test_peft_oracle import (IDS, base, report_merge_and_unload, check_step_gradients, hf_logits,  # noqa: F401
                              lib, minipeft_saved_in_peft, perturbed_peft_model, report)

pytestmark = pytest.mark.oracle
GRAD_TOL = 1e-4

# name -> (base kind, PEFT VeraConfig kwargs); minipeft reads the same dict via VeRAConfig.from_peft
CASES = {
    "llama": ("llama", dict(r=16, target_modules=["q_proj", "k_proj", "down_proj"], projection_prng_key=3)),
    "gpt2": ("gpt2", dict(r=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}


def peft_model(lib, base, case):
    return perturbed_peft_model(lib, base, CASES[case], "VeraConfig")


@pytest.mark.spec("VERA-2", "VERA-6")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_loads_in_minipeft(lib, base, tmp_path, case):
    pm = peft_model(lib, base, case).eval()
    pm.save_pretrained(tmp_path)
    model = minipeft.load_model(base(CASES[case][0]))
    model.load_adapters(str(tmp_path))
    assert type(model.peft_configs["default"]) is VeRAConfig
    assert np.array_equal(model.shared_tensors["default"]["vera_A"].data, pm.base_model.vera_A["default"].numpy())
    report(f"PEFT->minipeft {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("VERA-2", "VERA-6")
@pytest.mark.parametrize("case", list(CASES))
def test_minipeft_saved_loads_in_peft(lib, base, tmp_path, case):
    kind, kw = CASES[case]
    model, pm = minipeft_saved_in_peft(lib, base(kind), VeRAConfig.from_peft(dict(peft_type="VERA", **kw)), tmp_path)
    assert np.array_equal(pm.base_model.vera_B["default"].numpy(), model.shared_tensors["default"]["vera_B"].data)
    report(f"minipeft->PEFT {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("VERA-5")
@pytest.mark.parametrize("case", list(CASES))
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    check_step_gradients(lib, peft_model(lib, base, case).eval(), base(CASES[case][0]), tmp_path,
                         "vera_lambda_b|vera_lambda_d", case, GRAD_TOL)


@pytest.mark.spec("VERA-3")
@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unload_equals_peft(lib, base, tmp_path, case):
    report_merge_and_unload(lib, peft_model(lib, base, case).eval(), base(CASES[case][0]), tmp_path, case)
