"""Intruder dimensions (Shuttleworth et al., "LoRA vs Full Fine-tuning: An Illusion of Equivalence", 2024,
arXiv:2410.21228): counted in `audit adapter --base` (AUDIT-19) and removed by `--reduce-intruders OUT`
(AUDIT-20), PEFT's `reduce_intruder_dimension` on a LoRA adapter. All matrices (out, in), float64:

    W0 = U0 S0 V0^T,   W = W0 + dW = U S V^T                                (full SVDs, thin)
    intruders  I = { j < k : max_i |u_j^T U0[:, i]| < eps }                 (top k of W's left vectors)
    dW'        = dW + (lambda - 1) sum_{j in I} s_j u_j v_j^T               (lambda of each intruder kept)
    dW' / s    = U' S' V'^T,  B' = U'_r sqrt(S'_r),  A' = sqrt(S'_r) V'_r^T  (the layer's rank r and scale s)

so s B' A' is the best rank-r fit of dW' (exactly dW' when dW' has rank <= r, as for lambda = 1).
"""
from __future__ import annotations

import numpy as np


def intruder_indices(W0, W, k: int, eps: float):
    """AUDIT-19: (the indices j < k of W's left singular vectors with |cos| < eps against every left singular
    vector of W0, W's thin SVD (U, S, Vt))."""
    U0 = np.linalg.svd(W0, full_matrices=False)[0]  # (out, q)
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    cos = np.max(np.abs(U[:, :k].T @ U0), axis=1)  # (min(k, q),)
    return np.flatnonzero(cos < eps), (U, S, Vt)


def intruders(W0, W, k: int, eps: float) -> int:
    """AUDIT-19: how many of W's top k left singular vectors are intruders against W0 (both (out, in))."""
    return int(intruder_indices(W0, W, k, eps)[0].size)


def reduce_layer(W0, dW, scale: float, r: int, k: int, eps: float, lam: float):
    """AUDIT-20: (A' (r, in), B' (out, r), how many intruders) of one LoRA layer, or None when it has none (its
    factors stay as they are)."""
    idx, (U, S, Vt) = intruder_indices(W0, W0 + dW, k, eps)
    if idx.size == 0:
        return None
    reduced = (dW + (lam - 1.0) * (U[:, idx] * S[idx]) @ Vt[idx]) / scale  # (out, in)
    U2, S2, Vt2 = np.linalg.svd(reduced, full_matrices=False)
    root = np.sqrt(S2[:r])
    return root[:, None] * Vt2[:r], U2[:, :r] * root, int(idx.size)
