"""FRoD: Full-Rank Efficient Fine-Tuning with Rotational Degrees for Fast Convergence (Wan, Chen, Feng, Zhou, Xu,
AAAI 2026, doi 10.1609/aaai.v40i31.39813, arXiv:2512.23485), as PEFT 0.21.2's FROD tuner; spec/frod.md.

Symbols: W0 (out, in) = (m, n) frozen base weight, b its bias, x (..., n); c(path) the layer's category; V (n, n) the category's basis, U (m, n) the layer's frozen left factor; lambda (n,) and the
    sparse values v (N,) at off-diagonal positions P (2, N) trained (PEFT's frod_lambda_l, frod_lambda_s_values);
    S = scatter(v at P) (n, n).
Category (FROD-1): c = the path's last two parts joined by "_" (the last alone after a number); layers of one
    category are ordered by the number after "layers" (else the path's first number).
Basis (FROD-2): the category's weights stacked as X (k m, n), in layer order: if k m < n, V = the right singular vectors
    of X (full, n x n); else X = Q R, T = mean_i inv(Q_i^T Q_i + alpha I), V = R^T E with E T's eigenvectors.
    Each column of V is signed so that its largest-|.| entry is positive.
Factors (FROD-3): B = W0 V^-T, lambda_0 = column norms of B, U = B / lambda_0 (zero columns stay 0): W0 = U diag(lambda_0) V^T.
Positions (FROD-4): per category in sorted name order, one torch generator seeded with projection_prng_key:
    N = min(int(n^2 sparse_rate), n^2 - n) (at least 1 if sparse_rate > 0), P = the first N of
    torch.randperm(n^2 - n) over the row-major off-diagonal pairs (i, j), i != j.
Adapted weight (FROD-5): W' = U (S + diag(lambda)) V^T; dW = W' - W0.
Forward (FROD-6): h = W0 x + b + dW dropout(x).
Init (FROD-7): lambda = lambda_0, v = 0, so W' = W0 (to rounding); init_weights=False: v ~ N(0, 0.1^2),
    lambda = lambda_0 + N(0, 0.1^2).
Merge (FROD-8): W <- W0 + dW; unmerge puts back the W0 kept at merge time.
Trainable (FROD-9): lambda and v: n + N per layer.
Serialization (FROD-10): peft_type "FROD"; keys <layer>.frod_lambda_l (n,), <layer>.frod_lambda_s_values (N,), and
    base_model.frod_V.<c> (n, n), base_model.frod_s_indices.<c> (2, N) int64, base_model.frod_s_size.<c> (2,) int64;
    U is not saved: rebuilt from W0 and the file's V on load (PEFT keeps the U of the V it built itself).
PEFT parity: peft/tuners/frod/model.py _category_from_key, _layer_index_from_key, _projection_from_weights,
    _init_frod_projections; layer.py _calculate_frod_u_and_lambda, Linear.forward, get_delta_weight.
Deviations: save_projection=False is refused: V's signs and eigenvectors are not pinned down by W0 (LAPACK builds
    differ), so a file without V would not give PEFT's adapter. runtime_offload_base_weight and progressbar are kept
    for PEFT and change nothing here.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend
from ..autograd import concat
from ..autograd import functional as F
from ..autograd.function import no_grad
from ..autograd.tensor import Tensor
from ..errors import CheckpointError
from .base import AdapterConfig, Delta, check, trainable
from .hira import HiRALinear
from .psoft import fixed_signs
from .registry import register
from .shira import EntriesToWeight


@dataclasses.dataclass
class FRoDConfig(AdapterConfig):
    sparse_rate: float = 0.01  # share of the n^2 entries of S trained (off the diagonal)
    regularization_alpha: float = 1e-3  # alpha of FROD-2's ridge term
    projection_prng_key: int = 0  # the seed of the sparse positions (FROD-4)
    save_projection: bool = True  # V, P and S's size in the file (False refused, FROD-10)
    dropout: float = 0.0
    init_weights: bool = True  # True: v = 0, lambda = lambda_0 (W' = W0); False: both moved by N(0, 0.1^2)
    fan_in_fan_out: bool = False  # accepted for PEFT's sake: each layer's own storage decides
    bias: str = "none"  # "none" | "all" | "frod_only"
    progressbar: bool = True  # PEFT's; nothing to show here
    runtime_offload_base_weight: bool = False  # PEFT's device-memory option; no effect on the math

    peft_type = "FROD"
    PEFT_FIELDS = {"sparse_rate": "sparse_rate", "regularization_alpha": "regularization_alpha",
                   "projection_prng_key": "projection_prng_key", "save_projection": "save_projection",
                   "dropout": "frod_dropout", "init_weights": "init_weights", "fan_in_fan_out": "fan_in_fan_out",
                   "bias": "bias", "progressbar": "progressbar",
                   "runtime_offload_base_weight": "runtime_offload_base_weight"}
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "fan_in_fan_out")

    def validate(self):
        num = (int, float)
        check(isinstance(self.sparse_rate, num) and 0.0 <= self.sparse_rate <= 1.0, "sparse_rate", self.sparse_rate,
              "must be in [0, 1] (the share of S's n^2 entries trained)")
        check(isinstance(self.regularization_alpha, num) and self.regularization_alpha > 0, "regularization_alpha",
              self.regularization_alpha, "must be > 0 (the ridge term that keeps FROD-2's inverse stable)")
        check(isinstance(self.projection_prng_key, int) and self.projection_prng_key >= 0, "projection_prng_key",
              self.projection_prng_key, "must be a non-negative integer seed")
        check(self.save_projection is True, "save_projection", self.save_projection,
              "False is not supported: without V in the file the basis would be retaken from W0, and its signs and "
              "eigenvectors depend on the LAPACK build (FROD-10); keep True")
        check(isinstance(self.dropout, num) and 0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "must be True or False")
        check(self.bias in ("none", "all", "frod_only"), "bias", self.bias, "use 'none', 'all' or 'frod_only'")

    def entries(self, n: int) -> int:
        """FROD-4's N for a category of input width n."""
        N = min(int(n * n * self.sparse_rate), n * n - n)
        return max(1, N) if self.sparse_rate > 0 and n > 1 else N

    def trainable_count(self, layers: dict, mc) -> int:
        """FROD-9: n + N per layer."""
        return sum(n + self.entries(n) for n, _ in layers.values())


def category(path: str) -> str:
    """FROD-1: the sharing category of a module path (PEFT's _category_from_key)."""
    parts = path.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    name = f"{parts[-2]}_{parts[-1]}"
    return "attention_output" if name == "output_dense" and len(parts) >= 3 and parts[-3] == "attention" else name


def layer_index(path: str, fallback: int) -> int:
    """FROD-1: the block index of a module path (the number after `layers`, else the first number, else fallback)."""
    parts = path.split(".")
    if "layers" in parts and parts.index("layers") + 1 < len(parts) and parts[parts.index("layers") + 1].isdigit():
        return int(parts[parts.index("layers") + 1])
    return next((int(p) for p in parts if p.isdigit()), fallback)


def basis(mats: list, alpha: float):
    """FROD-2: V (n, n) float32 from the category's weights [(m_i, n)] in layer order, columns signed."""
    xp = backend.xp_of(mats[0])
    f64 = backend.dtype("float64", xp)
    X = xp.concat([xp.astype(W, f64) for W in mats], axis=0)  # (k m, n)
    n = X.shape[1]
    if X.shape[0] < n:
        V = xp.matrix_transpose(xp.linalg.svd(X, full_matrices=True)[2])  # (n, n)
    else:
        Q, R = xp.linalg.qr(X)  # (k m, n), (n, n)
        T, start, eye = xp.zeros((n, n), dtype=f64), 0, xp.eye(n, dtype=f64)
        for W in mats:
            Qi = Q[start:start + W.shape[0], :]
            T, start = T + xp.linalg.inv(xp.matrix_transpose(Qi) @ Qi + alpha * eye), start + W.shape[0]
        V = xp.matrix_transpose(R) @ xp.linalg.eigh(T / len(mats))[1]  # (n, n)
    V = fixed_signs(V, xp.matrix_transpose(V))[0]
    return xp.astype(V, backend.dtype("float32", xp))


def factors(W0, V):
    """FROD-3: (U (m, n), lambda_0 (n,)) float32 with W0 = U diag(lambda_0) V^T, in float64."""
    xp = backend.xp_of(W0)
    f64 = backend.dtype("float64", xp)
    B = xp.matrix_transpose(xp.linalg.solve(xp.astype(V, f64), xp.matrix_transpose(xp.astype(W0, f64))))  # (m, n)
    lam = xp.linalg.vector_norm(B, axis=0)  # (n,)
    keep = lam > 1e-12
    U = xp.where(keep[None, :], B / xp.where(keep, lam, 1.0)[None, :], 0.0)
    f32 = backend.dtype("float32", xp)
    return xp.astype(U, f32), xp.astype(lam, f32)


def positions(n: int, N: int, seed: int, skip: int):
    """FROD-4: P (2, N) int64 of a category of width n; torch's one generator runs through the categories, and the
    ones before this took `skip` of its outputs (randperm(n'^2 - n') takes n'^2 - n' - 1)."""
    flat = backend.torch_randperm_prefix(n * n - n, N, seed, skip) if N else np.zeros((0,), np.int64)
    i, j = flat // (n - 1), flat % (n - 1)  # the k-th off-diagonal pair of row i, row-major
    return np.stack([i, j + (j >= i)]).astype(np.int64)


class FRoDLinear(Delta):
    def __init__(self, shared, U, lam, N: int, dropout: float, rng, base):
        self.shared, self.p, self.rng = shared, dropout, rng  # shared: (V, P, size) Tensors of the category
        self.U = (Tensor(U),)  # (m, n), frozen, not saved; a tuple: no parameter walk finds it
        self.base_ref = (base,)  # W0 for rebuilding U from a loaded V (from_file)
        self.frod_lambda_l = trainable(lam)  # (n,)
        self.frod_lambda_s_values = trainable(backend.xp_of(lam).zeros((N,), dtype=lam.dtype))  # (N,)
        self.w0 = None  # W0 as stored, kept while merged (FROD-8)

    CREATE_READS_W0 = True  # V is built from every W0 of a category (audit/layers.py gives it real weights)

    @classmethod
    def create_all(cls, bases: dict, cfg: FRoDConfig, rng, init_weights: bool = True):
        groups, order = {}, {}
        for k, (path, b) in enumerate(bases.items()):
            check(hasattr(b, "weight_out_in") and type(b).__name__ in ("Linear", "Conv1D"), f"target_modules (for {path})",
                  type(b).__name__, "FRoD needs a float Linear base (or GPT-2's Conv1D); load the model unquantized")
            groups.setdefault(category(path), {})[layer_index(path, k)] = path  # PEFT keeps the last of one index
        deltas, shared, skip = {}, {}, 0
        for c in sorted(groups):
            paths = [groups[c][i] for i in sorted(groups[c])]
            ws = [bases[p].weight_out_in() for p in paths]
            n, N = ws[0].shape[1], cfg.entries(ws[0].shape[1])
            V = Tensor(basis(ws, cfg.regularization_alpha))
            P = Tensor(backend.asarray(positions(n, N, cfg.projection_prng_key, skip), "int64"))
            skip += max(n * n - n - 1, 0) if N else 0
            size = Tensor(backend.asarray(np.array([n, n], np.int64), "int64"))
            shared.update({f"frod_V.{c}": V, f"frod_s_indices.{c}": P, f"frod_s_size.{c}": size})
            for p in (p for p in bases if category(p) == c):
                U, lam = factors(bases[p].weight_out_in(), V.data)
                d = deltas[p] = cls((V, P, size), U, lam, N, cfg.dropout, rng, bases[p])
                if init_weights and not cfg.init_weights:  # FROD-7
                    d.frod_lambda_s_values.data = rng.normal((N,), std=0.1)
                    d.frod_lambda_l.data = lam + rng.normal(lam.shape, std=0.1)
        return {p: deltas[p] for p in bases}, shared

    def from_file(self, where: str):
        """U from W0 and the file's V (FROD-10); the file's P must hold off-diagonal positions of S."""
        V, P, size = self.shared
        n = V.shape[0]
        q = backend.to_host(P.data).astype(np.int64)
        if q.shape != (2, self.frod_lambda_s_values.shape[0]) or not (np.all((0 <= q) & (q < n)) and np.all(q[0] != q[1])) \
                or [int(v) for v in backend.to_host(size.data)] != [n, n]:
            raise CheckpointError(f"{where}: frod_s_indices / frod_s_size do not describe off-diagonal entries of an "
                                  f"{n} x {n} S; was this adapter saved for another base model?")
        self.U = (Tensor(factors(self.base_ref[0].weight_out_in(), V.data)[0]),)

    def adapted(self):  # FROD-5: W' = U (S + diag(lambda)) V^T, a Tensor (m, n)
        V, P, _ = self.shared
        xp = backend.xp_of(V.data)
        n = V.shape[0]
        q = xp.astype(P.data, xp.int64)
        flat = xp.concat([q[0, :] * n + q[1, :], xp.arange(n, dtype=xp.int64) * (n + 1)])  # S's entries, then the diagonal
        M = EntriesToWeight.apply(concat([self.frod_lambda_s_values, self.frod_lambda_l]), flat=flat, shape=(n, n), s=1.0)
        return self.U[0] @ M @ Tensor(xp.matrix_transpose(V.data))

    def adapt(self, x, y, base):  # FROD-6
        h = F.dropout(x, self.p, self.rng, self.training)
        return y + F.linear(h, self.adapted() - Tensor(base.weight_out_in()))

    def delta_weight_of(self, base):
        with no_grad():
            return self.adapted().data - base.weight_out_in()

    merge_into = HiRALinear.merge_into  # FROD-8: W0 kept for an exact unmerge
    unmerge_from = HiRALinear.unmerge_from


register("frod", FRoDConfig, FRoDLinear,
         paper="FRoD: Full-Rank Efficient Fine-Tuning with Rotational Degrees for Fast Convergence, Wan, Chen, Feng, "
               "Zhou, Xu, AAAI 2026 (doi 10.1609/aaai.v40i31.39813), arXiv:2512.23485",
         summary="FRoD, W' = U (S_sparse + diag lambda) V^T with V shared per module category, lambda and S's sparse "
                 "values trained (spec/frod.md).")
