"""`minipeft audit diff` (spec/audit.md AUDIT-11..AUDIT-13): the per-layer cosine, principal angles and norm
ratio against matrices built with known subspaces, and against adapter folders (a copy, a scaled copy,
another target set, a DoRA that needs its base)."""
import json
import math
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipeft.audit import audit_diff
from minipeft.audit.diff import layer_diff
from minipeft.cli import main
from tests.test_audit_adapter import PREFIX, edit
from tests.test_audit_merged import base, written  # noqa: F401


def low_rank(rng, U, V):
    """U diag(s) V^T with positive random s: its column space is span(U), its row space span(V)."""
    return (U * rng.uniform(0.5, 2.0, U.shape[1])) @ V.T


@pytest.mark.spec("AUDIT-11")
@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 31), st.integers(4, 24), st.integers(4, 24), st.integers(1, 4), st.floats(0.01, 100.0))
def test_itself_a_scaled_copy_and_orthogonal_spaces(seed, out, n, r, c):
    rng = np.random.default_rng(seed)
    r = min(r, out // 2, n)
    Q = np.linalg.qr(rng.standard_normal((out, 2 * r)))[0]  # (out, 2r) orthonormal columns
    V = np.linalg.qr(rng.standard_normal((n, r)))[0]
    dW = low_rank(rng, Q[:, :r], V)
    same = layer_diff("l", dW, dW)
    assert same.cosine == pytest.approx(1.0) and same.norm_ratio == pytest.approx(1.0)
    assert (same.rank_a, same.rank_b) == (r, r) and len(same.column_angles) == r == len(same.row_angles)
    np.testing.assert_allclose(same.column_angles + same.row_angles, 0.0, atol=1e-4)
    scaled = layer_diff("l", dW, c * dW)
    assert scaled.cosine == pytest.approx(1.0) and scaled.norm_ratio == pytest.approx(c)
    np.testing.assert_allclose(scaled.column_angles + scaled.row_angles, 0.0, atol=1e-4)
    other = layer_diff("l", dW, low_rank(rng, Q[:, r:], V))  # orthogonal column space, same row space
    np.testing.assert_allclose(other.column_angles, 90.0, atol=1e-6)
    np.testing.assert_allclose(other.row_angles, 0.0, atol=1e-4)
    assert abs(other.cosine) < 1e-9


@pytest.mark.spec("AUDIT-11")
def test_angles_between_spaces_at_a_known_angle():
    """span(e1) against span(cos t e1 + sin t e2): one principal angle t; the cosine of the rank-1 dW is cos t."""
    t = math.radians(30)
    a, b, v = np.zeros(6), np.zeros(6), np.zeros(5)
    a[0], b[0], b[1], v[2] = 1.0, math.cos(t), math.sin(t), 1.0
    d = layer_diff("l", np.outer(a, v), 3.0 * np.outer(b, v))
    assert d.column_angles == pytest.approx([30.0]) and d.row_angles == pytest.approx([0.0], abs=1e-6)
    assert d.cosine == pytest.approx(math.cos(t)) and d.norm_ratio == pytest.approx(3.0)


def copy_scaled(src, dst, c):
    shutil.copytree(src, dst)
    edit(str(dst), lambda t: [t.__setitem__(k, v * c) for k, v in list(t.items()) if ".lora_B." in k])
    return str(dst)


@pytest.mark.spec("AUDIT-11", "AUDIT-12", "AUDIT-1")
def test_an_adapter_against_a_scaled_copy(base, tmp_path, capsys):
    a, _ = written(base, tmp_path, rank=4)
    b = copy_scaled(a, tmp_path / "b", 2.5)
    r = audit_diff(a, b, base)
    assert r.status == 0 and r.findings == [] and len(r.layers) == 4
    for d in r.layers:
        assert d.cosine == pytest.approx(1.0) and d.norm_ratio == pytest.approx(2.5) and d.rank_a == 4
        np.testing.assert_allclose(d.column_angles + d.row_angles, 0.0, atol=1e-4)
    s = r.summary
    assert (s.layers, s.cosine, s.mean_cosine, s.norm_ratio, s.column_overlap) == (
        4, pytest.approx(1.0), pytest.approx(1.0), pytest.approx(2.5), pytest.approx(1.0))
    assert main(["audit", "diff", a, b, "--base", base, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["command"] == "audit diff" and out["summary"]["norm_ratio"] == pytest.approx(2.5)
    assert main(["audit", "diff", a, b, "--no-progress"]) == 0  # a plain LoRA needs no base (AUDIT-8)
    assert "summary: cosine 1" in capsys.readouterr().out


@pytest.mark.spec("AUDIT-12", "AUDIT-13")
def test_other_targets_and_independent_adapters(base, tmp_path):
    a, _ = written(base, tmp_path / "a", rank=4, target_modules=["q_proj", "v_proj"])
    b, _ = written(base, tmp_path / "b", rank=4, target_modules=["q_proj", "k_proj"])
    edit(b, lambda t: [t.__setitem__(k, np.random.default_rng(3).standard_normal(v.shape)) for k, v in list(t.items())])
    r = audit_diff(a, b, base)
    assert r.status == 0 and [d.path.rsplit(".", 1)[1] for d in r.layers] == ["q_proj", "q_proj"]
    assert sorted(f.kind for f in r.findings) == ["only-in-one"] * 4 and not any(f.breaks for f in r.findings)
    assert [p.rsplit(".", 1)[1] for p in r.only_a] == ["v_proj"] * 2
    for d in r.layers:  # independent random rank-4 spaces in 32 dimensions: far from aligned
        assert abs(d.cosine) < 0.5 and min(d.column_angles) > 20
    assert 0 < r.summary.column_overlap < 0.5


@pytest.mark.spec("AUDIT-11", "AUDIT-13")
def test_a_dora_against_itself_and_a_nan(base, tmp_path):
    a, _ = written(base, tmp_path, "dora", rank=4)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    r = audit_diff(a, str(b), base)
    assert r.status == 0 and r.findings == [] and r.layers
    assert all(d.cosine == pytest.approx(1.0) and max(d.column_angles) < 1e-3 for d in r.layers)
    edit(str(b), lambda t: t[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"].__setitem__((0, 0), np.nan))
    r = audit_diff(a, str(b), base)
    assert r.status == 1 and [f.kind for f in r.findings] == ["adapter-nonfinite"]
    assert "model.layers.0.self_attn.q_proj" not in [d.path for d in r.layers]
