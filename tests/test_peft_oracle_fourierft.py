"""FourierFT against HF PEFT (spec/fourierft.md), in the set-up of test_peft_oracle.py: a tiny random
Llama or GPT-2 (Conv1D, fan_in_fan_out), every fourierft_spectrum entry perturbed with seeded noise.
The positions are not in the file: both libraries rebuild them from random_loc_seed (FOURIERFT-1), so
equal logits check minipeft's rebuild of torch.randperm too. Checked: PEFT's save loads here with equal
logits and the reverse; one training step's gradients; merge_and_unload against PEFT's merged model;
the trainable count; the n_frequency > in * out error. Run with `pytest -s` for the errors."""
import numpy as np
import pytest

import minipeft
from helpers import max_rel_err
from minipeft.adapters.fourierft import FourierFTConfig
from minipeft.errors import ConfigError
from test_peft_oracle import (IDS, base, report_merge_and_unload, check_step_gradients, hf_logits,  # noqa: F401
                              hf_model, lib, minipeft_saved_in_peft, perturb_peft, report)

pytestmark = pytest.mark.oracle
GRAD_TOL = 1e-4

# name -> (base kind, PEFT FourierFTConfig kwargs); minipeft reads the same dict via FourierFTConfig.from_peft
CASES = {
    "llama": ("llama", dict(n_frequency=100, scaling=15.0, random_loc_seed=3,
                            target_modules=["q_proj", "k_proj", "down_proj"])),
    "pattern": ("llama", dict(n_frequency=64, scaling=20.0, target_modules=["q_proj", "v_proj", "up_proj"],
                              n_frequency_pattern={"v_proj": 32, r"layers\.1\.mlp\.up_proj": 2048})),
    "gpt2": ("gpt2", dict(n_frequency=50, scaling=10.0, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)),
}


def peft_model(lib, base, case):
    _, _, peft = lib
    kind, kw = CASES[case]
    pm = peft.get_peft_model(hf_model(lib, base(kind)), peft.FourierFTConfig(task_type="CAUSAL_LM", **kw))
    perturb_peft(lib, pm)
    return pm


@pytest.mark.spec("FOURIERFT-1", "FOURIERFT-2", "FOURIERFT-3", "FOURIERFT-7")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_loads_in_minipeft(lib, base, tmp_path, case):
    pm = peft_model(lib, base, case).eval()
    pm.save_pretrained(tmp_path)
    model = minipeft.load_model(base(CASES[case][0]))
    model.load_adapters(str(tmp_path))
    assert type(model.peft_configs["default"]) is FourierFTConfig
    for name, m in pm.named_modules():  # PEFT's (2, n_f) indices = ours as (p // in, p % in)
        if hasattr(m, "indices") and "default" in getattr(m, "indices", {}):
            d = model.net.get_submodule(name.removeprefix("base_model.model.")).adapters["default"]
            p = np.asarray(d.positions[0])
            assert np.array_equal(m.indices["default"].numpy(), np.stack([p // d.shape[1], p % d.shape[1]]))
    report(f"PEFT->minipeft {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("FOURIERFT-2", "FOURIERFT-3", "FOURIERFT-7")
@pytest.mark.parametrize("case", list(CASES))
def test_minipeft_saved_loads_in_peft(lib, base, tmp_path, case):
    kind, kw = CASES[case]
    cfg = FourierFTConfig.from_peft(dict(peft_type="FOURIERFT", **kw))
    model, pm = minipeft_saved_in_peft(lib, base(kind), cfg, tmp_path)
    report(f"minipeft->PEFT {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("FOURIERFT-4", "FOURIERFT-6")
@pytest.mark.parametrize("case", list(CASES))
def test_init_and_parameter_count_equal_peft(lib, base, case):
    """init_weights=True gives the base model's logits in both; the default N(0, 1) moves them in both;
    the trainable count is PEFT's."""
    torch, _, peft = lib
    kind, kw = CASES[case]
    for init in (False, True):
        pm = peft.get_peft_model(hf_model(lib, base(kind)),
                                 peft.FourierFTConfig(task_type="CAUSAL_LM", init_weights=init, **kw)).eval()
        model = minipeft.load_model(base(kind))
        plain = model(IDS).data
        model.apply_adapter(FourierFTConfig.from_peft(dict(peft_type="FOURIERFT", init_weights=init, **kw)))
        theirs = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        assert model.parameter_counts()[0] == theirs
        if init:
            assert np.array_equal(model(IDS).data, plain)
            report(f"init=True vs PEFT {case}", max_rel_err(plain, hf_logits(lib, pm)))
        else:
            assert max_rel_err(model(IDS), plain) > 1e-3 and max_rel_err(hf_logits(lib, pm), plain) > 1e-3


@pytest.mark.spec("FOURIERFT-8")
def test_n_frequency_above_in_times_out_is_refused_like_peft(lib, base):
    torch, _, peft = lib
    kw = dict(n_frequency=32 * 32 + 1, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="n_frequency"):
        peft.get_peft_model(hf_model(lib, base()), peft.FourierFTConfig(task_type="CAUSAL_LM", **kw))
    with pytest.raises(ConfigError, match="n_frequency.*1024"):
        minipeft.load_model(base()).apply_adapter(FourierFTConfig(**kw))


@pytest.mark.spec("FOURIERFT-6")
@pytest.mark.parametrize("case", list(CASES))
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    check_step_gradients(lib, peft_model(lib, base, case).eval(), base(CASES[case][0]), tmp_path,
                         "fourierft_spectrum", case, GRAD_TOL)


@pytest.mark.spec("FOURIERFT-5")
@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unload_equals_peft(lib, base, tmp_path, case):
    report_merge_and_unload(lib, peft_model(lib, base, case).eval(), base(CASES[case][0]), tmp_path, case)
