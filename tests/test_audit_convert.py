"""`minipeft audit convert` (spec/audit.md AUDIT-22..AUDIT-24): any mergeable adapter as a plain LoRA by truncated
SVD of each layer's dW, PEFT's convert_to_lora / save_as_lora. At full rank the LoRA gives the adapter's logits,
at a lower rank the reported error is the measured one; PEFT's own conversion gives the same products and ranks."""
import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft.audit import audit_convert
from minipeft.audit.convert import factor, kept_rank
from minipeft.cli import main
from minipeft.errors import ConfigError
from minipeft.safetensors_io import read_safetensors
from tests.test_audit_merged import MERGEABLE, base, hf_base, perturb, written  # noqa: F401

PREFIX = "base_model.model."
IDS = np.array([[1, 5, 9, 2, 7, 3, 11, 4]])
BIASED = {"beft", "ia3", "road", "glora"}  # methods that change a bias on this base (q/k/v biased), which a LoRA cannot carry
BIASED |= {"adamss"}  # its [dW | db] moves the bias of a biased layer (ADAMSS-5)


def logits(model):
    return np.asarray(model(IDS).data, dtype=np.float64)


def tensors(folder):
    return read_safetensors(os.path.join(folder, "adapter_model.safetensors"))[0]


@pytest.mark.spec("AUDIT-22")
@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=1, max_size=16), st.floats(1e-3, 1.0))
def test_the_kept_rank_is_the_smallest_holding_the_share(values, t):
    s = np.sort(np.array(values))[::-1]
    k = kept_rank(s, t)
    energy = np.cumsum(s ** 2)
    assert 1 <= k <= s.size
    assert energy[k - 1] >= t * energy[-1]
    assert k == 1 or energy[k - 2] < t * energy[-1]
    assert kept_rank(s, 3) == 3  # an integer is the rank


@pytest.mark.spec("AUDIT-23")
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 31), st.integers(2, 12), st.integers(2, 12))
def test_the_factors_are_the_best_rank_k_fit_and_the_error_is_measured(seed, out, n):
    rng = np.random.default_rng(seed)
    dW = rng.standard_normal((out, n))
    k = int(rng.integers(1, min(out, n) + 1))
    A, B, row = factor(dW, k, "layer")
    assert A.shape == (k, n) and B.shape == (out, k) and row.rank == k
    measured = np.linalg.norm(dW - B @ A) / np.linalg.norm(dW)
    assert row.rel_error == pytest.approx(measured, rel=1e-9, abs=1e-12)
    s = np.linalg.svd(dW, compute_uv=False)
    assert row.rel_error == pytest.approx(np.sqrt(np.sum(s[k:] ** 2) / np.sum(s ** 2)), rel=1e-9, abs=1e-12)
    np.testing.assert_allclose(A @ A.T, np.eye(k), atol=1e-10)  # lora_A = V_k^T, orthonormal rows
    A, B, row = factor(dW, min(out, n), "layer")
    np.testing.assert_allclose(B @ A, dW, atol=1e-10)
    assert row.rel_error < 1e-7
    A, B, row = factor(np.zeros((out, n)), 1.0, "layer")  # dW = 0: rank 1, error 0
    assert row.rank == 1 and row.rel_error == 0.0 and not B.any()


@pytest.mark.spec("AUDIT-22", "AUDIT-24")
@pytest.mark.parametrize("name", [m for m in MERGEABLE if m not in BIASED])
def test_every_mergeable_method_at_full_share_gives_its_logits(name, base, tmp_path):
    adapter, _ = written(base, tmp_path, name)
    r = audit_convert(adapter, 1.0, str(tmp_path / "lora"), show_progress=False)
    assert r.status == 0 and r.findings == [] and r.out == str(tmp_path / "lora"), [f.line() for f in r.findings]
    assert max(x.rel_error for x in r.layers) < 1e-6
    want = mp.load_model(base)
    want.load_adapters(adapter)
    got = mp.load_model(base)
    got.load_adapters(str(tmp_path / "lora"))
    cfg = got.peft_configs["default"]
    assert type(cfg) is mp.LoRAConfig and cfg.use_rslora is False
    assert all(cfg.rank_alpha_for(p)[0] == cfg.rank_alpha_for(p)[1] for p in cfg.target_modules)  # scale 1
    err = float(np.max(np.abs(logits(got) - logits(want))))
    size = float(np.max(np.abs(logits(want))))
    print(f"\n  {name}: full-share LoRA vs the adapter, max |logit diff| {err:.2e} (max |logit| {size:.3g}), "
          f"ranks {sorted({x.rank for x in r.layers})}")
    assert err < 1e-5 * max(1.0, size)  # float32 factors of a full-rank dW: rounding relative to the logits


@pytest.mark.spec("AUDIT-23", "AUDIT-24")
def test_a_lower_rank_reports_the_error_it_makes(base, tmp_path, capsys):
    adapter, _ = written(base, tmp_path, "loha", rank=4)
    assert main(["audit", "convert", adapter, str(tmp_path / "lora"), "--rank", "2", "--json", "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["command"] == "audit convert" and out["status"] == 0 and {x["rank"] for x in out["layers"]} == {2}
    saved = tensors(str(tmp_path / "lora"))
    from minipeft.audit.layers import AdapterLayers
    from minipeft.audit.files import Checkpoint, read_adapter
    layers = AdapterLayers(read_adapter(adapter), Checkpoint(base))
    for row in out["layers"]:
        dW = layers.layer(row["path"]).dW
        BA = saved[f"{PREFIX}{row['path']}.lora_B.weight"].astype(np.float64) @ \
            saved[f"{PREFIX}{row['path']}.lora_A.weight"].astype(np.float64)
        assert row["rel_error"] == pytest.approx(np.linalg.norm(dW - BA) / np.linalg.norm(dW), rel=1e-4)
        assert 0 < row["rel_error"] < 1
    raw = json.load(open(os.path.join(tmp_path / "lora", "adapter_config.json")))
    assert raw["peft_type"] == "LORA" and raw["r"] == raw["lora_alpha"] == 2 and raw["rank_pattern"] == {}
    assert sorted(raw["target_modules"]) == sorted(x["path"] for x in out["layers"])
    assert main(["audit", "convert", adapter, str(tmp_path / "t"), "--rank", "0.5", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "share >= 0.5" in text and "audit convert: OK" in text and "worst relative error" in text


@pytest.mark.spec("AUDIT-24")
def test_per_layer_ranks_go_to_rank_pattern(base, tmp_path):
    adapter, _ = written(base, tmp_path, "lora", rank=4, target_modules=["q_proj", "v_proj"])
    t = tensors(adapter)
    q = f"{PREFIX}model.layers.0.self_attn.q_proj"
    t[f"{q}.lora_A.weight"][2:] = 0  # this layer's dW has rank 2
    from minipeft.safetensors_io import write_safetensors
    write_safetensors(os.path.join(adapter, "adapter_model.safetensors"), t, {"format": "pt"})
    r = audit_convert(adapter, 1.0, str(tmp_path / "lora"), show_progress=False)
    ranks = {x.path: x.rank for x in r.layers}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 and set(ranks.values()) == {2, 4}
    raw = json.load(open(os.path.join(tmp_path / "lora", "adapter_config.json")))
    assert raw["r"] == 4 and raw["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 2}
    assert raw["alpha_pattern"] == raw["rank_pattern"]
    assert r.parameters == sum(k * sum(x.shape) for x, k in ((x, x.rank) for x in r.layers))


@pytest.mark.spec("AUDIT-24")
def test_modules_to_save_copies_are_kept(base, tmp_path):
    adapter, _ = written(base, tmp_path, "loha", modules_to_save=["lm_head"])
    audit_convert(adapter, 1.0, str(tmp_path / "lora"), show_progress=False)
    src, got = tensors(adapter), tensors(str(tmp_path / "lora"))
    copies = [k for k in src if "lm_head" in k]
    assert copies and all(np.array_equal(src[k], got[k]) for k in copies)
    want, conv = mp.load_model(base), mp.load_model(base)
    want.load_adapters(adapter)
    conv.load_adapters(str(tmp_path / "lora"))
    assert float(np.max(np.abs(logits(conv) - logits(want)))) < 1e-5


@pytest.mark.spec("AUDIT-22", "AUDIT-24")
def test_bad_input_is_refused_and_nothing_is_written(base, tmp_path, capsys):
    adapter, _ = written(base, tmp_path, "lora", rank=4)
    out = str(tmp_path / "out")
    for rank, said in ((0, "positive integer"), (1.5, "(0, 1]"), (10 ** 6, "exceeds min(out, in)")):
        with pytest.raises(ConfigError, match=said.replace("(", r"\(").replace(")", r"\)")):
            audit_convert(adapter, rank, out, show_progress=False)
        assert not os.path.exists(out)
    with pytest.raises(SystemExit) as e:
        main(["audit", "convert", adapter, out, "--rank", "two"])
    assert e.value.code == 2
    assert "neither a rank" in capsys.readouterr().err
    biased, _ = written(base, tmp_path / "b", "lora", bias="all")
    with pytest.raises(ConfigError, match="bias='all'"):
        audit_convert(biased, 2, out, show_progress=False)
    beft, _ = written(base, tmp_path / "c", "beft")
    with pytest.raises(ConfigError, match="changes the bias"):
        audit_convert(beft, 1.0, out, show_progress=False)
    assert not os.path.exists(out)
    model = mp.load_model(base)
    model.apply_prompt_tuning(num_virtual_tokens=2)
    model.save_adapters(str(tmp_path / "prompt"))
    assert main(["audit", "convert", str(tmp_path / "prompt"), out, "--rank", "2"]) == 2
    assert "not a mergeable method" in capsys.readouterr().err and not os.path.exists(out)


@pytest.mark.spec("AUDIT-24")
def test_a_layer_with_a_nan_is_a_finding_and_nothing_is_written(base, tmp_path):
    adapter, _ = written(base, tmp_path, "loha")
    t = tensors(adapter)
    key = next(k for k in t if k.endswith("hada_w1_a"))
    t[key][0, 0] = np.nan
    from minipeft.safetensors_io import write_safetensors
    write_safetensors(os.path.join(adapter, "adapter_model.safetensors"), t, {"format": "pt"})
    r = audit_convert(adapter, 2, str(tmp_path / "lora"), show_progress=False)
    assert r.status == 1 and [f.kind for f in r.findings] == ["adapter-nonfinite"] and r.out is None
    assert not os.path.exists(tmp_path / "lora")


# ---- oracle: PEFT's save_as_lora ----------------------------------------------------------------------------------
PEFT_CASES = {"loha": ("LoHaConfig", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
              "lokr": ("LoKrConfig", dict(r=4, alpha=8, target_modules=["q_proj", "down_proj"])),
              "vera": ("VeraConfig", dict(r=4, target_modules=["q_proj", "v_proj"], save_projection=True)),
              "c3a": ("C3AConfig", dict(block_size=8, target_modules=["q_proj", "v_proj"]))}


@pytest.mark.oracle
@pytest.mark.spec("AUDIT-22", "AUDIT-23", "AUDIT-24")
@pytest.mark.parametrize("case", sorted(PEFT_CASES))
@pytest.mark.parametrize("rank", [3, 0.8])
def test_peft_save_as_lora_gives_the_same_lora(case, rank, hf_base, tmp_path):
    pytest.importorskip("peft")
    import peft
    import torch
    import transformers
    cls, kw = PEFT_CASES[case]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    torch.manual_seed(0)  # PEFT's init draws from the global generator
    pm = peft.get_peft_model(hf, getattr(peft, cls)(**kw))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(str(tmp_path / "adapter"))
    peft.save_as_lora(str(tmp_path / "theirs"), pm, rank=rank)
    r = audit_convert(str(tmp_path / "adapter"), rank, str(tmp_path / "ours"), hf_base, show_progress=False)
    assert r.status == 0
    theirs, ours = tensors(str(tmp_path / "theirs")), tensors(str(tmp_path / "ours"))
    assert sorted(theirs) == sorted(ours)
    from minipeft.audit.files import Checkpoint, read_adapter
    from minipeft.audit.layers import AdapterLayers
    layers = AdapterLayers(read_adapter(str(tmp_path / "adapter")), Checkpoint(hf_base))
    worst, worst_fit, tied = 0.0, 0.0, []
    for row in r.layers:
        key = f"{PREFIX}{row.path}"
        assert theirs[f"{key}.lora_A.weight"].shape == ours[f"{key}.lora_A.weight"].shape == (row.rank, row.shape[1])
        prod = {n: t[f"{key}.lora_B.weight"].astype(np.float64) @ t[f"{key}.lora_A.weight"].astype(np.float64)
                for n, t in (("theirs", theirs), ("ours", ours))}
        dW = layers.layer(row.path).dW
        s = np.linalg.svd(dW, compute_uv=False)
        fit = {n: np.linalg.norm(dW - P) / np.linalg.norm(dW) for n, P in prod.items()}
        worst_fit = max(worst_fit, abs(fit["ours"] - fit["theirs"]))  # both the optimum, sqrt(tail share)
        if row.rank < s.size and s[row.rank - 1] - s[row.rank] < 1e-2 * s[0]:
            # s_k ~ s_k+1: the best rank-k fit is not unique (C3A's circulant pairs) or, by Davis-Kahan, not fixed to
            # 1e-5 by a float32 SVD (subspace error ~ 1e-7 s_1 / gap): only the fit error is compared
            tied.append(row.path)
            continue
        worst = max(worst, float(np.max(np.abs(prod["theirs"] - prod["ours"])) / np.max(np.abs(prod["theirs"]))))
    line = (f"\n  {case} rank {rank}: B A vs PEFT's rel {worst:.2e}, fit error vs PEFT's {worst_fit:.1e}, "
            f"ranks {sorted({x.rank for x in r.layers})}, {len(tied)} of {len(r.layers)} layers with s_k - s_k+1 < s_1 / 100")
    assert worst < 1e-5 and worst_fit < 1e-5
    if not tied:  # the same LoRA: PEFT gives both the same logits
        ids = torch.tensor(IDS)
        with torch.no_grad():
            out = {}
            for n in ("theirs", "ours"):
                base_model = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
                out[n] = peft.PeftModel.from_pretrained(base_model, str(tmp_path / n))(ids).logits.numpy()
        logit_err = float(np.max(np.abs(out["theirs"] - out["ours"])))
        line += f", PEFT logits of both LoRAs {logit_err:.2e}"
        assert logit_err < 1e-5
    print(line)
    assert case == "c3a" or not tied


# ---- the same on a model in memory: Model.save_as_lora ------------------------------------------------------------
@pytest.mark.spec("AUDIT-22", "AUDIT-23", "AUDIT-24")
@pytest.mark.parametrize("name", ["loha", "vera", "dora", "oft"])
def test_model_save_as_lora_equals_the_folder_conversion(name, base, tmp_path):
    adapter, _ = written(base, tmp_path, name)
    model = mp.load_model(base)
    model.load_adapters(adapter)
    rows = model.save_as_lora(str(tmp_path / "mem"), 3, show_progress=False)
    r = audit_convert(adapter, 3, str(tmp_path / "file"), show_progress=False)
    assert [(x.path, x.rank) for x in rows] == [(x.path, x.rank) for x in r.layers]
    np.testing.assert_allclose([x.rel_error for x in rows], [x.rel_error for x in r.layers], rtol=1e-4)
    mem, file = tensors(str(tmp_path / "mem")), tensors(str(tmp_path / "file"))
    assert sorted(mem) == sorted(file)
    for row in rows:
        key = f"{PREFIX}{row.path}"
        prod = [t[f"{key}.lora_B.weight"].astype(np.float64) @ t[f"{key}.lora_A.weight"].astype(np.float64)
                for t in (mem, file)]
        np.testing.assert_allclose(prod[0], prod[1], atol=1e-5 * np.abs(prod[1]).max())
    assert json.load(open(tmp_path / "mem" / "adapter_config.json")) == \
        json.load(open(tmp_path / "file" / "adapter_config.json"))
    full = mp.load_model(base)
    full.load_adapters(adapter)
    full.save_as_lora(str(tmp_path / "full"), 1.0, show_progress=False)
    got = mp.load_model(base)
    got.load_adapters(str(tmp_path / "full"))
    assert float(np.max(np.abs(logits(got) - logits(full)))) < 1e-5 * max(1.0, float(np.max(np.abs(logits(full)))))


@pytest.mark.spec("AUDIT-22")
def test_model_save_as_lora_refuses_what_it_cannot_convert(base, tmp_path):
    model = mp.load_model(base)
    model.apply_lora(rank=2, bias="all")
    with pytest.raises(ConfigError, match="trains biases"):
        model.save_as_lora(str(tmp_path / "x"), 2)
    with pytest.raises(ConfigError, match="no adapter named 'other'"):
        model.save_as_lora(str(tmp_path / "x"), 2, name="other")
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        model.save_as_lora(str(tmp_path / "x"), 2.5)
    tokens = mp.load_model(base)
    tokens.apply_lora(rank=2, trainable_token_indices=[1, 2])
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        tokens.save_as_lora(str(tmp_path / "x"), 2)
    tokens.save_adapters(str(tmp_path / "tok"))
    with pytest.raises(ConfigError, match="trainable_token_indices"):
        audit_convert(str(tmp_path / "tok"), 2, str(tmp_path / "x"), show_progress=False)
    assert not os.path.exists(tmp_path / "x")
