"""LoHa and LoKr against HF PEFT 0.21 (spec/loha.md, spec/lokr.md, spec/peft-format.md): adapters saved by
PEFT load in minipeft and vice versa with equal logits, one training step's gradients agree, and
merge_and_unload gives PEFT's merged model. Same base as tests/test_peft_oracle.py (a tiny random
Llama, weights with std 0.3, whose fixtures and helpers are reused); every adapter tensor is
perturbed by seeded noise, so no factor is zero and a wrong key, orientation, factorisation or
scaling shows. Run with `pytest -s` to see each case's max relative error."""
import numpy as np
import pytest

import minipeft
import test_peft_oracle as lora_oracle
from helpers import max_rel_err
from minipeft.adapters.loha import LoHaConfig
from minipeft.adapters.lokr import LoKrConfig
from minipeft.models.blocks import causal_lm_loss

pytestmark = pytest.mark.oracle

lib, base = lora_oracle.lib, lora_oracle.base  # module-scoped fixtures: torch/transformers/peft, the saved base
hf_model, hf_logits, report = lora_oracle.hf_model, lora_oracle.hf_logits, lora_oracle.report
IDS, GRAD_TOL = lora_oracle.IDS, 1e-4

OURS = {"LOHA": LoHaConfig, "LOKR": LoKrConfig}
# (peft_type, PEFT config kwargs); minipeft reads the same dict through <Config>.from_peft
CASES = {
    "loha_basic": ("LOHA", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    "loha_patterns": ("LOHA", dict(r=4, alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
                                   rank_pattern={"k_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                   alpha_pattern={"q_proj": 3})),
    "loha_all_linear": ("LOHA", dict(r=2, alpha=5, target_modules="all-linear", init_weights=False)),
    "lokr_basic": ("LOKR", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])),
    "lokr_decomposed": ("LOKR", dict(r=2, alpha=3, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
                                     decompose_both=True, decompose_factor=8)),
    "lokr_factor": ("LOKR", dict(r=1, alpha=2, target_modules=["q_proj", "up_proj", "down_proj"], decompose_factor=5,
                                 rank_pattern={"q_proj": 16}, alpha_pattern={"up_proj": 7})),
    "lokr_lycoris_init": ("LOKR", dict(r=4, alpha=4, target_modules="all-linear", init_weights="lycoris",
                                       decompose_factor=16)),
}


def peft_config(lib, case):
    peft = lib[2]
    kind, kw = CASES[case]
    cls = peft.LoHaConfig if kind == "LOHA" else peft.LoKrConfig
    return cls(task_type="CAUSAL_LM", **kw)


def ours(case):
    kind, kw = CASES[case]
    return OURS[kind].from_peft(dict(peft_type=kind, **kw))


def peft_model(lib, base, case, seed=0):
    torch, _, peft = lib
    pm = peft.get_peft_model(hf_model(lib, base()), peft_config(lib, case))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                assert "hada_" in name or "lokr_" in name, name
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return pm.eval()


def peft_saved(lib, base, tmp_path, case):
    """(PEFT model, minipeft model that loaded the adapter PEFT saved): the same state in both."""
    pm = peft_model(lib, base, case)
    pm.save_pretrained(tmp_path)
    model = minipeft.load_model(base())
    model.load_adapters(str(tmp_path))
    return pm, model


@pytest.mark.spec("LOHA-1", "LOHA-2", "LOHA-3", "LOHA-9", "LOKR-1", "LOKR-2", "LOKR-3", "LOKR-4", "LOKR-10",
                  "PEFT-2")
@pytest.mark.parametrize("case", list(CASES))
def test_peft_saved_loads_in_minipeft(lib, base, tmp_path, case):
    """get_peft_model + perturbation + save_pretrained -> minipeft.load_adapters: equal logits."""
    pm, model = peft_saved(lib, base, tmp_path, case)
    assert type(model.peft_configs["default"]) is OURS[CASES[case][0]]
    report(f"PEFT->minipeft {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("LOHA-9", "LOKR-10", "PEFT-2")
@pytest.mark.parametrize("case", list(CASES))
def test_minipeft_saved_loads_in_peft(lib, base, tmp_path, case):
    """minipeft apply_adapter + perturbation + save_adapters -> PeftModel.from_pretrained: equal logits."""
    model, pm = lora_oracle.minipeft_saved_in_peft(lib, base(), ours(case), tmp_path)
    report(f"minipeft->PEFT {case}", max_rel_err(model(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("LOHA-7", "LOHA-8", "LOKR-7", "LOKR-8")
@pytest.mark.parametrize("case", list(CASES))
def test_one_step_gradients_agree(lib, base, tmp_path, case):
    """The same state in both (PEFT's files loaded here), the causal LM loss on IDS, backward: the loss
    and the gradient of every adapter tensor agree; nothing else gets a gradient here."""
    torch = lib[0]
    pm, model = peft_saved(lib, base, tmp_path, case)
    loss_ref = pm(torch.tensor(IDS), labels=torch.tensor(IDS)).loss
    loss_ref.backward()
    loss = causal_lm_loss(model(IDS), IDS)
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad.numpy()
              for n, p in pm.named_parameters() if p.requires_grad}
    path_leaf = {n.replace(".adapters.default", ""): n for n, p in model.net.named_parameters() if p.requires_grad}
    lora_oracle.report_gradients(case, model, {path_leaf.get(n, n): g for n, g in theirs.items()}, GRAD_TOL)


@pytest.mark.spec("LOHA-5", "LOKR-6")
@pytest.mark.parametrize("case", list(CASES))
def test_merge_and_unload_equals_peft(lib, base, tmp_path, case):
    """PEFT's merge_and_unload and minipeft's, from the same files: equal logits and merged weights."""
    pm, model = peft_saved(lib, base, tmp_path, case)
    adapted = {p + ".weight" for p, m in model.net.named_modules() if hasattr(m, "adapters")}
    merged_ref = pm.merge_and_unload()
    model.merge_and_unload()
    weights = {n: p.detach() for n, p in merged_ref.named_parameters()}
    before = {n: p.detach() for n, p in hf_model(lib, base()).named_parameters()}
    assert {n for n, p in model.net.named_parameters() if not np.array_equal(p.data, before[n])} == adapted
    worst = max(max_rel_err(p.data, weights[n]) for n, p in model.net.named_parameters())
    print(f"\n  merged weights {case} ({len(adapted)} changed): max rel err {worst:.2e}")
    assert worst < lora_oracle.TOL
    report(f"merge_and_unload {case}", max_rel_err(model(IDS), hf_logits(lib, merged_ref)))


@pytest.mark.spec("LOHA-5", "LOKR-6")
def test_peft_refuses_gpt2_conv1d(lib, base):
    """The one deviation: PEFT's LoHa and LoKr take nn.Linear/Conv1d/Conv2d only, so they refuse
    gpt2's Conv1D, which minipeft adapts (merge writes dW^T into the (in, out) weight)."""
    pytest.importorskip("minipeft.models.gpt2", reason="minipeft.models.gpt2 is not written yet")
    _, _, peft = lib
    for cls in (peft.LoHaConfig, peft.LoKrConfig):
        with pytest.raises((TypeError, ValueError)):
            peft.get_peft_model(hf_model(lib, base("gpt2")), cls(task_type="CAUSAL_LM", target_modules=["c_attn"]))
