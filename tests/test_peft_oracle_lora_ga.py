"""LoRA-GA (spec/lora_ga.md) against HF PEFT 0.21.2's preprocess_loraga + init_lora_weights="lora_ga": the same
random llama (and GPT-2, whose Conv1D stores W transposed) and the same batches, PEFT's train_step one
forward/backward per batch with the labels minipeft uses. PEFT's torch.svd_lowrank is replaced by the exact SVD with
minipeft's signs (LORA_GA-2: what svd_lowrank approximates, and its random basis sets the signs); one test keeps
PEFT's own svd_lowrank where it is exact (4r >= min(in, out)) and compares A and B up to those signs. Run with
`pytest -s` to see each measured error."""
import contextlib
import re

import numpy as np
import pytest

import minipeft
from helpers import max_rel_err, peft_svd_signs_as_minipeft
from test_peft_oracle import IDS, V, base, hf_logits, hf_model, lib  # noqa: F401

pytestmark = pytest.mark.oracle
SEED = 13  # the batches: the 2r + 1 leading singular values of every G 0.0076 S_1 apart or more (spec LORA_GA-7)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")


def batches():
    rng = np.random.default_rng(SEED)
    out = []
    for _ in range(3):
        ids = rng.integers(0, V, (4, 10))
        mask = (np.arange(10)[None] < rng.integers(6, 11, (4, 1))).astype(np.int64)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)})
    return out


@contextlib.contextmanager
def exact_svd_lowrank(torch):
    """torch.svd_lowrank as the exact thin SVD (its first q triplets, taken in float64 and returned in A's dtype), with
    minipeft's signs: what PEFT's float32 randomized SVD approximates (its own rounding: the next test)."""
    plain = torch.svd_lowrank

    def exact(A, q=6, niter=2, M=None):
        U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
        return U[:, :q].to(A.dtype), S[:q].to(A.dtype), Vh[:q].mT.to(A.dtype)

    with peft_svd_signs_as_minipeft():
        torch.svd_lowrank = exact
        try:
            yield
        finally:
            torch.svd_lowrank = plain


def gpt2_without_dropout(lib, tmp_path):
    """test_peft_oracle.py's random GPT-2 with its dropouts at 0: PEFT estimates G in train mode, minipeft in eval
    mode (LORA_GA-1), the same function only without dropout."""
    torch, transformers, _ = lib
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    m = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.3)
    m.save_pretrained(str(tmp_path / "gpt2"))
    return str(tmp_path / "gpt2")


def peft_lora_ga(lib, folder, targets, r, alpha, lora_ga_config):
    torch, _, peft = lib
    from peft.tuners.lora.config import LoraGAConfig
    hf = hf_model(lib, folder)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="lora_ga",
                          lora_ga_config=LoraGAConfig(**lora_ga_config))

    def train_step():
        for b in batches():
            hf(**{k: torch.tensor(v) for k, v in b.items()}).loss.backward()
    peft.preprocess_loraga(hf, cfg, train_step)
    return peft.get_peft_model(hf, cfg).eval()


def compare(lib, folder, targets, r, alpha, lora_ga_config, signs_free=False):
    """{quantity: worst error / largest entry over the layers}, minipeft against PEFT; A and B up to one sign per
    row of A and column of B where signs_free."""
    pm = peft_lora_ga(lib, folder, targets, r, alpha, lora_ga_config)
    theirs = {n: p.detach().double().numpy() for n, p in pm.named_parameters()}
    model = minipeft.load_model(folder)
    model.apply_lora_ga(data=batches(), rank=r, alpha=alpha, target_modules=targets, lora_ga_config=lora_ga_config)
    worst = dict(A=0.0, B=0.0, W=0.0, logits=max_rel_err(model(IDS), hf_logits(lib, pm)))
    for path, m in model.net.named_modules():
        if not hasattr(m, "adapters"):
            continue
        key = f"base_model.model.{path}"
        d = m.adapters.default
        A, B = (np.asarray(w.weight.data, np.float64) for w in (d.lora_A, d.lora_B))
        tA, tB = theirs[f"{key}.lora_A.default.weight"], theirs[f"{key}.lora_B.default.weight"]
        if signs_free:
            tA, tB = tA * np.sign(np.sum(A * tA, axis=1))[:, None], tB * np.sign(np.sum(B * tB, axis=0))
        else:
            worst["W"] = max(worst["W"], max_rel_err(m.base_layer.weight.data, theirs[f"{key}.base_layer.weight"]))
        worst["A"], worst["B"] = max(worst["A"], max_rel_err(A, tA)), max(worst["B"], max_rel_err(B, tB))
    print(f"\n  LoRA-GA {lora_ga_config} vs PEFT (error / largest entry): "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    return worst, model, pm


@pytest.mark.spec("LORA_GA-1", "LORA_GA-2", "LORA_GA-3", "LORA_GA-4", "LORA_GA-5", "LORA_GA-7")
@pytest.mark.parametrize("kind, lora_ga_config", [
    ("llama", {}), ("llama", {"direction": "A2rBr", "scale": "weight_svd"}),
    ("llama", {"direction": "ArBr", "scale": "gd_scale"}), ("llama", {"scale": "unit", "stable_gamma": 4}),
    ("gpt2", {})])
def test_lora_ga_init_equals_peft(lib, base, kind, lora_ga_config, tmp_path):
    targets = ("c_attn", "c_proj") if kind == "gpt2" else TARGETS
    with exact_svd_lowrank(lib[0]):
        worst, _, _ = compare(lib, gpt2_without_dropout(lib, tmp_path) if kind == "gpt2" else base(kind), targets, 4,
                              8, lora_ga_config)
    assert max(worst.values()) < 1e-5, worst


@pytest.mark.spec("LORA_GA-2", "LORA_GA-7")
def test_lora_ga_factors_equal_peft_own_svd_lowrank_up_to_signs(lib, base):
    """k_proj and v_proj (16 x 32): PEFT's svd_lowrank with q = 4r = 16 spans G's row space, so it is exact."""
    lib[0].manual_seed(3)
    worst, _, _ = compare(lib, base("llama"), ("k_proj", "v_proj"), 4, 8, {}, signs_free=True)
    assert max(worst.values()) < 1e-5, worst


@pytest.mark.spec("LORA_GA-6", "LORA_GA-7")
def test_lora_ga_saves_peft_conversion_both_ways(lib, base, tmp_path):
    """minipeft's save (a rank-2r LoRA of the unmodified base) loads in PEFT with minipeft's logits after training
    moved A and B; PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) of the same adapter loads
    in minipeft with PEFT's logits, and the two files hold the same tensors."""
    torch = lib[0]
    folder = base("llama")
    with exact_svd_lowrank(torch):
        _, model, pm = compare(lib, folder, TARGETS, 4, 8, {})
    check_conversion_both_ways(lib, folder, model, pm, tmp_path)


def check_conversion_both_ways(lib, folder, model, pm, tmp_path, signs_free=False, tensors_rtol=1e-5):
    """LORA_GA-6, CORDA-5: PEFT's adapter pm and minipeft's model at the same step 0; every lora_ tensor moves (the
    same on both sides); minipeft's save loads in PEFT, PEFT's save_pretrained(path_initial_model_for_weight_conversion)
    loads in minipeft as a rank-2r LoRAConfig, both with PEFT's logits, and the two files hold the same tensors
    (signs_free: up to one sign per rank-one term of A0, B0, where the SVD's signs are free, CorDA's; to
    tensors_rtol of their largest entry: the step-0 factors' own agreement with PEFT's).
    The step-0 folder is saved with init_lora_weights = True, as PEFT's conversion asks."""
    torch = lib[0]
    init = pm.peft_config["default"].init_lora_weights
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(str(tmp_path / "init"))  # PEFT's step 0, to convert against
    pm.peft_config["default"].init_lora_weights = init
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    mine = dict(model.net.named_parameters())
    for n, p in pm.named_parameters():  # the same trained A, B on both sides
        if "lora_" in n:
            ours = re.sub(r"\.(lora_[AB])\.default\.", r".adapters.default.\1.", n.removeprefix("base_model.model."))
            mine[ours].data = p.detach().numpy().copy()
    theirs = hf_logits(lib, pm)
    pm.save_pretrained(str(tmp_path / "peft"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    model.save_adapters(str(tmp_path / "ours"))
    errs = {"minipeft (trained)": max_rel_err(model(IDS), theirs)}
    back = minipeft.load_model(folder)
    back.load_adapters(str(tmp_path / "peft"))
    assert type(back.peft_configs["default"]) is minipeft.LoRAConfig
    assert back.peft_configs["default"].rank == 2 * model.peft_configs["default"].rank
    errs["PEFT's conversion -> minipeft"] = max_rel_err(back(IDS), theirs)
    pm2 = lib[2].PeftModel.from_pretrained(hf_model(lib, folder), str(tmp_path / "ours")).eval()
    errs["minipeft's save -> PEFT"] = max_rel_err(hf_logits(lib, pm2), theirs)
    errs["minipeft's save -> PEFT, against minipeft"] = max_rel_err(hf_logits(lib, pm2), model(IDS))
    from safetensors.numpy import load_file
    a, b = load_file(str(tmp_path / "ours" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    for k in (k for k in a if signs_free and ".lora_A." in k):  # the sign of each row of A' and column of B'
        kb = k.replace(".lora_A.", ".lora_B.")
        sign = np.sign(np.sum(a[k] * b[k], axis=1))
        a[k], a[kb] = a[k] * sign[:, None], a[kb] * sign[None, :]
    tensors = max(max_rel_err(a[k], b[k]) for k in a)
    print("\n  " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f", saved tensors {tensors:.1e}")
    assert max(errs.values()) < 1e-5 and tensors < tensors_rtol, (errs, tensors)
    errs["saved tensors"] = tensors
    return errs
