"""`audit merged BASE ADAPTER MERGED`: is MERGED really BASE + the adapter? (spec/audit.md AUDIT-3..AUDIT-6)

Every tensor of MERGED is compared with its expected value E, one tensor in memory at a time:
    an adapted layer's weight and bias:  E = the method's merge_into(W0, b0)   (layers.py)
    a tensor the file replaces:          E = the saved tensor   (modules_to_save copy, trained bias)
    any other tensor:                    E = BASE's
and passes when every element satisfies (AUDIT-3)
    |M - E| <= tol (1 + |E|) + eps (|E| + |W0| + 2 max|dW|)
with eps the machine epsilon of the coarser of the two stored dtypes (2^-23 F32, 2^-10 F16, 2^-7 BF16):
a bf16 merge is judged against bf16 rounding of W0, of the factors and product dW and of W0 + dW (max|dW|:
the product's rounding follows the factors' scale, not its own entry's), a float32 one against tol alone.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..errors import CheckpointError
from .files import EPSILON, Checkpoint, read_adapter
from .layers import AdapterLayers
from .report import Finding, Report, fmt, progress

FIX_MERGE = "merge again from this BASE and ADAPTER (minipeft merge, or PEFT merge_and_unload + save_pretrained)"


@dataclasses.dataclass
class TensorCheck:
    name: str
    dtype: str  # MERGED's stored dtype
    touched: bool  # the adapter changes this tensor
    max_abs: float  # max |M - E|
    max_rel: float  # max |M - E| / max |E|
    changed: float  # max |M - BASE|: how far MERGED moved from the base
    ok: bool


@dataclasses.dataclass
class MergedReport(Report):
    base: str
    adapter: str
    merged: str
    method: str
    tol: float
    rule: str  # the tolerance rule, with the dtypes it was applied to
    tensors: list
    findings: list

    command = "audit merged"

    def lines(self) -> list[str]:
        out = [f"base {self.base}", f"adapter {self.adapter} ({self.method})", f"merged {self.merged}",
               f"rule: {self.rule}"]
        touched = [t for t in self.tensors if t.touched]
        out.append(f"{len(touched)} tensor(s) the adapter changes:")
        out += [f"  {'ok ' if t.ok else 'BAD'} {t.name:<48} {t.dtype:<5} max|M-E| {fmt(t.max_abs):>9}  "
                f"rel {fmt(t.max_rel):>9}  |M-BASE| {fmt(t.changed):>9}" for t in touched]
        rest = [t for t in self.tensors if not t.touched]
        bad = [t for t in rest if not t.ok]
        out.append(f"{len(rest) - len(bad)} of {len(rest)} tensor(s) the adapter does not touch equal BASE")
        out += [f"  BAD {t.name:<48} {t.dtype:<5} |M-BASE| {fmt(t.changed):>9}" for t in bad]
        return out

    def heat(self):
        return "max |M - E| of the weight", {t.name[:-len(".weight")]: t.max_abs for t in self.tensors
                                             if t.touched and t.name.endswith(".weight")}


BLOCK = 1 << 20  # values compared at a time, so a large untouched tensor (an embedding) is never copied whole


def allowance(E, W0, dW_max: float, tol: float, eps: float):
    """AUDIT-3: tol (1 + |E|) + eps (|E| + |W0| + 2 max|dW|), elementwise."""
    aE = np.abs(E)
    return tol * (1.0 + aE) + eps * (aE + np.abs(W0) + 2.0 * dW_max)


def audit_merged(base: str, adapter: str, merged: str, tol: float = 1e-5, show_progress: bool = True) -> MergedReport:
    B, M, A = Checkpoint(base, "base"), Checkpoint(merged, "merged"), read_adapter(adapter)
    layers = AdapterLayers(A, B)
    findings, checks, dtypes = [], [], set()
    findings += [Finding("missing-tensor", M.folder, k, f"MERGED lacks this tensor of BASE ({B.where(k)}); a "
                         f"model loaded from MERGED would be missing it. {FIX_MERGE[0].upper() + FIX_MERGE[1:]}")
                 for k in B.keys() if k not in M]
    findings += [Finding("extra-tensor", M.where(k), k, "BASE has no such tensor; MERGED was not made from this "
                         "BASE, or holds adapter tensors (save the merged model after merge_and_unload)")
                 for k in M.keys() if k not in B]
    expected = {}  # key -> (E, dW, touched), filled layer by layer
    order = [k for p in layers.paths for k in (f"{p}.weight", f"{p}.bias") if k in B]
    order += [k for k in B.keys() if k not in set(order)]
    for key in progress([k for k in order if k in M], sum(k in M for k in order), "audit merged",
                        show_progress):
        if key in expected:
            E, dW, touched = expected.pop(key)
        elif key.endswith(".weight") and key[:-len(".weight")] in layers.paths:
            layer = layers.layer(key[:-len(".weight")])
            if layer is None:
                raise CheckpointError(f"the adapter does not load: {layers.problems[-1].line()}")
            E, dW = layer.merged, layer.dW
            if B.info(key).shape != E.shape:  # GPT-2's Conv1D: compare in the storage layout
                E, dW = E.T, dW.T
            if layer.bias is not None:  # touched where the merge or a trained bias changes it
                db = layer.bias - B.read(f"{layer.path}.bias")
                expected[f"{layer.path}.bias"] = (layer.bias, db, bool(np.any(db)))
            touched = True
        elif key in layers.replaced:
            E = A.tensors[layers.replaced[key]]
            dW, touched = E - B.read(key), True
        else:
            E, dW, touched = None, 0.0, False  # E = BASE's tensor: compare() reads it a block at a time
        check, finding = compare(key, E, dW, touched, B, M, tol)
        dtypes.add((B.dtype(key), M.dtype(key)))
        checks.append(check)
        findings += [finding] if finding else []
        del E, dW
    return MergedReport(B.folder, A.folder, M.folder, A.method.title, tol, rule_text(tol, dtypes), checks, findings)


def reader(x, C, key):
    """block(start): BLOCK values from `start` (C order, float64) of the computed array x, or with x None of C's
    tensor `key`, read from its file (AUDIT-7: never mapped whole)."""
    if x is None:
        return lambda start: C.block(key, start, BLOCK)
    flat = np.reshape(x, -1)
    return lambda start: np.asarray(flat[start:start + BLOCK], dtype=np.float64)


def compare(key, E, dW, touched, B, M, tol):
    """(TensorCheck, Finding or None) of MERGED's tensor `key` against E (None: BASE's tensor, the expected value of
    a tensor the adapter does not touch), BLOCK values at a time, each block in float64."""
    shape = tuple(B.info(key).shape) if E is None else tuple(np.shape(E))
    if tuple(M.info(key).shape) != shape:
        return TensorCheck(key, M.dtype(key), touched, float("nan"), float("nan"), float("nan"), False), \
            Finding("shape", M.where(key), key, f"shape {tuple(M.info(key).shape)} in MERGED, {shape} in BASE; "
                    f"{FIX_MERGE}")
    eps = max(EPSILON.get(B.dtype(key), 0.0), EPSILON.get(M.dtype(key), 0.0))
    m_of, e_of = reader(None, M, key), reader(E, B, key)
    w_of = reader(None, B, key) if touched else e_of
    dW_max = float(np.max(np.abs(dW), initial=0.0))
    size = int(np.prod(shape))
    worst = scale = moved = 0.0
    n_bad, first, finite = 0, None, True
    for start in range(0, size, BLOCK):
        m, e = m_of(start), e_of(start)
        w = w_of(start) if touched else e
        err = np.abs(m - e)
        bad = ~(err <= allowance(e, w, dW_max, tol, eps))  # a NaN is bad
        worst, scale = max(worst, float(np.max(err))), max(scale, float(np.max(np.abs(e))))
        moved = max(moved, float(np.max(np.abs(m - w))))
        finite = finite and bool(np.all(np.isfinite(m)))
        if bad.any():
            first = start + int(np.argmax(bad)) if first is None else first
            n_bad += int(bad.sum())
    check = TensorCheck(key, M.dtype(key), touched, worst, worst / max(scale, 1e-30), moved, n_bad == 0)
    if check.ok:
        return check, None
    at = tuple(int(i) for i in np.unravel_index(first, shape))
    where = (f"{n_bad} of {size} values outside the allowance (first at {at}: MERGED {float(m_of(first)[0]):.6g}, "
             f"expected {float(e_of(first)[0]):.6g})")
    if not finite:
        return check, Finding("nonfinite", M.where(key), key, f"MERGED holds NaN/Inf; {where}. {FIX_MERGE}")
    if not touched:
        return check, Finding("untouched-changed", M.where(key), key,
                              f"the adapter does not change this tensor, but MERGED differs from BASE by up to "
                              f"{worst:.3g} (relative {check.max_rel:.3g}); {where}. Was MERGED made from another "
                              "base, or with another adapter merged as well?")
    return check, Finding("wrong-merge", M.where(key), key,
                          f"max |M - E| = {worst:.3g} (relative {check.max_rel:.3g}); {where}"
                          f"{diagnosis(M.read(key) - B.read(key), dW)}. {FIX_MERGE}")


def diagnosis(moved, dW) -> str:
    """What MERGED's change M - W0 looks like next to dW: none at all, or dW times a scalar c != 1."""
    if not np.any(moved):
        return "; MERGED holds BASE's value here: the adapter was not merged into this layer"
    c = multiple(moved, dW)
    return f"; MERGED - BASE = {c:.4g} x dW here (the scaling differs)" if c is not None else ""


def multiple(X, Y) -> float | None:
    """c when X = c Y with c != 1 (both within 1e-3, relative), else None."""
    Y = np.broadcast_to(Y, np.shape(X))
    norm = float(np.sum(Y * Y))
    if norm == 0:
        return None
    c = float(np.sum(X * Y)) / norm
    rest = float(np.linalg.norm(X - c * Y)) / max(float(np.linalg.norm(X)), 1e-30)
    return c if rest < 1e-3 and abs(c - 1) > 1e-3 else None


def rule_text(tol, dtypes) -> str:
    pairs = ", ".join(f"BASE {b} / MERGED {m} (eps 2^{int(np.log2(max(EPSILON.get(b, 0), EPSILON.get(m, 0))))})"
                      for b, m in sorted(dtypes) if max(EPSILON.get(b, 0), EPSILON.get(m, 0)) > 0)
    half = any("BF16" in p or "F16" in p for p in dtypes)
    return (f"|M - E| <= tol (1 + |E|) + eps (|E| + |W0| + 2 max|dW|), tol {tol:g}, eps of the coarser stored dtype: {pairs}"
            + ("; a 16-bit merge is judged against 16-bit rounding of W0 + dW" if half else ""))
