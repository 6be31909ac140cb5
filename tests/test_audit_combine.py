"""`minipeft audit combine` (spec/audit.md AUDIT-14..AUDIT-18): every combination type written by minipeft's
merge_adapters passes; planted defects (wrong weights, one value off by 1e-3, a changed mask entry, a scale that
is not 1) give their finding and exit status 1; bad input exits 2. Oracle tests: PEFT 0.21.2's
add_weighted_adapter with rsLoRA sources writes a combined adapter sqrt(r) times too large (PEFT issue #3761),
which the audit names; without rsLoRA PEFT's combinations pass."""
import json
import math
import shutil

import numpy as np
import pytest

import minipeft as mp
from minipeft.adapters.combine import COMBINATIONS
from minipeft.audit import audit_combine
from minipeft.cli import main
from tests.test_audit_adapter import PREFIX, edit
from tests.test_audit_merged import base, hf_base  # noqa: F401

WEIGHTS = [0.7, 0.4]
PRUNED = {"ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd", "dare_ties_svd",
          "magnitude_prune_svd"}
NOTES = {"dare_linear": ["random-masks"], "dare_ties": ["random-masks"], "dare_linear_svd": ["unverifiable"],
         "dare_ties_svd": ["unverifiable"]}


def combined_by_minipeft(base, tmp_path, combination, weights=WEIGHTS, rank=(4, 4), first=None, **merge):
    """(source folders, combined folder): two LoRA sources (the first rsLoRA, with `first`'s options too) on q/v,
    every factor moved, and their combination by merge_adapters(**merge), saved."""
    model = mp.load_model(base)
    for i, r in enumerate(rank):
        model.apply_lora(rank=r, alpha=8, target_modules=["q_proj", "v_proj"], name=f"s{i}", use_rslora=i == 0,
                         **(first or {} if i == 0 else {}))
    rng = np.random.default_rng(0)
    for name, p in model.net.named_parameters():
        if ".lora_" in name or p.requires_grad:
            p.data = (p.data + rng.standard_normal(p.shape) * 0.2).astype(np.float32)
    model.merge_adapters({"s0": weights[0], "s1": weights[1]}, name="mix", combination=combination, density=0.5,
                         **merge)
    model.save_adapters(str(tmp_path / "out"))
    return [str(tmp_path / "out" / "s0"), str(tmp_path / "out" / "s1")], str(tmp_path / "out" / "mix")


def audit(sources, combined, combination, weights=WEIGHTS, **kw):
    return audit_combine(sources, weights, combination, combined, density=0.5 if combination in PRUNED else None,
                         show_progress=False, **kw)


@pytest.mark.spec("AUDIT-14", "AUDIT-15", "AUDIT-16", "AUDIT-17")
@pytest.mark.parametrize("combination", COMBINATIONS)
def test_every_combination_by_minipeft_passes(combination, base, tmp_path):
    sources, mix = combined_by_minipeft(base, tmp_path, combination)
    r = audit(sources, mix, combination)
    assert r.status == 0 and [f.kind for f in r.findings] == NOTES.get(combination, []), [f.line() for f in r.findings]
    assert len(r.layers) == 4 and all(c.ok and c.sources == 2 and c.scale == 1.0 for c in r.layers)
    if combination not in ("dare_linear_svd", "dare_ties_svd"):
        assert max(c.error for c in r.layers) < 1e-6
    if combination == "linear":  # factor-wise: cross terms B_1 A_2, B_2 A_1 make it differ from the weighted sum
        assert min(c.exact_gap for c in r.layers) > 0.05
    if combination in ("svd", "ties_svd"):  # rank 4 of a sum of rank 8: the optimum error is not 0
        assert min(c.optimum for c in r.layers) > 0.01


@pytest.mark.spec("AUDIT-15", "AUDIT-18")
def test_cat_with_wrong_weights_or_one_value_off(base, tmp_path, capsys):
    sources, mix = combined_by_minipeft(base, tmp_path, "cat", rank=(4, 2))
    r = audit(sources, mix, "cat", weights=[0.7, 0.5])
    assert r.status == 1 and [f.kind for f in r.findings] == ["wrong-combination"] * 4
    key = f"{PREFIX}model.layers.1.self_attn.v_proj.lora_A.weight"
    edit(mix, lambda t: t[key].__setitem__((0, 3), t[key][0, 3] + 1e-3))
    r = audit(sources, mix, "cat")
    [f] = r.findings
    assert r.status == 1 and f.kind == "wrong-combination" and f.tensor == "model.layers.1.self_attn.v_proj"
    assert "exact weighted sum" in f.message
    args = ["audit", "combine", "--adapters", *sources, "--weights", "0.7", "0.4", "--type", "cat", "--combined", mix]
    assert main([*args, "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["command"] == "audit combine" and [x["kind"] for x in out["findings"]] == ["wrong-combination"]


@pytest.mark.spec("AUDIT-17", "AUDIT-18")
def test_a_changed_mask_entry_and_a_scale_not_one(base, tmp_path):
    sources, mix = combined_by_minipeft(base, tmp_path, "dare_ties")
    key = f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"
    edit(mix, lambda t: t[key].__setitem__((2, 1), t[key][2, 1] * 1.01 + 0.01))
    r = audit(sources, mix, "dare_ties")
    assert r.status == 1 and [f.kind for f in r.findings if f.breaks] == ["wrong-combination"]
    bad = [c for c in r.layers if not c.ok]
    assert [c.path for c in bad] == ["model.layers.0.self_attn.q_proj"] and bad[0].error == pytest.approx(1 / (4 * 32 * 2))
    sources, mix = combined_by_minipeft(base, tmp_path / "b", "svd")
    edit(mix, config=lambda c: c.update(use_rslora=True))
    r = audit(sources, mix, "svd")
    [f] = r.findings
    assert r.status == 1 and f.kind == "rslora-scale" and f.file.endswith("adapter_config.json")
    assert "expected scale is 1" in f.message and f"= {math.sqrt(4):.4g}" in f.message and "#3761" in f.message
    edit(mix, config=lambda c: c.update(use_rslora=False, lora_alpha=8))  # alpha / r = 2
    [f] = audit(sources, mix, "svd").findings
    assert f.kind == "combined-scale" and "2 x the combination at 4 layer(s)" in f.message


@pytest.mark.spec("AUDIT-14", "AUDIT-1")
def test_bad_input_exits_2(base, tmp_path, capsys):
    sources, mix = combined_by_minipeft(base, tmp_path, "ties")
    args = ["audit", "combine", "--adapters", *sources, "--combined", mix, "--no-progress"]
    assert main([*args, "--weights", "0.7", "0.4", "--type", "ties"]) == 2
    assert "--density" in capsys.readouterr().err
    assert main([*args, "--weights", "0.7", "--type", "cat"]) == 2
    assert "one weight per adapter" in capsys.readouterr().err
    assert main([*args, "--weights", "0.7", "0.4", "--type", "ties", "--density", "0.5"]) == 0


def combined_by_peft(hf_base, tmp_path, combination, use_rslora, weights=WEIGHTS, lora_bias=False, **merge):
    """(source folders, combined folder) of PEFT: two LoRA sources r = 4 (use_rslora as given), every factor moved,
    add_weighted_adapter(..., combination) as "mix", saved by save_pretrained."""
    import peft
    import torch
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    cfg = dict(r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=["q_proj", "v_proj"], lora_bias=lora_bias)
    torch.manual_seed(0)  # PEFT's init draws from the global generator: the same sources every run
    pm = peft.get_peft_model(hf, peft.LoraConfig(**cfg))
    pm.add_adapter("other", peft.LoraConfig(**cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    kw = {"density": 0.5, **merge} if combination in PRUNED else merge
    pm.add_weighted_adapter(["default", "other"], weights, "mix", combination_type=combination, **kw)
    pm.save_pretrained(str(tmp_path / "peft"))
    return [str(tmp_path / "peft"), str(tmp_path / "peft" / "other")], str(tmp_path / "peft" / "mix")


@pytest.mark.oracle
@pytest.mark.spec("AUDIT-15", "AUDIT-18")
@pytest.mark.parametrize("combination", ["cat", "svd", "linear"])
def test_peft_rslora_combination_is_flagged(combination, hf_base, tmp_path):
    pytest.importorskip("peft")
    sources, mix = combined_by_peft(hf_base, tmp_path, combination, use_rslora=True, weights=[1.0, 1.0])
    r = audit(sources, mix, combination, weights=[1.0, 1.0], base=hf_base)
    [f] = r.findings
    new_rank = 8 if combination == "cat" else 4
    assert r.status == 1 and f.kind == "rslora-scale", f.line()
    assert f"lora_alpha / sqrt(r) = {new_rank} / sqrt({new_rank}) = {math.sqrt(new_rank):.4g}" in f.message
    assert all(not c.ok and c.scale == pytest.approx(math.sqrt(new_rank)) for c in r.layers)
    print(f"\n  PEFT {combination} of rsLoRA sources: found scale {r.layers[0].scale:.4g}, expected 1")


@pytest.mark.oracle
@pytest.mark.spec("AUDIT-15", "AUDIT-16", "AUDIT-17")
@pytest.mark.parametrize("combination", ["cat", "linear", "svd", "ties", "magnitude_prune", "ties_svd",
                                         "dare_linear", "dare_ties", "dare_linear_svd"])
def test_peft_combination_passes(combination, hf_base, tmp_path):
    pytest.importorskip("peft")
    sources, mix = combined_by_peft(hf_base, tmp_path, combination, use_rslora=False)
    r = audit(sources, mix, combination, base=hf_base)
    assert r.status == 0 and [f.kind for f in r.findings] == NOTES.get(combination, []), [f.line() for f in r.findings]
    errors = [c.error for c in r.layers if c.error is not None]
    print(f"\n  PEFT {combination}: worst error {max(errors, default=0):.2e}")
    assert len(r.layers) == 4 and max(errors, default=0) < 1e-5


@pytest.mark.spec("AUDIT-14")
def test_a_factorwise_type_of_unequal_ranks_is_bad_input(base, tmp_path, capsys):
    sources, mix = combined_by_minipeft(base, tmp_path, "cat", rank=(4, 2))
    args = ["audit", "combine", "--adapters", *sources, "--weights", "0.7", "0.4", "--combined", mix]
    assert main([*args, "--type", "linear"]) == 2
    assert "needs equal ranks" in capsys.readouterr().err


@pytest.mark.spec("AUDIT-26")
@pytest.mark.parametrize("combination", ["cat", "linear", "svd"])
def test_lora_b_biases_combine_as_the_weighted_sum(combination, base, tmp_path):
    sources, mix = combined_by_minipeft(base, tmp_path, combination, first={"lora_bias": True})
    r = audit(sources, mix, combination)
    assert r.status == 0 and [f.kind for f in r.findings] == [], [f.line() for f in r.findings]
    key = f"{PREFIX}model.layers.1.self_attn.q_proj.lora_B.bias"
    edit(mix, lambda t: t[key].__setitem__(0, t[key][0] + 1e-2))
    [f] = audit(sources, mix, combination).findings
    assert f.kind == "wrong-bias" and f.tensor == key and "sum_i w_i s_i b_i" in f.message


@pytest.mark.spec("AUDIT-26")
def test_a_modules_to_save_copy_must_be_the_sources(base, tmp_path):
    sources, mix = combined_by_minipeft(base, tmp_path, "cat", first={"modules_to_save": ["lm_head"]})
    r = audit(sources, mix, "cat")
    assert r.status == 0 and r.findings == [], [f.line() for f in r.findings]
    key = f"{PREFIX}lm_head.weight"
    edit(mix, lambda t: t[key].__setitem__((0, 0), t[key][0, 0] + 1.0))
    [f] = audit(sources, mix, "cat").findings
    assert f.kind == "copy-differs" and f.tensor == key and sources[0] in f.message
    edit(mix, lambda t: t.pop(key))
    kinds = [f.kind for f in audit(sources, mix, "cat").findings]
    assert kinds == ["copy-missing"], kinds


@pytest.mark.spec("AUDIT-16", "AUDIT-26")
def test_an_svd_clamp_is_checked_against_the_clipped_factors(base, tmp_path, capsys):
    sources, mix = combined_by_minipeft(base, tmp_path, "svd", svd_clamp=0.9)
    r = audit(sources, mix, "svd", svd_clamp=0.9)
    assert r.status == 0 and r.findings == [] and max(c.error for c in r.layers) < 1e-6, [f.line() for f in r.findings]
    r = audit(sources, mix, "svd")  # judged without the clamp: farther from D than the optimum
    assert r.status == 1 and {f.kind for f in r.findings} == {"wrong-combination"}
    r = audit(sources, mix, "svd", svd_clamp=0.5)
    assert r.status == 1
    args = ["audit", "combine", "--adapters", *sources, "--weights", "0.7", "0.4", "--combined", mix, "--svd-clamp"]
    assert main([*args, "0.9", "--type", "svd", "--no-progress"]) == 0
    assert main([*args, "0.9", "--type", "cat"]) == 2 and "*svd types only" in capsys.readouterr().err
    assert main([*args, "1.5", "--type", "svd"]) == 2


@pytest.mark.oracle
@pytest.mark.spec("AUDIT-16", "AUDIT-26")
@pytest.mark.parametrize("combination", ["svd", "ties_svd"])
def test_peft_svd_clamp_passes(combination, hf_base, tmp_path):
    pytest.importorskip("peft")
    sources, mix = combined_by_peft(hf_base, tmp_path, combination, use_rslora=False, svd_clamp=0.9)
    r = audit(sources, mix, combination, base=hf_base, svd_clamp=0.9)
    assert r.status == 0 and r.findings == [], [f.line() for f in r.findings]
    worst = max(c.error for c in r.layers)
    print(f"\n  PEFT {combination} with svd_clamp 0.9: worst error against the clipped factors {worst:.2e}")
    assert worst < 1e-5


@pytest.mark.oracle
@pytest.mark.spec("AUDIT-26")
def test_peft_leaves_lora_b_biases_out_and_it_is_flagged(hf_base, tmp_path):
    """PEFT 0.21.2's add_weighted_adapter combines lora_B weights only: C's lora_B bias stays at its zero init."""
    pytest.importorskip("peft")
    sources, mix = combined_by_peft(hf_base, tmp_path, "cat", use_rslora=False, lora_bias=True)
    r = audit(sources, mix, "cat", base=hf_base)
    assert r.status == 1 and [f.kind for f in r.findings] == ["wrong-bias"] * 4, [f.line() for f in r.findings]
    assert all("relative error 1 >" in f.message for f in r.findings)
    assert all(c.ok for c in r.layers)  # the weights are combined right
