"""AdaMSS: Adaptive Multi-Subspace Approach for Parameter-Efficient Fine-Tuning (NeurIPS 2025, openreview 8ZdWmpYxT0;
no arXiv id), as PEFT 0.21.2's ADAMSS tuner; spec/adamss.md.

Symbols: a targeted Linear W0 (m, n) = (out, in) with bias b; Wb = [W0 | b] (m, n + 1) (Wb = W0 without a bias),
    xb = [x; 1] (x alone without a bias); R = min(r, m, n + 1); K = num_subspaces; r_k the subspace ranks.
Decomposition (ADAMSS-1): U (m, R), V (n + 1, R) = torch.svd_lowrank(Wb, q = R, niter = 2) under
    torch.manual_seed(random_seed) (rebuilt here: torch's randn, QR and SVD steps, in float64); newB = V^T (R, n + 1),
    frozen and saved.
Clustering (ADAMSS-2): the rows of U (float32) in K' = min(K, m) clusters by scikit-learn's KMeans(init="random",
    n_init=1, max_iter=10, random_state=123456789) as sklearn computes it (rebuilt here: kmeans_labels); cluster k
    holds the output rows S_k (ascending); scatter order = S_0, S_1, ...
Forward (ADAMSS-3): h = W0 x + b + P [B_k A_k newB xb]_k: subspace k gives (.., |S_k|) placed at rows S_k; with
    A_k (r_k, R), B_k (|S_k|, r_k) trained, r_k = min(|S_k|, subspace_rank) (use_dynamic_rank: also at most the
    number of singular values of U[S_k] above svd_threshold times the largest, at least 1).
Init (ADAMSS-4): A_k = the top r_k right singular vectors of U[S_k] (rows); init_weights="orthogonal": B_k = 0,
    the base at step 0; None: B_k ~ N(0, 0.01^2).
Merge (ADAMSS-5): [dW | db] = P [B_k A_k newB]_k (m, n + 1): W <- W0 + dW, b <- b + db; unmerge subtracts them.
Trainable (ADAMSS-6): sum_k r_k (R + |S_k|) per layer; newB is frozen.
Serialization (ADAMSS-7): peft_type "ADAMSS"; <layer>.adamss_A.<k> (r_k, R), .adamss_B.<k> (|S_k|, r_k),
    .adamss_newB (R, n + 1); the clustering is not saved: both libraries recompute it from W0 and random_seed.
PEFT parity: peft/tuners/adamss/layer.py AdamssLayer.update_layer, Linear.forward, get_delta_weight,
    get_delta_bias; utils.py slice_pca, clustering_Z, seg_locations.
Deviations: use_asa=True (PEFT's training callback that prunes subspaces) is a ConfigError. A_k is the exact top
    right singular basis (PEFT: a randomized svd_lowrank from torch's unseeded global generator; A_k is saved, so
    files load alike); random B_k draws come from minipeft's RNG.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend
from ..autograd import concat, take_rows
from ..autograd import functional as F
from ..autograd.tensor import Tensor
from ..errors import ConfigError
from ..nn.module import Module
from .base import AdapterConfig, Delta, check, check_peft_linear, trainable
from .registry import register

KMEANS_SEED, KMEANS_ITER, KMEANS_TOL = 123456789, 10, 1e-4  # PEFT's clustering_Z: KMeans(random_state, max_iter)


def svd_lowrank(Wb, q: int, seed: int):
    """ADAMSS-1: torch.svd_lowrank(Wb, q, niter=2) under torch.manual_seed(seed), on the CPU: (U (m, q), V (n, q))."""
    A = np.asarray(Wb, np.float64)
    wide = A.shape[0] < A.shape[1]
    A = A.T if wide else A  # torch works on the tall side
    R = backend.torch_normal((A.shape[1], q), 1.0, seed).astype(np.float64)
    Q = np.linalg.qr(A @ R)[0]
    for _ in range(2):
        Q = np.linalg.qr(A.T @ Q)[0]
        Q = np.linalg.qr(A @ Q)[0]
    U_b, _, Vh = np.linalg.svd(Q.T @ A, full_matrices=False)
    U, V = Q @ U_b, Vh.T
    return (V, U) if wide else (U, V)


def kmeans_labels(X, k: int, seed: int = KMEANS_SEED, max_iter: int = KMEANS_ITER, tol: float = KMEANS_TOL):
    """ADAMSS-2: sklearn's KMeans(n_clusters=k, init="random", n_init=1, max_iter, tol, random_state=seed)
    .fit_predict(X) for float32 X, Lloyd's algorithm as sklearn runs it: tol scaled by the mean feature variance;
    X centred; seeds RandomState(seed).choice(n, k, replace=False, p=w / sum w); each step labels by the first
    smallest ||c||^2 - 2 x.c, new centres the cluster means, an empty cluster taking the point farthest from its
    centre (np.argpartition's order); stop on unchanged labels or a total squared centre shift <= tol; then
    relabel if it did not stop on unchanged labels."""
    X = np.array(X, dtype=np.float32)
    n = X.shape[0]
    tol = np.mean(np.var(X, axis=0)) * tol
    X -= X.mean(axis=0)
    w = np.ones(n, dtype=np.float32)
    centers = X[np.random.RandomState(seed).choice(n, size=k, replace=False, p=w / w.sum())]

    def assign(c):
        return np.argmin((c * c).sum(1)[None, :] - 2.0 * (X @ c.T), axis=1)  # first minimum on ties

    labels_old, strict = np.full(n, -1), False
    for _ in range(max_iter):
        labels = assign(centers)
        sums = np.zeros_like(centers)
        np.add.at(sums, labels, X)
        count = np.bincount(labels, minlength=k).astype(np.float32)
        empty = np.flatnonzero(count == 0)
        if empty.size:  # sklearn's _relocate_empty_clusters_dense
            far = np.argpartition(((X - centers[labels]) ** 2).sum(1), -empty.size)[:-empty.size - 1:-1]
            for j, i in zip(empty, far):
                sums[labels[i]] -= X[i]
                sums[j], count[j] = X[i], 1.0
                count[labels[i]] -= 1.0
        new = np.where(count[:, None] > 0, sums * (1.0 / np.maximum(count, 1.0))[:, None], sums).astype(np.float32)
        shift = ((new - centers) ** 2).sum()
        centers = new
        if np.array_equal(labels, labels_old):
            strict = True
            break
        if shift <= tol:
            break
        labels_old = labels
    return labels if strict else assign(centers)


@dataclasses.dataclass
class AdaMSSConfig(AdapterConfig):
    rank: int = 100  # r: the SVD's rank R before clipping to min(out, in + 1)
    num_subspaces: int = 5  # K
    subspace_rank: int = 1  # r_k's upper bound
    init_weights: str | None = "orthogonal"  # "orthogonal": B = 0 (the base); None: B ~ N(0, 0.01^2)
    use_asa: bool = False  # PEFT's adaptive subspace allocation (a training callback): refused here
    asa_target_subspaces: int = 50  # ASA's fields, kept for the file
    init_warmup: int = 50
    final_warmup: int = 1000
    mask_interval: int = 100
    asa_importance_beta: float = 0.85
    asa_uncertainty_beta: float = 0.85
    asa_schedule_exponent: float = 3.0
    use_dynamic_rank: bool = False  # r_k also bounded by the singular values of U[S_k] above svd_threshold
    svd_threshold: float = 0.1
    random_seed: int = 0  # torch's seed of the decomposition's random projection

    peft_type = "ADAMSS"
    PEFT_FIELDS = {"rank": "r", **{f: f for f in ("num_subspaces", "subspace_rank", "init_weights", "use_asa",
                   "asa_target_subspaces", "init_warmup", "final_warmup", "mask_interval", "asa_importance_beta",
                   "asa_uncertainty_beta", "asa_schedule_exponent", "use_dynamic_rank", "svd_threshold",
                   "random_seed")}}
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save")

    def validate(self):
        for field in ("rank", "num_subspaces", "subspace_rank"):
            v = getattr(self, field)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, field, v, "must be a positive integer")
        if self.init_weights is False:
            self.init_weights = None  # PEFT's spelling of no init
        check(self.init_weights in ("orthogonal", None), "init_weights", self.init_weights,
              "must be 'orthogonal' (B = 0) or None (B random)")
        check(not self.use_asa, "use_asa", self.use_asa, "minipeft does not run PEFT's ASA callback (subspace "
              "pruning during training); train with use_asa=False")
        check(isinstance(self.svd_threshold, (int, float)) and 0.0 < self.svd_threshold <= 1.0, "svd_threshold",
              self.svd_threshold, "must be in (0, 1]: a share of the largest singular value")

    def trainable_count(self, layers: dict, mc) -> int:
        """ADAMSS-6 when no cluster has fewer than subspace_rank rows (r_k = subspace_rank) and use_dynamic_rank is
        off: s (K' R + m) per layer, K' = min(K, m); otherwise an upper bound (the clusters decide)."""
        s = self.subspace_rank
        return sum(s * (min(self.num_subspaces, m) * min(self.rank, m, n + 1) + m) for n, m in layers.values())


class Subspaces(Module):
    """The per-subspace factors under keys "0", "1", ... (PEFT's ParameterList)."""

    def __init__(self, arrays):
        for k, a in enumerate(arrays):
            setattr(self, str(k), trainable(a))

    def __iter__(self):
        return (v for v in vars(self).values() if isinstance(v, Tensor))


class AdaMSSLinear(Delta):
    def __init__(self, newB, A, B, order, has_bias: bool):
        self.frozen = (Tensor(newB),)  # newB (R, n + 1): in a tuple, off the module walk, so that it never trains
        self.adamss_A = Subspaces(A)  # K' x (r_k, R)
        self.adamss_B = Subspaces(B)  # K' x (|S_k|, r_k)
        self.where = np.argsort(order)  # row i of the output is row where[i] of the stacked subspaces
        self.has_bias = has_bias

    @classmethod
    def create(cls, base, cfg: AdaMSSConfig, path: str, rng, init_weights: bool = True):
        check_peft_linear(base, path, "ADAMSS", "AdaMSS")
        W = backend.to_host(base.weight.data).astype(np.float64)  # (m, n)
        if base.bias is not None:
            W = np.concatenate([W, backend.to_host(base.bias.data).astype(np.float64)[:, None]], axis=1)
        m, R = W.shape[0], min(cfg.rank, *W.shape)
        check(R < m, f"rank (for {path})", cfg.rank, f"R = min(r, out, in + 1) = {R} reaches the layer's {m} outputs: "
              f"U's rows are then orthonormal, all equally far apart, and the clustering (PEFT's too) is decided by "
              f"rounding; use r < {m}")
        check(cfg.subspace_rank <= R, f"subspace_rank (for {path})", cfg.subspace_rank,
              f"exceeds R = {R}, the rank of the subspaces' common basis (PEFT's forward fails there); use at most {R}")
        U, V = svd_lowrank(W, R, cfg.random_seed)  # ADAMSS-1
        labels = kmeans_labels(U.astype(np.float32), min(cfg.num_subspaces, m))  # ADAMSS-2
        K = min(cfg.num_subspaces, m)
        segments = [np.flatnonzero(labels == k) for k in range(K)]
        if any(s.size == 0 for s in segments):
            raise ConfigError(f"num_subspaces={cfg.num_subspaces} leaves an empty cluster of {path}'s output rows "
                              f"(PEFT fails there too); use fewer subspaces")
        A, B = [], []
        for s in segments:
            _, sv, Vh = np.linalg.svd(U[s], full_matrices=False)  # ADAMSS-4: U[S_k]'s right singular vectors
            r_k = min(s.size, cfg.subspace_rank)
            if cfg.use_dynamic_rank:
                r_k = max(1, min(r_k, int(np.sum(sv ** 2 > cfg.svd_threshold * sv[0] ** 2))))
            A.append(Vh[:r_k].astype(np.float32))
            B.append(np.zeros((s.size, r_k), np.float32) if cfg.init_weights == "orthogonal" or not init_weights
                     else backend.to_host(rng.normal((s.size, r_k), std=0.01)).astype(np.float32))
        on = lambda arrays: [backend.asarray(a, "float32") for a in arrays]  # noqa: E731
        return cls(on([V.T])[0], on(A), on(B), np.concatenate(segments), base.bias is not None)

    def saved_parameters(self):
        """ADAMSS-7: the factors, and the frozen newB."""
        return list(self.named_parameters()) + [("adamss_newB", self.newB)]

    @property
    def newB(self):
        return self.frozen[0]

    def stacked(self):
        """P [B_k A_k]_k (m, R): the subspaces' rows put back in output order."""
        rows = concat([B @ A for A, B in zip(self.adamss_A, self.adamss_B)], axis=0)  # (m, R), scatter order
        return take_rows(rows, self.where.tolist())

    def adapt(self, x, y, base):  # ADAMSS-3
        xp = backend.xp_of(x.data)
        xb = concat([x, Tensor(xp.ones(x.shape[:-1] + (1,), dtype=x.data.dtype))], axis=x.ndim - 1) \
            if self.has_bias else x  # (.., n + 1)
        return y + F.linear(F.linear(xb, self.newB), self.stacked())

    def delta_weight(self):  # ADAMSS-5: [dW | db] (m, n + 1)
        return (self.stacked() @ self.newB).data

    def merge_into(self, base):
        full = self.delta_weight()
        base.weight.data = base.weight.data + full[:, :base.in_features]
        if self.has_bias:
            base.bias.data = base.bias.data + full[:, base.in_features]

    def unmerge_from(self, base):
        full = self.delta_weight()
        base.weight.data = base.weight.data - full[:, :base.in_features]
        if self.has_bias:
            base.bias.data = base.bias.data - full[:, base.in_features]


register("adamss", AdaMSSConfig, AdaMSSLinear,
         paper="AdaMSS: Adaptive Multi-Subspace Approach for Parameter-Efficient Fine-Tuning, NeurIPS 2025 "
               "(openreview 8ZdWmpYxT0)",
         summary="AdaMSS, dW = P [B_k A_k]_k V_R^T: W0's top-R SVD, its output rows clustered into K subspaces, a "
                 "low-rank B_k A_k trained in each (spec/adamss.md).")
