"""`audit combine --adapters A B .. --weights w_a w_b .. --type T --combined C`: is C the combination T of
the sources? (spec/audit.md AUDIT-14..AUDIT-18)

Per layer of C, with the sources' deltas dW_i = s_i B_i A_i (those that adapt it), weights w_i and C's own
dW_C = s_C B_C A_C (layers.py), against the definitions of adapters/combine.py (LORA-7..LORA-9), by its code:
    cat                              E = sum_i w_i dW_i (exact)                 |dW_C - E|_F <= tol |E|_F
    linear, ties, magnitude_prune    E = B' A', (A', B') = factorwise(M)        the same test; for linear the
                                                                                gap |E - sum w_i dW_i| is reported
    svd, ties_svd, magnitude_prune_svd  D = M(dW_i; w_i), k = C's rank:         |dW_C - D|_F <= opt_k + tol |D|_F,
                                     opt_k = sqrt(sum_{j>k} s_j(D)^2) (Eckart-Young: no rank-k matrix is closer)
    dare_linear, dare_ties           random masks: each entry of A_C and B_C must be one of the 2^n values the
                                     merge gives for the n sources' keep/drop outcomes, and s_C = 1
    dare_linear_svd, dare_ties_svd   a random D: nothing beyond s_C = 1 can be checked (a note)
Both PEFT and minipeft fold the sources' scalings into C's factors, so the definition has scale 1. A C whose
dW_C is c x E with c = s_C = alpha/sqrt(r) (use_rslora kept) is PEFT 0.21.2's rsLoRA error (issue #3761).
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from .. import backend
from ..adapters import combine as definition
from ..adapters.lora import LoRAConfig, lora_scaling
from ..errors import ConfigError
from .adapter import open_layers
from .files import natural
from .merged import multiple
from .report import Finding, Report, fmt, progress

EXACT = {"cat": "the exact weighted sum", "linear": "the factor-wise definition", "ties": "the factor-wise definition",
         "magnitude_prune": "the factor-wise definition", "svd": "the best rank-k approximation",
         "ties_svd": "the best rank-k approximation", "magnitude_prune_svd": "the best rank-k approximation",
         "dare_linear": "the mask structure of the factors", "dare_ties": "the mask structure of the factors",
         "dare_linear_svd": "C's scale only", "dare_ties_svd": "C's scale only"}
MAX_MASKED = 10  # sources a mask check enumerates (2^n outcomes per entry)


@dataclasses.dataclass
class LayerCheck:
    path: str
    sources: int  # how many sources adapt this layer
    rank: int  # C's
    scale: float  # C's s
    error: float | None  # |dW_C - E| / |E| (svd: (|dW_C - D| - opt) / |D|; dare: entries matching no outcome / all)
    optimum: float | None  # svd types: opt_k / |D|, the least relative error any rank-k C can have
    exact_gap: float | None  # linear: |E - sum w_i dW_i| / |sum w_i dW_i|, how far the definition is from the sum
    ok: bool


@dataclasses.dataclass
class CombineReport(Report):
    adapters: list
    weights: list
    combination: str
    combined: str
    checked: str  # what the type allows to verify
    tol: float
    layers: list
    findings: list

    command = "audit combine"

    def lines(self) -> list[str]:
        out = [f"sources {', '.join(f'{w:g} x {a}' for a, w in zip(self.adapters, self.weights))}",
               f"combined {self.combined} as {self.combination!r}: checked against {self.checked}, tol {self.tol:g}",
               f"  {'layer':<56} {'n':>2} {'r':>3} {'scale':>6} {'error':>9} {'optimum':>9} {'vs sum':>9}"]
        out += [f"  {'ok ' if c.ok else 'BAD'} {c.path:<52} {c.sources:>2} {c.rank:>3} {fmt(c.scale):>6} "
                f"{fmt(c.error):>9} {fmt(c.optimum):>9} {fmt(c.exact_gap):>9}" for c in self.layers]
        return out

    def heat(self):
        return "error against the definition", {c.path: c.error for c in self.layers}


def outcomes(ts, ws, k, merge):
    """(2^n, *shape): merge's value for every keep/drop outcome of the n sources' entries (DARE's masks)."""
    return np.stack([merge([t * bit / k.density for t, bit in zip(ts, bits)], ws)
                     for bits in itertools.product((0.0, 1.0), repeat=len(ts))])


def unmatched(stored, candidates, tol) -> int:
    """Entries of `stored` within tol max|candidates| of none of their candidates."""
    near = np.abs(candidates - stored[None]) <= tol * max(float(np.max(np.abs(candidates))), 1e-30)
    return int(np.sum(~np.any(near, axis=0)))


def clamped_fit(D, r, clamp, B_C):
    """AUDIT-16 with --svd-clamp q: the rank-r factors of D (B = U_r S_r, A = V_r^T) with the signs of C's own
    B_C columns (the SVD leaves each pair's sign free, and the q-quantile of the signed entries depends on it),
    then clipped to [-x, x], x the q-quantile of B's and A's entries together (linear interpolation); B A."""
    U, S, Vh = np.linalg.svd(D, full_matrices=False)
    B, A = U[:, :r] * S[:r], Vh[:r]
    signs = np.where(np.sum(B * B_C, axis=0) < 0, -1.0, 1.0)  # (r,)
    B, A = B * signs, A * signs[:, None]
    x = definition.quantile(np.concatenate([B.ravel(), A.ravel()]), clamp)
    return np.clip(B, -x, x) @ np.clip(A, -x, x)


def check_layer(combination, deltas, ws, dWs, C, k: definition.Knobs, tol, clamp=None):
    """(error, optimum, exact_gap, ok, E or None) of C's layer (its delta and dW) against the definition."""
    dW_C, d_C = C.dW, C.delta
    if combination in definition.MERGES:  # factor-wise
        definition.equal_ranks(combination, deltas, C.path)
    if combination == "cat":
        E = sum(w * d for w, d in zip(ws, dWs))
        return rel(dW_C, E), None, None, rel(dW_C, E) <= tol, E
    if combination in ("linear", "ties", "magnitude_prune"):
        A, B = definition.factorwise(definition.MERGES[combination], deltas, ws, k)
        E = B @ A  # (out, in)
        gap = rel(E, sum(w * d for w, d in zip(ws, dWs))) if combination == "linear" else None
        return rel(dW_C, E), None, gap, rel(dW_C, E) <= tol, E
    if combination in ("svd", "ties_svd", "magnitude_prune_svd"):
        merge = definition.MERGES.get(combination[:-len("_svd")], definition.task_arithmetic)
        D = merge(dWs, ws, k)
        U, S, Vh = np.linalg.svd(D, full_matrices=False)
        r = d_C.lora_A.weight.shape[0]
        if clamp is not None:  # no optimum to compare with: the clipped factors of D are the definition
            E = clamped_fit(D, r, clamp, np.asarray(d_C.lora_B.weight.data, dtype=np.float64))
            return rel(dW_C, E), None, None, rel(dW_C, E) <= tol, E
        norm, opt = float(np.linalg.norm(D)), float(np.sqrt(np.sum(S[r:] ** 2)))
        excess = (float(np.linalg.norm(dW_C - D)) - opt) / max(norm, 1e-30)
        return excess, opt / max(norm, 1e-30), None, excess <= tol, (U[:, :r] * S[:r]) @ Vh[:r]
    if combination in ("dare_linear", "dare_ties") and len(deltas) <= MAX_MASKED:
        if combination == "dare_linear":
            def merge(ts, w):
                return definition.task_arithmetic(ts, w, k)
        else:
            def merge(ts, w):
                return definition.disjoint_mean(ts, w, k.majority_sign_method)
        A, B = definition.factorwise(lambda ts, w, _: outcomes(ts, w, k, merge), deltas, ws, k)  # (2^n, ...) each
        stored = (d_C.lora_A.weight.data, d_C.lora_B.weight.data)
        bad = unmatched(stored[0], A, tol) + unmatched(stored[1], B, tol)
        return bad / (stored[0].size + stored[1].size), None, None, bad == 0, None
    return None, None, None, True, None


def rel(X, Y) -> float:
    return float(np.linalg.norm(X - Y)) / max(float(np.linalg.norm(Y)), 1e-30)


def scale_finding(C, cfg, scales: dict, found: dict) -> Finding:
    """C's scale is not the definition's 1 at these layers: PEFT 0.21.2's rsLoRA error, or another scaling."""
    r, s = next(iter(scales.items()))
    paths = sorted(found, key=natural)
    where = f"{len(paths)} layer(s) ({paths[0]}{', ...' if len(paths) > 1 else ''})"
    if cfg.use_rslora:
        return Finding("rslora-scale", C.config_path, None,
                       f"dW of the combined adapter is {s:.4g} x the combination at {where}: the expected scale is 1 "
                       f"(lora_alpha / r = {r:g} / {r:g}; the sources' scalings are already in its factors), the "
                       f"found scale is lora_alpha / sqrt(r) = {r:g} / sqrt({r:g}) = {s:.4g}, because "
                       "adapter_config.json keeps use_rslora = true. This is PEFT 0.21.2's add_weighted_adapter "
                       "with rsLoRA sources (PEFT issue #3761). Set \"use_rslora\": false in its adapter_config.json")
    return Finding("combined-scale", C.config_path, None,
                   f"dW of the combined adapter is {s:.4g} x the combination at {where} (its lora_alpha / r): the "
                   "expected scale is 1. Set lora_alpha = r, or combine again")


def bias_finding(F_C, C, deltas, ws, tol):
    """AUDIT-26: with sources that train a lora_B bias, C's s_C b_C must be sum_i w_i s_i b_i (every type)."""
    parts = [w * d.s * np.asarray(d.lora_B.bias.data, dtype=np.float64) for d, w in zip(deltas, ws)
             if getattr(d.lora_B, "bias", None) is not None]
    if not parts:
        return None
    E = sum(parts)
    b = getattr(C.delta.lora_B, "bias", None)
    got = C.delta.s * np.asarray(b.data, dtype=np.float64) if b is not None else np.zeros_like(E)
    err = rel(got, E)
    if err <= tol:
        return None
    return Finding("wrong-bias", F_C.weights_path, f"base_model.model.{C.path}.lora_B.bias",
                   f"relative error {err:.3g} > tol {tol:g} against sum_i w_i s_i b_i of the sources' lora_B biases"
                   f"{' (the combined adapter has no lora_B bias)' if b is None else ''}: its outputs are off by "
                   "that bias. Combine again with minipeft's merge_adapters, which sums them")


def copy_findings(opened, F_C, L_C, tol) -> list[Finding]:
    """AUDIT-26: every base tensor a source replaces (a modules_to_save copy, a trained bias) must be in C as that
    source's tensor (all sources that replace it agreeing); C replacing one no source does is combined-extra."""
    out = []
    keys = sorted({k for _, _, L in opened for k in L.replaced} | set(L_C.replaced), key=natural)
    for key in keys:
        have = [(F, F.tensors[L.replaced[key]]) for F, _, L in opened if key in L.replaced]
        if not have:
            out.append(Finding("combined-extra", F_C.weights_path, L_C.replaced[key], "no source replaces this base "
                               "tensor, but the combined adapter does: was it combined from other sources?"))
            continue
        if any(not np.array_equal(t, have[0][1]) for _, t in have[1:]):
            out.append(Finding("ambiguous-copy", F_C.weights_path, key, f"{len(have)} sources hold different copies "
                               "of this tensor, so no one combination of them is defined (minipeft and PEFT refuse "
                               "such sources)", breaks=False))
            continue
        if key not in L_C.replaced:
            out.append(Finding("copy-missing", F_C.weights_path, key, f"{have[0][0].folder} trains this tensor "
                               "(modules_to_save or a bias), but the combined adapter lacks it, so the model falls "
                               "back to the base's. Combine again, keeping modules_to_save"))
            continue
        got = F_C.tensors[L_C.replaced[key]]
        if got.shape != have[0][1].shape or rel(got, have[0][1]) > tol:
            out.append(Finding("copy-differs", F_C.weights_path, L_C.replaced[key], f"differs from "
                               f"{have[0][0].folder}'s copy (relative error "
                               f"{rel(got, have[0][1]) if got.shape == have[0][1].shape else float('nan'):.3g}); the "
                               "combined adapter should carry the source's trained copy unchanged"))
    return out


def audit_combine(adapters, weights, combination: str, combined: str, base=None, density=None,
                  majority_sign_method: str = "total", tol: float = 1e-5, show_progress: bool = True,
                  svd_clamp: float | None = None) -> CombineReport:
    k = check_args(adapters, weights, combination, density, majority_sign_method)
    if svd_clamp is not None and (not combination.endswith("svd") or not 0 <= svd_clamp <= 1):
        raise ConfigError(f"--svd-clamp {svd_clamp!r} is a quantile in [0, 1] and applies to the *svd types only "
                          f"(--type {combination!r})")
    opened = [open_layers(a, base) for a in adapters]
    F_C, _, L_C = open_layers(combined, base)
    for F, _, _ in [*opened, (F_C, None, None)]:
        if type(F.cfg) is not LoRAConfig:
            raise ConfigError(f"{F.folder}: a {F.method.title} adapter; combinations are of plain LoRA adapters "
                              "(PEFT's add_weighted_adapter, minipeft's merge_adapters)")
    if len(adapters) == 1:
        combination = "linear"  # exact for one source; PEFT and minipeft both do it
    sources = sorted({p for _, _, L in opened for p in L.paths}, key=natural)
    findings = [Finding("combined-missing", F_C.config_path, p, "a source adapts this layer, but the combined "
                        "adapter does not: combine again with the same target_modules") for p in sources
                if p not in L_C.paths]
    findings += [Finding("combined-extra", F_C.config_path, p, "no source adapts this layer, but the combined adapter "
                         "does: was it combined from other sources?") for p in L_C.paths if p not in sources]
    rows, wrong_scale, scales = [], {}, {}
    for path in progress([p for p in sources if p in L_C.paths], len(sources), "audit combine", show_progress, "layer"):
        parts = [(L.layer(path), w) for (_, _, L), w in zip(opened, weights) if path in L.paths]
        C = L_C.layer(path)
        if C is None or any(p is None for p, _ in parts):
            continue  # a tensor's problem is in the layers' problems
        r, alpha = F_C.cfg.rank_alpha_for(path)
        s_C = lora_scaling(alpha, r, F_C.cfg.use_rslora)
        ws = [w for _, w in parts]
        err, opt, gap, ok, E = check_layer(combination, [p.delta for p, _ in parts], ws, [p.dW for p, _ in parts], C,
                                           k, tol, svd_clamp)
        wrong_bias = bias_finding(F_C, C, [p.delta for p, _ in parts], ws, tol)
        findings += [wrong_bias] if wrong_bias else []
        c = None if E is None or ok else multiple(C.dW, E)  # dW_C = c E
        if abs(s_C - 1) > 1e-12 and (E is None or c is not None and abs(c - s_C) <= 1e-3 * s_C):
            wrong_scale[path], scales[r], ok = s_C, s_C, False  # C's scale explains it (or is all that is checkable)
        elif not ok:
            findings.append(Finding("wrong-combination", F_C.weights_path, path,
                                    f"{'entries of A, B matching no mask outcome' if E is None else 'relative error'}"
                                    f" {err:.3g} > tol {tol:g} against {EXACT[combination]} of {combination!r}"
                                    f"{f' (dW here is {c:.4g} x the definition)' if c is not None else ''}. Check "
                                    "--weights, --type and --density, or combine again"))
        rows.append(LayerCheck(path, len(parts), C.delta.lora_A.weight.shape[0], s_C, err, opt, gap, ok))
        del parts, C
    if wrong_scale:
        findings.append(scale_finding(F_C, F_C.cfg, scales, wrong_scale))
    findings += copy_findings(opened, F_C, L_C, tol)
    findings += [f for _, _, L in opened for f in L.problems] + L_C.problems
    if combination in ("dare_linear_svd", "dare_ties_svd"):
        findings.append(Finding("unverifiable", F_C.weights_path, None, f"{combination!r} draws random masks of the "
                                "full dW_i before its SVD: only C's scale can be checked", breaks=False))
    elif combination in ("dare_linear", "dare_ties"):
        findings.append(Finding("random-masks", F_C.weights_path, None, "DARE's masks are random (PEFT draws them with "
                                "torch, minipeft with PCG64): checked is that every entry of A and B is one of the "
                                "values some keep/drop outcome gives, not which outcome", breaks=False))
    return CombineReport(list(adapters), [float(w) for w in weights], combination, F_C.folder, EXACT[combination],
                         tol, rows, findings)


def check_args(adapters, weights, combination, density, sign_method) -> definition.Knobs:
    if len(adapters) != len(weights) or not adapters:
        raise ConfigError(f"{len(adapters)} adapter(s) but {len(weights)} weight(s): give one weight per adapter")
    if combination not in definition.COMBINATIONS:
        raise ConfigError(f"--type {combination!r} is unknown; use one of {', '.join(definition.COMBINATIONS)}")
    pruned = any(m in combination for m in ("ties", "dare", "magnitude_prune"))
    if pruned and density is None:
        raise ConfigError(f"--type {combination!r} prunes: give the --density it was combined with")
    if density is not None and not 0 < density <= 1:
        raise ConfigError(f"--density {density!r} must lie in (0, 1]")
    if sign_method not in ("total", "frequency"):
        raise ConfigError(f"--majority-sign-method {sign_method!r}: use 'total' or 'frequency'")
    return definition.Knobs(float(density or 1.0), sign_method, backend.RNG(0))
