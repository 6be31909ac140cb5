"""DEFT: Decompositional Efficient Fine-Tuning for Text-to-Image Models (Kumar, Anwer, Khan, Khan, Laptev, Cholakkal,
NeurIPS 2025, arXiv:2509.22793), as PEFT 0.21.2's DEFT tuner; spec/deft.md.

Symbols: W0 (out, in) = (m, n) frozen base weight, b its bias, x (..., n); r' = min(r, m) the rank (PEFT caps r at
    the layer's outputs); P (m, r') the projection direction (PEFT's deft_P), R (r', n) the injection (deft_R);
    s = alpha / r' where alpha is set (and not 0), else 1.
Projector (DEFT-1): "relu" (default): Q_P = P, right = relu(P), P_proj = P relu(P)^T (not orthogonal); "qr":
    Q_P = qr(P) (reduced, LAPACK's Householder signs), right = Q_P, P_proj = Q_P Q_P^T (orthogonal).
Update (DEFT-2): W' = (I - P_proj) W0 + s Q_P R, so dW = Q_P (s R - M) with M = right^T W0 (r', n): rank <= r'.
    para=True (PaRa): no R, dW = -P_proj W0 = -Q_P M.
Forward (DEFT-3): h = W0 x + b + Q_P (s R dropout(x) - M x): the removal term sees x itself, the injection the
    dropped-out x (PEFT's order: its removal term is (W0 x) right Q_P^T, the same numbers re-associated).
Init (DEFT-4): P ~ N(0, 0.02^2); init_weights=True: R = M / s, so dW = 0 and h = W0 x + b at step 0;
    "random" (init_weights=False): R ~ N(0, (0.02 init_scale)^2). para has no R and moves the output at init.
Merge (DEFT-5): W <- W0 + dW (dW^T into GPT-2's Conv1D), keeping M (r', n) from the W0 it was merged into; unmerge
    subtracts Q_P (s R - M) with that M, which gives W0 back even though I - P_proj is not invertible (PEFT's cache).
Trainable (DEFT-6): r' (m + n) per layer (para: r' m); bias "none" | "all" | "deft_only".
Serialization (DEFT-7): peft_type "DEFT", keys <layer>.deft_P (m, r'), <layer>.deft_R (r', n) (none with para);
    fields r, decomposition_method, init_scale, alpha, para, deft_dropout, init_weights, bias, fan_in_fan_out.
PEFT parity: peft/tuners/deft/layer.py DeftLayer.update_layer, reset_deft_parameters, DeftLinear._project,
    forward, merge, unmerge.
Targets: float Linear layers and GPT-2's Conv1D (as PEFT); a 4-bit base is a ConfigError.
Deviations: the paper writes P_proj = P P^T; PEFT's default "relu" uses P relu(P)^T, and minipeft follows PEFT.
    Two DEFT adapters merged into one layer: each takes M from the weight as it stands when it is merged (PEFT: the
    weight before the first merge).
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd import functional as F
from ..autograd.function import Function, no_grad
from ..autograd.tensor import Tensor
from ..nn.layers import Linear
from .base import AdapterConfig, Delta, check, orient, trainable
from .registry import register

INITS = ("default", "random")
METHODS = ("relu", "qr")
STD = 0.02  # PEFT's std of P, and of R under init_weights=False (times init_scale) (DEFT-4)


@dataclasses.dataclass
class DEFTConfig(AdapterConfig):
    rank: int = 8  # PEFT's default r
    decomposition_method: str = "relu"  # one of METHODS (DEFT-1)
    alpha: float | None = None  # s = alpha / r' (None or 0: s = 1, as PEFT)
    init_scale: float = 1.0  # R's std is 0.02 init_scale under init="random"
    para: bool = False  # PaRa: removal only, no R
    dropout: float = 0.0
    init: str = "default"  # one of INITS (DEFT-4)
    fan_in_fan_out: bool = False  # accepted for PEFT's sake: each layer's own storage decides (PEFT resets it too)
    bias: str = "none"  # "none" | "all" | "deft_only"

    peft_type = "DEFT"
    PEFT_FIELDS = {"rank": "r", "decomposition_method": "decomposition_method", "alpha": "alpha",
                   "init_scale": "init_scale", "para": "para", "dropout": "deft_dropout", "init": "init_weights",
                   "bias": "bias"}
    PEFT_VALUES = {"init": {"default": True, "random": False}}

    def validate(self):
        check(self.rank > 0, "rank", self.rank, "must be a positive integer")
        check(self.decomposition_method in METHODS, "decomposition_method", self.decomposition_method,
              f"use one of {', '.join(METHODS)} (relu: P relu(P)^T; qr: Q Q^T with Q = qr(P))")
        check(self.init_scale >= 0 or self.init == "default", "init_scale", self.init_scale,
              "must be >= 0 under init='random' (the std of R is 0.02 init_scale)")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(self.init in INITS, "init", self.init, f"use one of {', '.join(INITS)} (PEFT: True, False)")
        check(self.bias in ("none", "all", "deft_only"), "bias", self.bias, "use 'none', 'all' or 'deft_only'")

    def scaling(self, r: int) -> float:  # DEFT-2's s, of the capped rank r'
        return self.alpha / r if self.alpha else 1.0

    def trainable_count(self, layers: dict, mc) -> int:
        """DEFT-6: r' (m + n) per layer, r' = min(r, m) (para: r' m)."""
        return sum(min(self.rank, m) * (m + (0 if self.para else n)) for n, m in layers.values())


class QR(Function):
    """Q of the reduced QR of a (m, r) matrix, m >= r (LAPACK's Householder signs, as torch and CuPy take them).
    Backward with gR = 0: gA = (gQ + Q sym(-gQ^T Q)) R^-T, sym(M) = the symmetric matrix of M's lower triangle."""

    def forward(self, A):
        xp = backend.xp_of(A)
        Q, R = xp.linalg.qr(A)
        self.save_for_backward(Q, R)
        return Q

    def backward(self, g):
        Q, R = self.saved
        xp = backend.xp_of(g)
        M = -xp.matmul(xp.matrix_transpose(g), Q)  # (r, r)
        i = xp.arange(M.shape[0])
        below = xp.astype(i[:, None] > i[None, :], M.dtype)  # strict lower triangle
        M = M * below + xp.matrix_transpose(M * below) + M * xp.eye(M.shape[0], dtype=M.dtype)
        X = g + xp.matmul(Q, M)  # (m, r)
        return (xp.matrix_transpose(xp.linalg.solve(R, xp.matrix_transpose(X))),)  # X R^-T


class DEFTLinear(Delta):
    MIXED_BATCH = True

    def __init__(self, P, R, method: str, scaling: float, dropout: float, rng):
        self.method, self.s, self.p, self.rng = method, scaling, dropout, rng
        self.deft_P = trainable(P)  # (m, r')
        if R is not None:
            self.deft_R = trainable(R)  # (r', n)
        self.M = None  # right^T W0 (r', n), kept while merged (DEFT-5)

    @classmethod
    def create(cls, base, cfg: DEFTConfig, path: str, rng, init_weights: bool = True):
        check(isinstance(base, Linear), f"target_modules (for {path})", type(base).__name__,
              "DEFT projects W0 and needs a float Linear (or GPT-2 Conv1D) base; load the model unquantized")
        n, m = base.in_features, base.out_features
        r = min(cfg.rank, m)  # PEFT caps r at the outputs (qr gives at most m orthonormal columns)
        xp = backend.xp_of(base.weight.data)
        f32 = backend.dtype("float32", xp)
        P, R = xp.zeros((m, r), dtype=f32), None if cfg.para else xp.zeros((r, n), dtype=f32)
        d = cls(P, R, cfg.decomposition_method, cfg.scaling(r), cfg.dropout, rng)
        if init_weights:  # DEFT-4; a load fills P and R from the file
            d.deft_P.data = rng.normal((m, r), std=STD)
            if not cfg.para:  # "default": R = M / s makes dW = 0
                d.deft_R.data = d.removal(base) / d.s if cfg.init == "default" else \
                    rng.normal((r, n), std=STD * cfg.init_scale)
        return d

    def project(self, P):  # DEFT-1: (Q_P, right), Tensors (m, r')
        if self.method == "qr":
            Q = QR.apply(P)
            return Q, Q
        return P, P * Tensor(backend.xp_of(P.data).astype(P.data > 0, P.data.dtype))  # relu(P), grad 0 at 0

    def factors(self, base):  # (Q_P, M = right^T W0 (r', n)) as Tensors (DEFT-2)
        Q, right = self.project(self.deft_P)
        return Q, right.T @ Tensor(base.weight_out_in())

    def adapt(self, x, y, base):  # DEFT-3
        Q, M = self.factors(base)
        u = -F.linear(x, M)  # (..., r')
        if hasattr(self, "deft_R"):
            u = u + F.linear(F.dropout(x, self.p, self.rng, self.training), self.deft_R * self.s)
        return y + F.linear(u, Q)

    def removal(self, base):  # M (r', n) as an array
        with no_grad():
            return self.factors(base)[1].data

    def delta_from(self, M):  # DEFT-2: dW = Q_P (s R - M), (m, n)
        with no_grad():
            Q = self.project(self.deft_P)[0].data
            inner = (self.deft_R.data * self.s - M) if hasattr(self, "deft_R") else -M
            return backend.xp_of(Q).matmul(Q, inner)

    def delta_weight_of(self, base):
        return self.delta_from(self.removal(base))

    def merge_into(self, base):  # DEFT-5
        self.M = self.removal(base)
        base.weight.data = base.weight.data + orient(self.delta_from(self.M), base)

    def unmerge_from(self, base):
        M, self.M = (self.M if self.M is not None else self.removal(base)), None
        base.weight.data = base.weight.data - orient(self.delta_from(M), base)


register("deft", DEFTConfig, DEFTLinear,
         paper="DEFT: Decompositional Efficient Fine-Tuning for Text-to-Image Models, Kumar, Anwer, Khan, Khan, "
               "Laptev, Cholakkal, NeurIPS 2025, arXiv:2509.22793",
         summary="DEFT, W' = (I - P_proj) W0 + s Q_P R: a rank-r subspace of W0 removed (P_proj = P relu(P)^T or "
                 "Q Q^T) and new content injected into it; P (out, r), R (r, in) trained (spec/deft.md).")
