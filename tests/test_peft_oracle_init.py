"""The initialisers (kind "initialiser", spec/methods.md METHOD-10) against HF PEFT 0.21's init_lora_weights:
PEFT's init and minipeft's on the same base weights, compared where both are deterministic (the effective
weight W0 + s B A of every adapted layer, or the init's own factors), then a perturbed adapter saved by
each side and loaded by the other with equal logits. The base is the random Llama of test_peft_oracle.py, and
for LoftQ its wider kind "llama64" (in_features 64 and 128 keep bitsandbytes' CPU NF4 exact, spec/loftq.md).
Run with `pytest -s` to see each measured error."""
import numpy as np
import pytest

import minipeft
from helpers import max_rel_err, peft_loftq_on_cpu
from test_peft_oracle import IDS, TOL, base, hf_logits, hf_model, lib, perturb_minipeft, perturb_peft, report  # noqa: F401

pytestmark = pytest.mark.oracle
TARGETS = ["q_proj", "v_proj", "down_proj"]


def peft_model(lib, folder, **kw):
    torch, _, peft = lib
    torch.manual_seed(0)
    return peft.get_peft_model(hf_model(lib, folder), peft.LoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS, **kw))


def effective_weights(lib, pm) -> dict:
    """{module path: W0 + s B A} of every LoRA layer of a PeftModel, float64, (out, in)."""
    out = {}
    for path, m in pm.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            W0 = m.get_base_layer().weight.detach().double()
            out[path] = (W0 + m.get_delta_weight("default").detach().double()).numpy()
    return out


def our_effective_weights(model) -> dict:
    out = {}
    for path, m in model.net.named_modules():
        if hasattr(m, "adapters") and "default" in m.adapters:
            W0 = np.asarray(m.base_layer.weight.data, np.float64)
            out[path] = W0 + np.asarray(m.adapters["default"].delta_weight(), np.float64)
    return out


def compare_effective(lib, pm, model, label, tol=TOL):
    theirs, ours = effective_weights(lib, pm), our_effective_weights(model)
    assert sorted(theirs) == sorted(ours)
    report(f"{label} W0 + s B A vs PEFT (worst layer)", max(max_rel_err(ours[p], theirs[p]) for p in ours))


def both_ways(lib, folder, pm, model, label, tmp_path):
    """Perturb both, save each, load in the other: equal logits (and the loaded config's class)."""
    peft = lib[2]
    perturb_minipeft(model)
    model.save_adapters(str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(hf_model(lib, folder), str(tmp_path / "ours")).eval()
    report(f"{label} minipeft->PEFT", max_rel_err(model(IDS), hf_logits(lib, theirs)))
    perturb_peft(lib, pm)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    back = minipeft.load_model(folder)
    back.load_adapters(str(tmp_path / "peft"))
    report(f"{label} PEFT->minipeft", max_rel_err(back(IDS), hf_logits(lib, pm)))
    assert type(back.peft_configs["default"]) is type(model.peft_configs["default"])


@pytest.mark.spec("ORTHOGONAL-2", "ORTHOGONAL-4", "METHOD-10")
def test_orthogonal(lib, base, tmp_path):
    pm = peft_model(lib, base(), r=4, lora_alpha=8, init_lora_weights="orthogonal")
    model = minipeft.load_model(base())
    base_logits = model(IDS).numpy()
    model.apply_orthogonal(rank=4, alpha=8, target_modules=tuple(TARGETS))
    compare_effective(lib, pm, model, "orthogonal")  # both are W0: B A = 0 whatever the draws
    report("orthogonal PEFT at init vs base", max_rel_err(hf_logits(lib, pm), base_logits))
    report("orthogonal minipeft at init vs base", max_rel_err(model(IDS), base_logits))
    for side, tensors in (("PEFT", [p.detach().numpy() for n, p in pm.named_parameters() if "lora_" in n]),
                          ("minipeft", [p.numpy() for n, p in model.net.named_parameters() if p.requires_grad])):
        mean_square = np.mean(np.concatenate([t.ravel() for t in tensors]) ** 2)
        print(f"\n  orthogonal {side}: mean square of the entries x 200 = {mean_square * 200:.3f}")
        assert abs(mean_square * 200 - 1) < 0.2
    both_ways(lib, base(), pm, model, "orthogonal", tmp_path)


@pytest.mark.spec("MICA-1", "MICA-2", "MICA-4", "METHOD-10")
def test_mica(lib, base, tmp_path):
    pm = peft_model(lib, base(), r=4, lora_alpha=8, init_lora_weights="mica")
    model = minipeft.load_model(base())
    model.apply_mica(rank=4, alpha=8, target_modules=tuple(TARGETS))
    theirs = {p: m.lora_B["default"].weight.detach().double().numpy()
              for p, m in pm.base_model.model.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B}
    ours = {p: np.asarray(m.adapters["default"].lora_B.weight.data, np.float64)
            for p, m in model.net.named_modules() if hasattr(m, "adapters")}
    assert sorted(theirs) == sorted(ours)
    worst = 0.0
    for p, B in ours.items():  # the same singular vectors, each up to its sign
        signs = np.sign(np.sum(B * theirs[p], axis=0))
        worst = max(worst, float(np.max(np.abs(B * signs - theirs[p]))))
    report("mica B vs PEFT's, up to column signs (max abs)", worst)
    compare_effective(lib, pm, model, "mica")  # A = 0 on both sides: W0
    assert pm.get_nb_trainable_parameters()[0] == model.parameter_counts()[0]  # A alone trains, in both
    both_ways(lib, base(), pm, model, "mica", tmp_path)
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "lora_B" in n)


@pytest.mark.spec("LOFTQ-1", "LOFTQ-4", "LOFTQ-6", "METHOD-10")
@pytest.mark.parametrize("T", [1, 2])
def test_loftq(lib, base, tmp_path, T):
    """PEFT's loftq_init on the CPU (helpers.peft_loftq_on_cpu); s = 2, so A and B are not divided by s."""
    peft = lib[2]
    with peft_loftq_on_cpu():
        folder = base("llama64")
        pm = peft_model(lib, folder, r=4, lora_alpha=8, init_lora_weights="loftq",
                        loftq_config=peft.LoftQConfig(loftq_bits=4, loftq_iter=T))
        model = minipeft.load_model(folder)
        model.apply_loftq(rank=4, alpha=8, loftq_config={"loftq_bits": 4, "loftq_iter": T}, target_modules=tuple(TARGETS))
        theirs = {p: (m.get_base_layer().weight.detach().double().numpy(), m.get_delta_weight("default").detach().double().numpy())
                  for p, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
        ours = {p: (np.asarray(m.base_layer.weight.data, np.float64), np.asarray(m.adapters["default"].delta_weight(), np.float64))
                for p, m in model.net.named_modules() if hasattr(m, "adapters")}
        assert sorted(theirs) == sorted(ours)
        q_err = max(float(np.max(np.abs(ours[p][0] - theirs[p][0]))) for p in ours)
        print(f"\n  loftq T={T}: residual base weight Q_T vs PEFT's: max abs diff {q_err:.2e}")
        assert q_err == 0.0 if T == 1 else q_err < 1e-5
        # s B A on its own scale (a tenth of W's): two float32 SVDs of a noise-like W - Q_T, whose singular
        # values r and r + 1 lie close, agree to 1.4e-5 here (spec/loftq.md LOFTQ-6)
        sba = max(max_rel_err(ours[p][1], theirs[p][1]) for p in ours)
        print(f"\n  loftq T={T} s B A vs PEFT (worst layer): max rel err {sba:.2e}")
        assert sba < 5e-5
        compare_effective(lib, pm, model, f"loftq T={T}")
        both_ways(lib, folder, pm, model, f"loftq T={T}", tmp_path)
