"""`minipeft audit adapter` (spec/audit.md AUDIT-8..AUDIT-10): the per-layer statistics of dW against a dW built
with known singular values and against merged models (minipeft's and PEFT's); planted defects (a target that
matches nothing, a NaN, a missing or unexplained tensor) give their finding and exit status 1."""
import json
import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import minipeft as mp
from minipeft.audit import audit_adapter, spectrum
from minipeft.cli import main
from minipeft.fileio import atomic_write_json, read_json
from minipeft.safetensors_io import read_safetensors, write_safetensors
from tests.test_audit_merged import MERGEABLE, base, hf_base, peft_merged, perturb, written  # noqa: F401

PREFIX = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"


def weights(folder):
    return read_safetensors(os.path.join(folder, "model.safetensors"))[0]


def edit(adapter, change=None, config=None):
    """change(tensors) on the adapter's file and config(dict) on its adapter_config.json, written back."""
    if change:
        path = os.path.join(adapter, "adapter_model.safetensors")
        tensors, meta = read_safetensors(path)
        change(tensors)
        write_safetensors(path, tensors, meta)
    if config:
        path = os.path.join(adapter, "adapter_config.json")
        raw = read_json(path, "")
        config(raw)
        atomic_write_json(path, raw)


def only(report, kind):
    found = [f for f in report.findings if f.kind == kind]
    assert len(found) == 1 and len(report.findings) == 1, [f.line() for f in report.findings]
    return found[0]


@pytest.mark.spec("AUDIT-9")
def test_a_dW_of_known_singular_values_gives_its_statistics(base, tmp_path):
    model = mp.load_model(base)
    model.apply_lora(rank=4, alpha=8, target_modules=["q_proj"])
    sigma = np.array([3.0, 2.0, 0.5, 0.0])
    rng = np.random.default_rng(0)
    layer = model.net.get_submodule(Q)
    delta = layer.adapters["default"]
    out, n = delta.lora_B.weight.shape[0], delta.lora_A.weight.shape[1]
    U = np.linalg.qr(rng.standard_normal((out, 4)))[0]
    V = np.linalg.qr(rng.standard_normal((n, 4)))[0]
    delta.lora_A.weight.data = V.T.astype(np.float32)  # (r, in), orthonormal rows
    delta.lora_B.weight.data = (U * sigma / 2.0).astype(np.float32)  # s = 8 / 4 = 2
    model.save_adapters(str(tmp_path / "a"))
    r = audit_adapter(str(tmp_path / "a"), base)
    assert r.status == 0 and r.findings == [] and r.scale_rule == "alpha / r"
    row = next(x for x in r.layers if x.path == Q)
    assert (row.r, row.alpha, row.scale, row.shape) == (4, 8, 2.0, (out, n))
    sp = row.spectrum
    np.testing.assert_allclose(sp.singular_values[:4], sigma, atol=1e-6)
    assert sp.fro == pytest.approx(math.sqrt(9 + 4 + 0.25), rel=1e-6)
    assert sp.spectral == pytest.approx(3.0, rel=1e-6)
    assert sp.stable_rank == pytest.approx(13.25 / 9, rel=1e-6)
    p = sigma[:3] / sigma.sum()
    assert sp.effective_rank == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-5)
    W0 = weights(base)[f"{Q}.weight"].astype(np.float64)
    assert row.rel_fro == pytest.approx(sp.fro / np.linalg.norm(W0), rel=1e-6)


@pytest.mark.spec("AUDIT-9")
@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1e3, allow_nan=False), min_size=1, max_size=12))
def test_stable_and_effective_rank_lie_between_one_and_the_rank(values):
    sp = spectrum(values)
    s = np.array(values)
    rank = int(np.sum(s > 0))
    if rank == 0 or sp.spectral == 0:
        assert (sp.fro, sp.stable_rank, sp.effective_rank) == (0.0, 0.0, 0.0)
        return
    assert sp.spectral == max(values) and sp.singular_values == sorted(values, reverse=True)
    assert 1 - 1e-9 <= sp.stable_rank <= rank + 1e-9
    assert 1 - 1e-9 <= sp.effective_rank <= rank + 1e-9
    equal = spectrum([s.max()] * rank)
    assert equal.stable_rank == pytest.approx(rank) and equal.effective_rank == pytest.approx(rank)


@pytest.mark.spec("AUDIT-2", "AUDIT-9", "AUDIT-10")
@pytest.mark.parametrize("name", MERGEABLE)
def test_every_mergeable_method_gives_dW_of_its_merge(name, base, tmp_path):
    adapter, merged = written(base, tmp_path, name)
    r = audit_adapter(adapter, base)
    assert r.status == 0 and r.findings == [], [f.line() for f in r.findings]
    W0, W = weights(base), weights(merged)
    assert r.layers
    for row in r.layers:
        dW = W[f"{row.path}.weight"].astype(np.float64) - W0[f"{row.path}.weight"]
        if dW.shape != row.shape:
            dW = dW.T
        s = np.linalg.svd(dW, compute_uv=False)
        assert row.spectrum.fro == pytest.approx(np.linalg.norm(dW), rel=1e-5, abs=1e-6), row.path
        assert row.spectrum.spectral == pytest.approx(s[0], rel=1e-5, abs=1e-6), row.path


@pytest.mark.spec("AUDIT-8", "AUDIT-9")
def test_a_plain_rslora_needs_no_base_and_its_scale_follows_rank_pattern(base, tmp_path):
    adapter, _ = written(base, tmp_path, use_rslora=True, rank=4, alpha=8, rank_pattern={"v_proj": 2},
                         alpha_pattern={"v_proj": 4})
    with_base = audit_adapter(adapter, base)
    edit(adapter, config=lambda c: c.__setitem__("base_model_name_or_path", str(tmp_path / "gone")))
    alone = audit_adapter(adapter)
    assert alone.status == 0 and alone.findings == [] and "no base" in alone.base
    assert alone.scale_rule == "alpha / sqrt(r) (use_rslora)"
    assert [x.path for x in alone.layers] == [x.path for x in with_base.layers]
    for a, b in zip(alone.layers, with_base.layers):
        assert a.rel_fro is None and b.rel_fro > 0
        assert a.spectrum.singular_values == pytest.approx(b.spectrum.singular_values, rel=1e-9, abs=1e-12)
        assert a.scale == (4 / math.sqrt(2) if a.path.endswith("v_proj") else 8 / 2)


@pytest.mark.spec("AUDIT-8", "AUDIT-1")
def test_a_dora_without_its_base_is_bad_input(base, tmp_path, capsys):
    adapter, _ = written(base, tmp_path, "dora")
    edit(adapter, config=lambda c: c.__setitem__("base_model_name_or_path", str(tmp_path / "gone")))
    assert main(["audit", "adapter", adapter]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DoRA" in err and "W0" in err and "gone" in err
    assert main(["audit", "adapter", adapter, "--base", base, "--no-progress"]) == 0


@pytest.mark.spec("AUDIT-10")
def test_a_target_entry_that_matches_nothing_is_named(base, tmp_path):
    adapter, _ = written(base, tmp_path)
    edit(adapter, config=lambda c: c.__setitem__("target_modules", ["q_proj", "v_proj", "qkv_proj"]))
    f = only(audit_adapter(adapter, base), "target-unmatched")
    assert "'qkv_proj'" in f.message and f.file.endswith("adapter_config.json")
    edit(adapter, config=lambda c: c.__setitem__("target_modules", ["qkv_proj"]))
    r = audit_adapter(adapter, base)
    assert r.status == 1 and r.layers == [] and "matches no linear or embedding layer" in only(r, "target-unmatched").message


@pytest.mark.spec("AUDIT-10")
def test_nan_missing_and_unexplained_tensors_are_named(base, tmp_path, capsys):
    adapter, _ = written(base, tmp_path)
    key = f"{PREFIX}{Q}.lora_A.weight"
    edit(adapter, lambda t: t[key].__setitem__((0, 1), np.nan))
    r = audit_adapter(adapter, base)
    f = only(r, "adapter-nonfinite")
    assert r.status == 1 and f.tensor == key and Q not in [x.path for x in r.layers] and len(r.layers) == 3
    assert main(["audit", "adapter", adapter, "--base", base, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["command"] == "audit adapter" and [x["kind"] for x in report["findings"]] == ["adapter-nonfinite"]
    extra = f"{PREFIX}model.layers.0.mlp.up_proj.lora_A.weight"
    edit(adapter, lambda t: (t.__setitem__(key, np.zeros_like(t[key])), t.__setitem__(extra, np.ones((8, 32), np.float32))))
    assert only(audit_adapter(adapter, base), "unexplained-tensor").tensor == extra
    missing = f"{PREFIX}{Q}.lora_B.weight"
    edit(adapter, lambda t: (t.pop(extra), t.pop(missing)))
    assert only(audit_adapter(adapter, base), "adapter-missing").tensor == missing


@pytest.mark.spec("AUDIT-1")
def test_cli_text(base, tmp_path, capsys):
    adapter, _ = written(base, tmp_path, use_rslora=True)
    assert main(["audit", "adapter", adapter, "--base", base, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "scale: alpha / sqrt(r) (use_rslora)" in out and Q in out and "audit adapter: OK (no findings)" in out


@pytest.mark.oracle
@pytest.mark.spec("AUDIT-9", "AUDIT-10")
@pytest.mark.parametrize("case", ["lora", "rslora_bias", "dora"])
def test_peft_adapters_give_the_dW_of_peft_merge(case, hf_base, tmp_path):
    """PEFT's adapters (LoRA, rsLoRA with bias and modules_to_save, DoRA): dW's statistics against PEFT's own
    merge_and_unload minus W0, and the scale against PEFT's layer.scaling."""
    pytest.importorskip("peft")
    adapter, merged = peft_merged(hf_base, tmp_path, case)
    r = audit_adapter(adapter, hf_base)
    assert r.status == 0 and r.findings == [], [f.line() for f in r.findings]
    W0, W = weights(hf_base), weights(merged)
    raw = read_json(os.path.join(adapter, "adapter_config.json"), "")
    rule = (lambda a, k: a / math.sqrt(k)) if raw["use_rslora"] else (lambda a, k: a / k)
    worst = 0.0
    for row in r.layers:
        dW = W[f"{row.path}.weight"].astype(np.float64) - W0[f"{row.path}.weight"]
        s = np.linalg.svd(dW, compute_uv=False)
        worst = max(worst, abs(row.spectrum.fro - np.linalg.norm(dW)) / np.linalg.norm(dW),
                    abs(row.spectrum.spectral - s[0]) / s[0])
        assert row.scale == pytest.approx(rule(raw["lora_alpha"], raw["r"]))
    print(f"\n  {case} by PEFT: worst rel err of |dW|_F, |dW|_2 {worst:.2e}")
    assert worst < 1e-5 and len(r.layers) == 2 * len(raw["target_modules"])


@pytest.mark.spec("AUDIT-19")
@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2 ** 31), st.integers(8, 40))
def test_an_intruder_is_counted_and_no_change_has_none(seed, n):
    from minipeft.audit.adapter import intruders
    rng = np.random.default_rng(seed)
    W0 = rng.standard_normal((n, n))
    U0, S0, _ = np.linalg.svd(W0)
    assert intruders(W0, W0, 10, 0.5) == 0
    u, v = U0 @ np.ones(n) / math.sqrt(n), rng.standard_normal(n)
    assert np.max(np.abs(u @ U0)) < 0.5
    assert intruders(W0, W0 + 100 * S0[0] * np.outer(u, v / np.linalg.norm(v)), 10, 0.5) == 1
    assert intruders(W0, W0 + 100 * S0[0] * np.outer(u, v / np.linalg.norm(v)), 10, 0.1) == 0  # eps below 1/sqrt(n)


@pytest.mark.spec("AUDIT-19", "AUDIT-1")
def test_the_report_counts_intruders_per_layer(base, tmp_path, capsys):
    model = mp.load_model(base)
    model.apply_lora(rank=1, alpha=1, target_modules=["q_proj"])
    W0 = weights(base)[f"{Q}.weight"].astype(np.float64)
    U0, S0, _ = np.linalg.svd(W0)
    n = W0.shape[0]
    delta = model.net.get_submodule(Q).adapters["default"]
    delta.lora_A.weight.data = (np.ones((1, W0.shape[1])) / math.sqrt(W0.shape[1])).astype(np.float32)  # (1, in)
    delta.lora_B.weight.data = (100 * S0[0] * U0 @ np.ones(n) / math.sqrt(n))[:, None].astype(np.float32)  # (out, 1)
    model.save_adapters(str(tmp_path / "a"))
    r = audit_adapter(str(tmp_path / "a"), base)
    assert {x.path: x.intruders for x in r.layers} == {Q: 1, "model.layers.1.self_attn.q_proj": 0}
    assert "top 10" in r.intruder_rule and "below 0.5" in r.intruder_rule
    assert main(["audit", "adapter", str(tmp_path / "a"), "--base", base, "--intruder-k", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["intruder_rule"] is None and [x["intruders"] for x in out["layers"]] == [None, None]
    assert main(["audit", "adapter", str(tmp_path / "a"), "--base", base, "--intruder-epsilon", "2"]) == 2


# ---- --reduce-intruders (AUDIT-20) and rank_pattern checks (AUDIT-21) ---------------------------------------------
def planted_intruder(base, tmp_path, target_modules=("q_proj",)):
    """A rank-1 LoRA whose q_proj of layer 0 adds one intruder dimension (100 sigma_1 along U0 1 / sqrt(out))."""
    model = mp.load_model(base)
    model.apply_lora(rank=2, alpha=2, target_modules=list(target_modules))
    W0 = weights(base)[f"{Q}.weight"].astype(np.float64)
    U0, S0, _ = np.linalg.svd(W0)
    n = W0.shape[0]
    delta = model.net.get_submodule(Q).adapters["default"]
    A = np.random.default_rng(1).standard_normal((2, W0.shape[1])) * 0.01
    A[0] = np.ones(W0.shape[1]) / math.sqrt(W0.shape[1])
    B = np.zeros((n, 2))
    B[:, 0] = 100 * S0[0] * U0 @ np.ones(n) / math.sqrt(n)
    B[:, 1] = np.random.default_rng(2).standard_normal(n) * 0.01
    delta.lora_A.weight.data, delta.lora_B.weight.data = A.astype(np.float32), B.astype(np.float32)
    model.save_adapters(str(tmp_path / "a"))
    return str(tmp_path / "a"), W0


def layer_dW(folder, base, path=Q):
    from minipeft.audit.adapter import open_layers
    return open_layers(folder, base)[2].layer(path).dW


@pytest.mark.spec("AUDIT-20")
def test_reduce_intruders_scales_the_intruder_and_leaves_the_rest(base, tmp_path, capsys):
    adapter, W0 = planted_intruder(base, tmp_path)
    out = str(tmp_path / "reduced")
    assert main(["audit", "adapter", adapter, "--base", base, "--reduce-intruders", out, "--mitigation-lambda", "0",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}: intruders reduced in 1 layer(s) (lambda 0)" in text
    dW, new = layer_dW(adapter, base), layer_dW(out, base)
    U, S, Vt = np.linalg.svd(W0 + dW, full_matrices=False)
    j = int(np.argmax(np.max(np.abs(U.T @ np.linalg.svd(W0)[0]), axis=1) < 0.5))
    expected = dW - S[j] * np.outer(U[:, j], Vt[j])  # lambda 0: the intruder's whole component removed
    s = np.linalg.svd(expected, compute_uv=False)
    assert np.linalg.norm(new - expected) <= np.sqrt(np.sum(s[2:] ** 2)) + 1e-4 * np.linalg.norm(dW)  # rank 2 fit
    assert np.linalg.norm(new) < 1e-2 * np.linalg.norm(dW)
    assert audit_adapter(out, base).layers[0].intruders == 0
    src, got = (read_safetensors(os.path.join(f, "adapter_model.safetensors"))[0] for f in (adapter, out))
    other = f"{PREFIX}model.layers.1.self_attn.q_proj.lora_A.weight"
    assert sorted(src) == sorted(got) and np.array_equal(src[other], got[other])  # a layer without intruders: as is
    assert read_json(os.path.join(out, "adapter_config.json"), "") == read_json(os.path.join(adapter,
                                                                                             "adapter_config.json"), "")


@pytest.mark.spec("AUDIT-20")
@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2 ** 31), st.floats(0.0, 1.0))
def test_the_reduced_factors_share_the_singular_values_and_lambda_one_changes_nothing(seed, lam):
    from minipeft.audit.intruders import reduce_layer
    rng = np.random.default_rng(seed)
    n, r, s = 12, 2, 0.5
    W0 = rng.standard_normal((n, n))
    U0 = np.linalg.svd(W0)[0]
    dW = 100 * np.outer(U0 @ np.ones(n) / math.sqrt(n), rng.standard_normal(n)) + 0.01 * rng.standard_normal((n, 1)) \
        @ rng.standard_normal((1, n))
    got = reduce_layer(W0, dW, s, r, 10, 0.5, lam)
    assert got is not None and got[2] >= 1
    A, B, _ = got
    np.testing.assert_allclose(np.linalg.norm(A, axis=1), np.linalg.norm(B, axis=0), rtol=1e-9)  # sqrt(S) on both
    if lam == 1.0:
        np.testing.assert_allclose(s * B @ A, dW, atol=1e-9 * np.abs(dW).max())
    assert reduce_layer(W0, np.zeros((n, n)), s, r, 10, 0.5, lam) is None  # no intruders: nothing to reduce


@pytest.mark.spec("AUDIT-20")
def test_reduce_intruders_refuses_what_it_cannot_do(base, tmp_path, capsys):
    adapter, _ = planted_intruder(base, tmp_path)
    out = str(tmp_path / "reduced")
    for argv, said in ((["--mitigation-lambda", "1.5"], "must lie in [0, 1]"), (["--intruder-k", "0"], "--intruder-k > 0")):
        assert main(["audit", "adapter", adapter, "--base", base, "--reduce-intruders", out, *argv]) == 2
        assert said in capsys.readouterr().err and not os.path.exists(out)
    edit(adapter, config=lambda c: c.update(base_model_name_or_path=str(tmp_path / "gone")))
    assert main(["audit", "adapter", adapter, "--reduce-intruders", out]) == 2  # no base to read W0 from
    assert "needs the base" in capsys.readouterr().err and not os.path.exists(out)
    edit(adapter, config=lambda c: c.update(base_model_name_or_path=base))
    loha, _ = written(base, tmp_path, "loha")
    assert main(["audit", "adapter", loha, "--base", base, "--reduce-intruders", out]) == 2
    assert "LoRA only" in capsys.readouterr().err and not os.path.exists(out)
    edit(adapter, change=lambda t: t[f"{PREFIX}{Q}.lora_B.weight"].__setitem__((0, 0), np.nan))
    r = audit_adapter(adapter, base, reduce_intruders=out)
    assert {f.kind for f in r.findings} == {"adapter-nonfinite", "not-written"} and r.reduced is None
    assert not os.path.exists(out)


@pytest.mark.spec("AUDIT-21")
def test_rank_pattern_entries_peft_cannot_reload_are_named(base, tmp_path):
    model = mp.load_model(base)
    model.apply_lora(rank=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                     alpha_pattern={"v_proj": 4})
    perturb(model)
    model.save_adapters(str(tmp_path / "a"))
    a = str(tmp_path / "a")
    assert audit_adapter(a, base).findings == []  # a pattern that matches: clean
    edit(a, config=lambda c: c["rank_pattern"].update({"k_proj": 3}))
    f = only(audit_adapter(a, base), "pattern-unmatched")
    assert "'k_proj' matches no adapted layer" in f.message and "applies nowhere" in f.message
    edit(a, config=lambda c: c.update(rank_pattern={"v_proj": 2, "q_proj[": 3}))
    f = only(audit_adapter(a, base), "pattern-invalid")
    assert "'q_proj['" in f.message and "re.error" in f.message
    edit(a, config=lambda c: c.update(rank_pattern={"v_proj": 2}, alpha_pattern={"layers\\.9\\.v_proj": 4}))
    f = only(audit_adapter(a, base), "pattern-unmatched")
    assert "alpha_pattern key" in f.message


@pytest.mark.oracle
@pytest.mark.spec("AUDIT-19", "AUDIT-20")
def test_intruder_counts_and_reduced_factors_equal_peft_reduce_intruder_dimension(hf_base, tmp_path):
    """PEFT's reduce_intruder_dimension logs each layer's count (top_k 10, epsilon 0.5): the same as ours; its new
    adapter (saved) and --reduce-intruders give the same B A per layer and the same logits in PEFT."""
    pytest.importorskip("peft")
    import peft
    import torch
    import transformers
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 1.5)
    pm.save_pretrained(str(tmp_path / "a"))
    logged = []
    reduce_intruder_dimension(pm, logging_sink=logged.append)
    pm.save_pretrained(str(tmp_path / "peft"), selected_adapters=["intruder_reduced"])
    theirs_dir = str(tmp_path / "peft" / "intruder_reduced")
    theirs_count = {line.split(": ")[0].replace("base_model.model.", ""):
                    0 if "No intruders" in line else int(line.rsplit(" ", 1)[1]) for line in logged if ": " in line}
    r = audit_adapter(str(tmp_path / "a"), hf_base, reduce_intruders=str(tmp_path / "ours"))
    ours_count = {x.path: x.intruders for x in r.layers}
    print(f"\n  intruders per layer: {ours_count}")
    assert ours_count == theirs_count and sum(ours_count.values()) > 0
    assert ours_count == {x.path: x.intruders for x in audit_adapter(str(tmp_path / "a"), hf_base).layers}
    assert r.status == 0 and r.reduced_layers == [p for p, n in ours_count.items() if n]
    theirs, ours = (read_safetensors(os.path.join(f, "adapter_model.safetensors"))[0]
                    for f in (theirs_dir, str(tmp_path / "ours")))
    assert sorted(theirs) == sorted(ours)
    worst = 0.0
    for path in r.reduced_layers:
        key = f"{PREFIX}{path}"
        prod = [t[f"{key}.lora_B.weight"].astype(np.float64) @ t[f"{key}.lora_A.weight"].astype(np.float64)
                for t in (theirs, ours)]
        worst = max(worst, float(np.max(np.abs(prod[0] - prod[1])) / np.max(np.abs(prod[0]))))
    ids = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4]])
    out = []
    with torch.no_grad():
        for folder in (theirs_dir, str(tmp_path / "ours")):
            hf = transformers.AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32)
            out.append(peft.PeftModel.from_pretrained(hf, folder)(ids).logits.numpy())
    err = float(np.max(np.abs(out[0] - out[1])))
    print(f"\n  reduce intruders: {len(r.reduced_layers)} of {len(r.layers)} layers reduced, B A vs PEFT's rel "
          f"{worst:.2e}, PEFT logits of both {err:.2e}")
    assert worst < 1e-5 and err < 1e-5
