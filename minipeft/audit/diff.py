"""`audit diff A B [--base BASE]`: how alike are two adapters? (spec/audit.md AUDIT-11..AUDIT-13)

Per layer both adapt, from dW_a, dW_b (out, in) made by each method's own merge (layers.py), with
numerical ranks r_a, r_b (singular values above RANK_RTOL s_1) and U_a (out, r_a), V_a (in, r_a) their
leading left / right singular vectors (AUDIT-11):
    cosine       = <dW_a, dW_b>_F / (||dW_a||_F ||dW_b||_F)
    column angles theta_j = arccos sigma_j(U_a^T U_b),  j = 1..min(r_a, r_b), ascending, in degrees
    row angles    the same with V_a, V_b
    norm ratio   = ||dW_b||_F / ||dW_a||_F
Summary (AUDIT-12): the cosine and norm ratio of all compared layers' dW taken as one vector, the mean of
the layers' cosines, and the mean column-space overlap sum_j cos^2 theta_j / min(r_a, r_b) (1: same
column spaces, 0: orthogonal ones).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .adapter import open_layers
from .files import natural
from .report import Finding, Report, fmt, progress

RANK_RTOL = 1e-10  # singular values at or below RANK_RTOL * s_1 count as zero


@dataclasses.dataclass
class LayerDiff:
    path: str
    shape: tuple  # (out, in)
    rank_a: int
    rank_b: int
    cosine: float  # NaN when either dW is 0
    norm_ratio: float  # ||dW_b|| / ||dW_a|| (inf when dW_a = 0)
    column_angles: list  # degrees, ascending, min(rank_a, rank_b) of them
    row_angles: list


@dataclasses.dataclass
class DiffSummary:
    layers: int
    cosine: float  # of the concatenated dW
    mean_cosine: float
    norm_ratio: float  # of the concatenated dW
    column_overlap: float  # mean over layers of sum cos^2 / min rank


@dataclasses.dataclass
class DiffReport(Report):
    a: str
    b: str
    layers: list
    only_a: list
    only_b: list
    summary: DiffSummary
    findings: list

    command = "audit diff"

    def lines(self) -> list[str]:
        out = [f"A {self.a}", f"B {self.b}", f"{len(self.layers)} layer(s) in both:",
               f"  {'layer':<56} {'rA':>3} {'rB':>3} {'cosine':>7} {'|B|/|A|':>8}  column | row angles (deg)"]
        out += [f"  {d.path:<56} {d.rank_a:>3} {d.rank_b:>3} {fmt(d.cosine):>7} {fmt(d.norm_ratio):>8}  "
                + " ".join(f"{t:.1f}" for t in d.column_angles[:4]) + " | "
                + " ".join(f"{t:.1f}" for t in d.row_angles[:4]) for d in self.layers]
        s = self.summary
        out.append(f"summary: cosine {fmt(s.cosine)} (mean per layer {fmt(s.mean_cosine)}), norm ratio "
                   f"{fmt(s.norm_ratio)}, column-space overlap {fmt(s.column_overlap)} (1 same, 0 orthogonal)")
        return out

    def heat(self):
        return "cosine of dW_A and dW_B", {d.path: d.cosine for d in self.layers}


def basis(dW):
    """(U (out, r), V (in, r), ||dW||_F) at dW's numerical rank r (AUDIT-11)."""
    U, s, Vh = np.linalg.svd(dW, full_matrices=False)
    r = int(np.sum(s > RANK_RTOL * s[0])) if s.size and s[0] > 0 else 0
    return U[:, :r], Vh[:r].T, float(np.sqrt(np.sum(s * s)))


def principal_angles(Qa, Qb) -> list:
    """Degrees between span(Qa) and span(Qb) (orthonormal columns), ascending."""
    if Qa.shape[1] == 0 or Qb.shape[1] == 0:
        return []
    cos = np.clip(np.linalg.svd(Qa.T @ Qb, compute_uv=False), 0.0, 1.0)
    return np.degrees(np.arccos(cos)).tolist()


def layer_diff(path, dWa, dWb) -> LayerDiff:
    Ua, Va, na = basis(dWa)
    Ub, Vb, nb = basis(dWb)
    cosine = float(np.sum(dWa * dWb)) / (na * nb) if na > 0 and nb > 0 else float("nan")
    ratio = nb / na if na > 0 else float("inf")
    return LayerDiff(path, tuple(dWa.shape), Ua.shape[1], Ub.shape[1], cosine, ratio,
                     principal_angles(Ua, Ub), principal_angles(Va, Vb))


def audit_diff(a: str, b: str, base: str | None = None, show_progress: bool = True) -> DiffReport:
    Fa, _, La = open_layers(a, base)
    Fb, _, Lb = open_layers(b, base)
    both = [p for p in La.paths if p in set(Lb.paths)]
    only_a = [p for p in La.paths if p not in set(Lb.paths)]
    only_b = [p for p in Lb.paths if p not in set(La.paths)]
    findings = [Finding("only-in-one", F.config_path, p, f"only {name} adapts this layer; it is left out of the "
                        "comparison", breaks=False) for F, name, ps in ((Fa, "A", only_a), (Fb, "B", only_b)) for p in ps]
    rows, dot, sa, sb = [], 0.0, 0.0, 0.0
    for path in progress(sorted(both, key=natural), len(both), "audit diff", show_progress, "layer"):
        la, lb = La.layer(path), Lb.layer(path)
        if la is None or lb is None:  # a tensor's problem is in the layers' problems
            continue
        if la.dW.shape != lb.dW.shape:
            findings.append(Finding("shape", Fb.weights_path, path, f"dW is {la.dW.shape} in A, {lb.dW.shape} in B: "
                                    "the adapters are for different base models; pass the same --base"))
            continue
        rows.append(layer_diff(path, la.dW, lb.dW))
        dot, sa, sb = dot + float(np.sum(la.dW * lb.dW)), sa + float(np.sum(la.dW ** 2)), sb + float(np.sum(lb.dW ** 2))
        del la, lb
    findings += La.problems + Lb.problems
    nan = float("nan")
    cosines = [d.cosine for d in rows if d.cosine == d.cosine]
    overlaps = [float(np.sum(np.cos(np.radians(d.column_angles)) ** 2)) / len(d.column_angles)
                for d in rows if d.column_angles]
    summary = DiffSummary(len(rows), dot / np.sqrt(sa * sb) if sa > 0 and sb > 0 else nan,
                          float(np.mean(cosines)) if cosines else nan, float(np.sqrt(sb / sa)) if sa > 0 else nan,
                          float(np.mean(overlaps)) if overlaps else nan)
    return DiffReport(Fa.folder, Fb.folder, rows, only_a, only_b, summary, findings)
