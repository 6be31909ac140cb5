"""PSOFT: Efficient Orthogonal Fine-Tuning with Principal Subspace Adaptation (Wu, Hu, Min, Wang, ICLR 2026,
arXiv:2505.11235, OpenReview FSHrinMArK), as PEFT 0.21.2's PSOFT tuner; spec/psoft.md.

Symbols: W0 (out, in) frozen base weight, b its bias, x (..., in); W0 = U S V^T its SVD (S descending), r the rank,
    s = psoft_alpha / r; A (r, in), B (out, r) frozen; q (r(r-1)/2,) the trained vector (PEFT's psoft_R.weight),
    Q = skew(q) (r, r) (q fills the strict upper triangle row by row, Q = U - U^T, OFT's skew_map);
    a, b_ (r,) the trained diagonal vectors (psoft_R.vector_a / vector_b).
Subspace (PSOFT-1): U_r, S_r, V_r^T the top r of W0's SVD, each pair's sign fixed so that the largest-|.| entry
    of U_r's column is positive; "psoft_init": A = V_r^T, B = U_r diag(S_r / s); "pissa_init": A = diag(sqrt(S_r / s))
    V_r^T, B = U_r diag(sqrt(S_r / s)). A and B are recomputed from W0 whenever the adapter is built (PEFT's
    non-persistent buffers: the file has neither).
Rotation (PSOFT-2): C = (I + Q)(I - Q)^-1 exact (OFT's cayley of -Q); with use_cayley_neumann the series
    I + 2Q + 2Q^2 + ... + Q^(t-1) (OFT's cayley of Q, t terms), Q first scaled by eps / (||Q||_F + 1e-12) where
    ||Q||_F > eps = cayley_neumann_eps (when set; inside the graph, as PEFT's). psoft_orth = False: C = the
    weight (r, r) itself. R = diag(b_) C diag(a) (a, b_ = 1 where psoft_mag_a / psoft_mag_b are off).
Update (PSOFT-3): dW = s B (R - I) A. Forward: h = W0 x + b + s B (R - I) A dropout(x).
Init (PSOFT-4): "default" (init_weights=True): q = 0 (C = I; free C = I), a = b_ = 1, so R = I and dW = 0;
    "random": q ~ N(0, 0.1^2) (free C = I + N(0, 0.1^2)), a = b_ = 1.
Merge (PSOFT-5): W <- W0 + dW, unmerge W <- W - dW.
Trainable (PSOFT-6): r(r-1)/2 (r^2 with psoft_orth = False) + r per vector, per layer; r <= min(in, out).
Serialization (PSOFT-7): peft_type "PSOFT", keys <layer>.psoft_R.weight, .psoft_R.vector_a, .psoft_R.vector_b.
Targets: float Linear layers; GPT-2's Conv1D and a 4-bit base are ConfigErrors (PEFT's dispatch takes nn.Linear only).
Deviations: PEFT takes the SVD's signs from its LAPACK build (MKL's on CPU torch, cuSOLVER's on GPU), which the
    file does not record, so a PEFT file's dW is only defined up to those signs; minipeft fixes them (PSOFT-1) so
    that its own files mean one thing on every backend. psoft_svd = "lowrank" (torch.svd_lowrank under torch's
    seeded RNG) is a ConfigError.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd import functional as F
from ..autograd.function import no_grad
from ..autograd.tensor import Tensor
from ..nn.module import Module
from .base import COMMON_FIELDS, AdapterConfig, Delta, check, check_peft_linear, trainable
from .oft import cayley, skew_map
from .registry import register

INITS = ("default", "random")
AB_INITS = ("psoft_init", "pissa_init")


@dataclasses.dataclass
class PSOFTConfig(AdapterConfig):
    rank: int = 32  # PEFT's default r
    psoft_alpha: float = 32
    psoft_dropout: float = 0.0
    ab_svd_init: str = "psoft_init"  # one of AB_INITS (PSOFT-1)
    psoft_svd: str = "full"
    psoft_svd_lowrank_niter: int = 10  # kept for the file; only "full" is built
    random_seed: int = 0
    psoft_orth: bool = True
    psoft_mag_a: bool = True
    psoft_mag_b: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    cayley_neumann_eps: float | None = None
    init: str = "default"  # one of INITS (PSOFT-4)
    fan_in_fan_out: bool = False

    peft_type = "PSOFT"
    PEFT_FIELDS = {"rank": "r", "psoft_alpha": "psoft_alpha", "psoft_dropout": "psoft_dropout",
                   "ab_svd_init": "ab_svd_init", "psoft_svd": "psoft_svd",
                   "psoft_svd_lowrank_niter": "psoft_svd_lowrank_niter", "random_seed": "random_seed",
                   "psoft_orth": "psoft_orth", "psoft_mag_a": "psoft_mag_a", "psoft_mag_b": "psoft_mag_b",
                   "use_cayley_neumann": "use_cayley_neumann", "num_cayley_neumann_terms": "num_cayley_neumann_terms",
                   "cayley_neumann_eps": "cayley_neumann_eps", "init": "init_weights"}
    PEFT_VALUES = {"init": {"default": True, "random": False}}
    PEFT_COMMON = COMMON_FIELDS + ("fan_in_fan_out",)

    def validate(self):
        check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0, "rank", self.rank,
              "must be a positive integer")
        check(isinstance(self.psoft_alpha, (int, float)) and self.psoft_alpha > 0, "psoft_alpha", self.psoft_alpha,
              "must be a number > 0 (s = psoft_alpha / r divides S_r in B)")
        check(0.0 <= self.psoft_dropout < 1.0, "psoft_dropout", self.psoft_dropout, "must be in [0, 1)")
        check(self.ab_svd_init in AB_INITS, "ab_svd_init", self.ab_svd_init, f"use one of {', '.join(AB_INITS)}")
        check(self.psoft_svd == "full", "psoft_svd", self.psoft_svd,
              "only 'full' is built: PEFT's 'lowrank' is torch.svd_lowrank under torch's seeded RNG, which minipeft "
              "cannot reproduce; use 'full'")
        check(self.init in INITS, "init", self.init, f"use one of {', '.join(INITS)}")
        check(isinstance(self.num_cayley_neumann_terms, int) and self.num_cayley_neumann_terms > 0,
              "num_cayley_neumann_terms", self.num_cayley_neumann_terms, "must be a positive integer")
        eps = self.cayley_neumann_eps
        check(eps is None or (isinstance(eps, (int, float)) and 0.0 < eps < 1.0), "cayley_neumann_eps", eps,
              "must be None or in (0, 1)")

    def trainable_count(self, layers: dict, mc) -> int:
        """PSOFT-6: r(r-1)/2 (or r^2) + r per diagonal vector, per layer."""
        r = self.rank
        per = (r * (r - 1) // 2 if self.psoft_orth else r * r) + r * (self.psoft_mag_a + self.psoft_mag_b)
        return per * len(layers)


def fixed_signs(U, Vh):
    """PSOFT-1: (U D, D Vh), D = diag(±1) making the largest-|.| entry of each column of U (the first on a tie)
    positive; the same for every sign flip of the pairs."""
    xp = backend.xp_of(U)
    top = xp.argmax(xp.abs(U), axis=0)  # (k,)
    sign = 1.0 - 2.0 * xp.astype(xp.take_along_axis(U, top[None, :], axis=0)[0, :] < 0, U.dtype)  # (k,) of ±1
    return U * sign, Vh * sign[:, None]


def principal_subspace(W, r: int, s: float, ab_svd_init: str):
    """PSOFT-1: (A (r, in), B (out, r)) from the top r of W's SVD, signs fixed (largest-|.| of U's column > 0)."""
    xp = backend.xp_of(W)
    U, S, Vh = xp.linalg.svd(W, full_matrices=False)  # (out, k), (k,), (k, in)
    U, Vh = fixed_signs(U[:, :r], Vh[:r, :])
    S = S[:r] / s
    if ab_svd_init == "psoft_init":
        return xp.asarray(Vh, copy=True), U * S
    root = xp.sqrt(S)
    return root[:, None] * Vh, U * root


class PSOFTRotation(Module):
    """psoft_R: weight (r(r-1)/2,) or (r, r), vector_a, vector_b (r,) each where enabled (PSOFT-7)."""

    def __init__(self, r: int, cfg: PSOFTConfig, rng, init_weights: bool):
        xp, f32 = backend.xp(), backend.dtype("float32")
        if cfg.psoft_orth:
            shape, start = (r * (r - 1) // 2,), xp.zeros((r * (r - 1) // 2,), dtype=f32)
        else:
            shape, start = (r, r), xp.eye(r, dtype=f32)
        if init_weights and cfg.init == "random":  # PSOFT-4
            start = start + rng.normal(shape, std=0.1)
        self.weight = trainable(start)
        if cfg.psoft_mag_a:
            self.vector_a = trainable(xp.ones((r,), dtype=f32))
        if cfg.psoft_mag_b:
            self.vector_b = trainable(xp.ones((r,), dtype=f32))


class PSOFTLinear(Delta):
    MIXED_BATCH = True  # y + s B (R - I) A x of the rows alone (METHOD-6)

    def __init__(self, A, B, r: int, cfg: PSOFTConfig, rng, init_weights: bool):
        self.r, self.s, self.cfg, self.rng = r, cfg.psoft_alpha / r, cfg, rng
        self.AB = (Tensor(A), Tensor(B))  # (r, in), (out, r) frozen; a tuple: not saved, not trained (PSOFT-1)
        self.psoft_R = PSOFTRotation(r, cfg, rng, init_weights)
        self.S = skew_map(r) if cfg.psoft_orth else None

    @classmethod
    def create(cls, base, cfg: PSOFTConfig, path: str, rng, init_weights: bool = True):
        check_peft_linear(base, path, "PSOFT", "PSOFT (an SVD of W0)")
        r, n, m = cfg.rank, base.in_features, base.out_features
        check(r <= min(n, m), f"rank (for {path})", r, f"must be <= min(in={n}, out={m})")
        xp = backend.xp_of(base.weight.data)
        W = xp.astype(base.weight_out_in(), backend.dtype("float32", xp))
        A, B = principal_subspace(W, r, cfg.psoft_alpha / r, cfg.ab_svd_init)  # built on a load too (PSOFT-1)
        return cls(A, B, r, cfg, rng, init_weights)

    def rotation(self):  # PSOFT-2: R (r, r)
        cfg, R = self.cfg, self.psoft_R
        if cfg.psoft_orth:
            Q = (R.weight.reshape(1, R.weight.shape[0]) @ Tensor(self.S)).reshape(1, self.r, self.r)
            if not cfg.use_cayley_neumann:
                C = cayley(Q * -1.0, exact=True, terms=0)  # (I + Q)(I - Q)^-1; the series' terms unused
            else:
                eps = cfg.cayley_neumann_eps
                if eps is not None:
                    norm = float(backend.xp_of(Q.data).sqrt(backend.xp_of(Q.data).sum(Q.data * Q.data)))
                    if norm > eps:
                        Q = Q * (eps / ((Q * Q).sum().sqrt() + 1e-12))
                C = cayley(Q, exact=False, terms=cfg.num_cayley_neumann_terms)
            C = C.reshape(self.r, self.r)
        else:
            C = R.weight
        if cfg.psoft_mag_b:
            C = R.vector_b.reshape(self.r, 1) * C
        if cfg.psoft_mag_a:
            C = C * R.vector_a.reshape(1, self.r)
        return C

    def adapt(self, x, y, base):  # PSOFT-3
        A, B = self.AB
        h = F.linear(F.dropout(x, self.cfg.psoft_dropout, self.rng, self.training), A)
        return y + F.linear(F.linear(h, self.rotation()) - h, B) * self.s

    def delta_weight(self):  # PSOFT-3: s B (R - I) A, (out, in)
        with no_grad():
            A, B = self.AB
            xp = backend.xp_of(A.data)
            M = self.rotation().data - xp.eye(self.r, dtype=A.data.dtype)
            return xp.matmul(B.data, xp.matmul(M, A.data)) * self.s


register("psoft", PSOFTConfig, PSOFTLinear,
         paper="Efficient Orthogonal Fine-Tuning with Principal Subspace Adaptation, Wu, Hu, Min, Wang 2026, "
               "arXiv:2505.11235",
         summary="PSOFT, dW = s B (R - I) A with A, B frozen from W0's top-r SVD and R = diag(b) Cayley(Q) diag(a) "
                 "(r, r) trained (spec/psoft.md).")
