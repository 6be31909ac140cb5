"""EVA (spec/eva.md) against HF PEFT 0.21's init_lora_weights="eva" with initialize_lora_eva_weights: the same
random llama (test_peft_oracle.py's) and the same batches (right padding, label masks) on both sides. The
ranks EVA chose, the alphas, the adapted layers and every lora_A equal PEFT's; logits at init are the base's;
perturbed adapters saved by either side load in the other with equal logits. Every targeted layer has
2 k_l >= in (rank 8 with rho 2 on the 32-wide inputs, 16 on down_proj's 64), where PEFT's randomized SVD is
exact. Run with `pytest -s` to see each measured error."""
import numpy as np
import pytest

import minipeft
from helpers import max_rel_err
from test_peft_oracle import IDS, V, base, hf_logits, hf_model, lib, perturb_minipeft, perturb_peft, report  # noqa: F401

pytestmark = pytest.mark.oracle
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # layers that read one input (EVA-1)
FIELDS = dict(rank=8, alpha=16, target_modules=TARGETS, rank_pattern={"down_proj": 16})


def batches():
    """Four batches of 8 x 12 tokens, right-padded to lengths 8..12, the first label of each masked."""
    rng = np.random.default_rng(3)
    out = []
    for _ in range(4):
        ids = rng.integers(0, V, (8, 12))
        mask = (np.arange(12)[None] < rng.integers(8, 13, 8)[:, None]).astype(np.int64)
        labels = np.where(mask == 1, ids, -100)
        labels[:, 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def peft_eva(lib, folder, eva_config):
    torch, _, peft = lib
    from peft.tuners.lora.eva import initialize_lora_eva_weights
    cfg = peft.LoraConfig(r=FIELDS["rank"], lora_alpha=FIELDS["alpha"], target_modules=list(TARGETS),
                          rank_pattern=FIELDS["rank_pattern"], init_lora_weights="eva",
                          eva_config=peft.EvaConfig(**eva_config))
    pm = peft.get_peft_model(hf_model(lib, folder), cfg)
    initialize_lora_eva_weights(pm, [{k: torch.tensor(v) for k, v in b.items()} for b in batches()],
                                show_progress_bar=False)
    A = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default.weight"): p.detach().double().numpy()
         for n, p in pm.named_parameters() if n.endswith("lora_A.default.weight")}
    return pm.eval(), A


def ours_eva(folder, eva_config):
    model = minipeft.load_model(folder)
    model.apply_eva(data=batches(), eva_config=eva_config, **FIELDS)
    A = {p: np.asarray(m.adapters["default"].lora_A.weight.data, np.float64) for p, m in model.net.named_modules()
         if "default" in getattr(m, "adapters", {})}
    return model, A


def group_of(path):
    """(layer index, the group's first member) or the path itself for a layer with a PCA of its own."""
    layer, name = path.split(".")[2], path.rsplit(".", 1)[1]
    return next(((layer, g[0]) for g in GROUPS if name in g), path)


def compare_ranks(pm, model):
    """EVA-3/EVA-5: adapted layers, rank_pattern and alpha_pattern as PEFT's; inside a group sharing a PCA,
    the group's ranks as a multiset and its PCA layer's rank (PEFT's argsort is unstable among its ties)."""
    theirs, ours = pm.peft_config["default"], model.peft_configs["default"]
    assert sorted(theirs.target_modules) == sorted(ours.target_modules)
    for pattern in ("rank_pattern", "alpha_pattern"):
        t, o = getattr(theirs, pattern), getattr(ours, pattern)
        assert {p: v for p, v in t.items() if group_of(p) == p} == {p: v for p, v in o.items() if group_of(p) == p}
        for g in {group_of(p) for p in ours.target_modules if group_of(p) != p}:
            members = [p for p in ours.target_modules if group_of(p) == g]
            default = ours.rank if pattern == "rank_pattern" else ours.alpha
            assert sorted(t.get(p, default) for p in members) == sorted(o.get(p, default) for p in members), g
            assert t.get(members[0], default) == o.get(members[0], default), g


@pytest.mark.spec("EVA-1", "EVA-2", "EVA-3", "EVA-4", "EVA-5", "EVA-6", "METHOD-11")
def test_eva_equals_peft_and_loads_both_ways(lib, base, tmp_path):
    pm, theirs = peft_eva(lib, base(), {})
    model, ours = ours_eva(base(), {})
    compare_ranks(pm, model)
    assert sorted(theirs) == sorted(ours)
    worst = 0.0
    for p in ours:  # a group's members are rows of one PCA: compare the rows both hold
        n = min(len(ours[p]), len(theirs[p]))
        assert group_of(p) != p or len(ours[p]) == len(theirs[p]), p
        worst = max(worst, np.abs(ours[p][:n] - theirs[p][:n]).max())
    print(f"\n  EVA lora_A vs PEFT (worst entry of {len(ours)} layers): max abs err {worst:.2e}")
    assert worst < 1e-5
    base_logits = hf_logits(lib, hf_model(lib, base()))
    report("EVA PEFT at init vs base", max_rel_err(hf_logits(lib, pm), base_logits))
    report("EVA minipeft at init vs base", max_rel_err(model(IDS), base_logits))
    theirs_count = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert model.parameter_counts()[0] == theirs_count
    perturb_minipeft(model)
    model.save_adapters(str(tmp_path / "ours"))
    loaded = lib[2].PeftModel.from_pretrained(hf_model(lib, base()), str(tmp_path / "ours")).eval()
    report("EVA minipeft->PEFT", max_rel_err(model(IDS), hf_logits(lib, loaded)))
    perturb_peft(lib, pm)
    pm.save_pretrained(tmp_path / "peft")
    back = minipeft.load_model(base())
    back.load_adapters(str(tmp_path / "peft"))  # no data: the file holds A and B
    assert type(back.peft_configs["default"]) is minipeft.EVAConfig
    report("EVA PEFT->minipeft", max_rel_err(back(IDS), hf_logits(lib, pm)))


@pytest.mark.spec("EVA-4", "EVA-6")
def test_whitened_eva_equals_peft_where_no_pca_is_shared(lib, base):
    """whiten: a layer with a PCA of its own equals PEFT's; in a group of m layers sharing one, PEFT divides
    the shared rows in place once per member, so every member holds V / S^(m/2): ours (V / S^(1/2)) times
    |row|^(m-1), since each of our rows has norm S^(-1/2) (measured; spec/eva.md Deviations)."""
    _, theirs = peft_eva(lib, base(), {"whiten": True})
    _, ours = ours_eva(base(), {"whiten": True})
    worst = 0.0
    for p in ours:
        n = min(len(ours[p]), len(theirs[p]))
        m = 1 if group_of(p) == p else len(next(g for g in GROUPS if p.rsplit(".", 1)[1] in g))
        norms = np.linalg.norm(ours[p][:n], axis=1, keepdims=True)  # S^(-1/2)
        worst = max(worst, max_rel_err(ours[p][:n] * norms ** (m - 1), theirs[p][:n]))
    print(f"\n  whitened EVA lora_A vs PEFT: max rel err {worst:.2e}")
    assert worst < 1e-5
