"""AdaLoRA against HF PEFT (spec/adalora.md), in the set-up of test_peft_oracle.py: a tiny random Llama or
GPT-2 (Conv1D, fan_in_fan_out) with every lora_A, lora_B, lora_E perturbed by seeded noise (so E != 0).
Checked: PEFT's save loads here with equal logits and the reverse; one training step's gradients, with
the orthogonality penalty in the loss; merge_and_unload; and the rank allocator: fed the same gradients
at every step, both libraries keep the same E entries and rank_pattern, and the pruned files each one
saves after allocation load in the other with equal logits; model.train against PEFT's documented loop.
Run with `pytest -s` for the errors."""
import re

import numpy as np
import pytest

import minipeft
from helpers import max_rel_err
from minipeft.adapters.adalora import AdaLoRAConfig
from minipeft.autograd import Tensor
from minipeft.autograd import functional as F
from minipeft.safetensors_io import read_safetensors
from test_peft_oracle import (IDS, V, base, hf_logits, hf_model, lib, minipeft_saved_in_peft, perturb_peft,  # noqa: F401
                              report, report_gradients)

pytestmark = pytest.mark.oracle
GRAD_TOL = 1e-4

# name -> (base kind, PEFT AdaLoraConfig kwargs); minipeft reads the same dict via AdaLoRAConfig.from_peft
CASES = {
    "llama": ("llama", dict(init_r=6, target_r=3, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            total_step=8, tinit=2, tfinal=2, beta1=0.8, beta2=0.9, orth_reg_weight=0.3)),
    "gpt2": ("gpt2", dict(init_r=4, target_r=2, lora_alpha=16, target_modules=["c_attn", "c_fc"], total_step=6,
                          tinit=1, tfinal=1, deltaT=2, fan_in_fan_out=True)),
}
LEAF = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B|lora_E)\.default$")


def peft_model(lib, base, case):
    _, _, peft = lib
    kind, kw = CASES[case]
    pm = peft.get_peft_model(hf_model(lib, base(kind)), peft.AdaLoraConfig(task_type="CAUSAL_LM", **kw))
    perturb_peft(lib, pm)
    return pm.eval()


def minipeft_from(base, case, folder):
    model = minipeft.load_model(base(CASES[case][0]))
    model.load_adapters(str(folder))
    assert type(model.peft_configs["default"]) is AdaLoRAConfig
    return model


def ours_name(peft_name):
    return "{}.adapters.default.{}".format(*LEAF.match(peft_name).groups())


@pytest.mark.spec("ADALORA-2", "ADALORA-3", "ADALORA-10")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_loads_in_minipeft(lib, base, tmp_path, case):
    pm = peft_model(lib, base, case)
    pm.save_pretrained(tmp_path)
    report(f"PEFT->minipeft {case}", max_rel_err(minipeft_from(base, case, tmp_path)(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("ADALORA-2", "ADALORA-3", "ADALORA-10")
@pytest.mark.parametrize("case", list(CASES))
def test_minipeft_saved_loads_in_peft(lib, base, tmp_path, case):
    kind, kw = CASES[case]
    model, pm = minipeft_saved_in_peft(lib, base(kind), AdaLoRAConfig.from_peft(dict(peft_type="ADALORA", **kw)),
                                       tmp_path)
    report(f"minipeft->PEFT {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("ADALORA-5", "ADALORA-6")
@pytest.mark.parametrize("case", list(CASES))
def test_training_step_gradients_agree(lib, base, tmp_path, case):
    """PEFT's outputs.loss (next-token cross-entropy + orth_reg_weight * mean norm) against minipeft's loss
    + model.regularization(), from the same state: every trainable gradient."""
    torch = lib[0]
    pm = peft_model(lib, base, case)
    pm.save_pretrained(tmp_path)
    out = pm(input_ids=torch.tensor(IDS), labels=torch.tensor(IDS))
    out.loss.backward()
    theirs = {ours_name(n): p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    model = minipeft_from(base, case, tmp_path)
    logits = model(IDS)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), Tensor(IDS[:, 1:].reshape(-1))) + model.regularization()
    report(f"loss with penalty {case}", max_rel_err(loss, out.loss))
    loss.backward()
    report_gradients(case, model, theirs, GRAD_TOL)


@pytest.mark.spec("ADALORA-4")
@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unload_equals_peft(lib, base, tmp_path, case):
    pm = peft_model(lib, base, case)
    pm.save_pretrained(tmp_path)
    theirs = hf_logits(lib, pm.merge_and_unload())
    report(f"merge_and_unload vs PEFT {case}", max_rel_err(minipeft_from(base, case, tmp_path).merge_and_unload()(IDS),
                                                           theirs))


@pytest.mark.spec("ADALORA-7", "ADALORA-8", "ADALORA-9", "ADALORA-10")
@pytest.mark.parametrize("case", list(CASES))
def test_allocation_with_same_gradients_matches_peft(lib, base, tmp_path, case):
    """Seeded gradients set on both models' A, B, E before each update_and_allocate(t), t = 0 .. total_step + 1:
    E is equal bit for bit after every step and rank_pattern after every masking; then each library's pruned
    save loads in the other with equal logits, and the two files hold the same tensors."""
    torch, _, peft = lib
    pm = peft_model(lib, base, case)
    pm.save_pretrained(tmp_path / "start")
    model = minipeft_from(base, case, tmp_path / "start")
    params = dict(model.net.named_parameters())
    cfg, total = model.peft_configs["default"], CASES[case][1]["total_step"]
    rng = np.random.default_rng(0)
    for t in range(total + 2):
        for n, p in pm.named_parameters():
            if p.requires_grad:
                g = rng.standard_normal(tuple(p.shape)).astype(np.float32)
                p.grad = torch.from_numpy(g.copy())
                params[ours_name(n)].grad = g
        pm.base_model.update_and_allocate(t)
        model.update_and_allocate(t)
        for n, p in pm.named_parameters():
            if n.endswith("lora_E.default"):
                assert np.array_equal(params[ours_name(n)].data, p.detach().numpy()), (t, n)
        pattern = pm.peft_config["default"].rank_pattern
        assert cfg.rank_pattern == ({k.removesuffix(".default"): v for k, v in pattern.items()} if pattern else None)
    kept = sum(sum(v) for v in cfg.rank_pattern.values())
    assert kept == CASES[case][1]["target_r"] * len(cfg.rank_pattern)
    print(f"\n  allocation {case}: rank_pattern equal, {kept} triplets kept: "
          f"{ {k: sum(v) for k, v in cfg.rank_pattern.items()} }")
    for p in pm.parameters():
        p.grad = None
    pm.save_pretrained(tmp_path / "peft")
    model.save_adapters(str(tmp_path / "mini"))
    a, _ = read_safetensors(str(tmp_path / "peft" / "adapter_model.safetensors"))
    b, _ = read_safetensors(str(tmp_path / "mini" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)  # same pruned layout and values
    report(f"allocated, PEFT->minipeft {case}", max_rel_err(minipeft_from(base, case, tmp_path / "peft")(IDS),
                                                            hf_logits(lib, pm)))
    again = peft.PeftModel.from_pretrained(hf_model(lib, base(CASES[case][0])), str(tmp_path / "mini")).eval()
    report(f"allocated, minipeft->PEFT {case}", max_rel_err(model(IDS), hf_logits(lib, again)))


@pytest.mark.spec("ADALORA-12")
def test_model_train_equals_peft_training_loop(lib, base, tmp_path):
    """model.train (AdamW, constant lr, no clipping) against PEFT's documented loop from the same state:
    loss = outputs.loss (penalty included); backward; optimizer.step(); update_and_allocate(t); zero_grad().
    Same rank_pattern after total_step steps, and logits within GRAD_TOL."""
    torch = lib[0]
    kw = CASES["llama"][1]
    pm = peft_model(lib, base, "llama")
    pm.save_pretrained(tmp_path)
    model = minipeft_from(base, "llama", tmp_path)
    rows = [{"input_ids": [int(t) for t in r]} for r in IDS]
    hist = model.train(rows, minipeft.TrainingConfig(learning_rate=1e-2, batch_size=len(rows), schedule="constant",
                                                     max_steps=kw["total_step"], max_grad_norm=None, shuffle=False,
                                                     progress=False))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    pm.train()
    losses = []
    for t in range(kw["total_step"]):
        loss = pm(input_ids=torch.tensor(IDS), labels=torch.tensor(IDS)).loss
        loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(t)
        opt.zero_grad()
        losses.append(loss.item())
    report("training losses (penalty included)", max_rel_err(np.array(hist["loss"]), np.array(losses)))
    pattern = pm.peft_config["default"].rank_pattern
    assert model.peft_configs["default"].rank_pattern == {k.removesuffix(".default"): v for k, v in pattern.items()}
    err = max_rel_err(model(IDS), hf_logits(lib, pm.eval()))
    print(f"\n  logits after {kw['total_step']} steps of model.train vs PEFT's loop: max rel err {err:.2e}")
    assert err < GRAD_TOL
