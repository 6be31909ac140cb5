"""DeLoRA: Decoupling Angles and Strength in Low-rank Adaptation (Bini, Girrbach, Akata, ICLR 2025,
arXiv:2503.18225), as PEFT 0.21.2's DELORA tuner; spec/delora.md.

Symbols: W0 (out, in) frozen base weight, b its bias, x (..., in); A (r, in), B (out, r), lambda a trained scalar;
    a_i the i-th row of A, b_i the i-th column of B; w (in,) the column norms of W0, w_k = ||W0[:, k]||_2, taken
    once when the adapter is built and saved with it; eps = 1e-4.
Norms (DELORA-2): |a_i| = max(||a_i||, eps), |b_i| = max(||b_i||, eps) (PEFT's torch.clamp(min=1e-4) of each norm
    apart, not of their product); below eps the norm is the constant eps and passes no gradient.
Update (DELORA-1): dW = (lambda / r) B diag(1 / (|a_i| |b_i|)) A diag(w): column k of the normalised product times w_k.
Bound (DELORA-3): with every norm >= eps, dW diag(w)^-1 is (lambda / r) times a sum of r outer products of unit
    vectors, so ||dW diag(w)^-1||_F <= lambda: the angles (A, B) and the strength (lambda) are decoupled.
Forward (DELORA-4): h = W0 x + b + B (s ⊙ (A (w ⊙ dropout(x)))), s_i = lambda / (r |a_i| |b_i|) (PEFT's
    order of products; module_dropout is PEFT's nn.Dropout on x, whatever its name says).
Init (DELORA-5): "default" (init_weights=True): A kaiming-uniform U(-1/sqrt(in), 1/sqrt(in)), B = 0, lambda =
    delora_lambda: dW = 0 at step 0; "random" (init_weights=False): A and B kaiming-uniform (B's bound
    1/sqrt(r)), dW != 0.
Merge (DELORA-6): W <- W0 + dW, unmerge W <- W - dW (PEFT's).
Trainable (DELORA-7): A, B, lambda: r (in + out) + 1 per layer, r and lambda per layer from rank_pattern /
    lambda_pattern (PEFT's first matching key). bias "none" | "all" | "delora_only".
Serialization (DELORA-8): peft_type "DELORA", keys <layer>.delora_A (r, in), .delora_B (out, r), .delora_lambda
    (1,), .delora_w_norm (in,) (PEFT's persistent buffer, read back from the file, not recomputed), fields r,
    delora_lambda, module_dropout, init_weights, bias, rank_pattern, lambda_pattern; no fan_in_fan_out.
Targets: Linear layers; GPT-2's Conv1D and a 4-bit base are ConfigErrors (PEFT's DeLoRA takes nn.Linear only).
Deviations: delora_lambda must be > 0 (PEFT takes any number; lambda = 0 with B = 0 gives no gradient at all).
"""
from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..autograd import functional as F
from ..autograd.function import Function, no_grad
from ..autograd.tensor import Tensor
from ..nn.layers import Conv1D, Linear
from .base import COMMON_FIELDS, AdapterConfig, Delta, check, fan_in_uniform, trainable
from .lora import _first_match
from .registry import register

INITS = ("default", "random")
EPS = 1e-4  # PEFT's clamp of each row / column norm (DELORA-2)


@dataclasses.dataclass
class DeLoRAConfig(AdapterConfig):
    rank: int = 8  # PEFT's default r
    delora_lambda: float = 15  # PEFT's default: the initial strength lambda (DELORA-5)
    module_dropout: float = 0.0
    init: str = "default"  # one of INITS (DELORA-5)
    bias: str = "none"  # "none" | "all" | "delora_only"
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    lambda_pattern: dict = dataclasses.field(default_factory=dict)

    peft_type = "DELORA"
    PEFT_FIELDS = {"rank": "r", "delora_lambda": "delora_lambda", "module_dropout": "module_dropout",
                   "init": "init_weights", "bias": "bias", "rank_pattern": "rank_pattern",
                   "lambda_pattern": "lambda_pattern"}
    PEFT_VALUES = {"init": {"default": True, "random": False}}
    PEFT_COMMON = COMMON_FIELDS  # PEFT's DeloraConfig has no fan_in_fan_out

    def validate(self):
        check(isinstance(self.rank, int) and self.rank > 0, "rank", self.rank, "must be a positive integer")
        check(self.delora_lambda > 0, "delora_lambda", self.delora_lambda,
              "must be > 0 (the initial strength of the update; at 0 with B = 0 nothing gets a gradient)")
        check(0.0 <= self.module_dropout < 1.0, "module_dropout", self.module_dropout, "must be in [0, 1)")
        check(self.init in INITS, "init", self.init, f"use one of {', '.join(INITS)}")
        check(self.bias in ("none", "all", "delora_only"), "bias", self.bias, "use 'none', 'all' or 'delora_only'")
        for k, v in self.rank_pattern.items():
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"rank_pattern[{k!r}]", v,
                  "must be a positive integer")
        for k, v in self.lambda_pattern.items():
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                  f"lambda_pattern[{k!r}]", v, "must be a number > 0")

    def rank_lambda_for(self, path: str):
        """(r, lambda) of one module: the first rank_pattern / lambda_pattern key matching `(.*\\.)?(key)$` wins
        (PEFT's get_pattern_key), else the config's own."""
        return (_first_match(self.rank_pattern, path, self.rank),
                _first_match(self.lambda_pattern, path, self.delora_lambda))

    def trainable_count(self, layers: dict, mc) -> int:
        """DELORA-7: r (in + out) + 1 per layer."""
        return sum(self.rank_lambda_for(p)[0] * (n + m) + 1 for p, (n, m) in layers.items())


class FlooredNorm(Function):
    """max(||M||_2 along `axis`, eps) (DELORA-2); backward g M / ||M|| where ||M|| >= eps, 0 below (torch's clamp)."""

    def forward(self, M, axis, eps):
        xp = backend.xp_of(M)
        n = xp.sqrt(xp.sum(M * M, axis=axis))
        self.save_for_backward(M, n)
        self.axis, self.eps = axis, eps
        return xp.where(n >= eps, n, xp.full_like(n, eps))

    def backward(self, g):
        M, n = self.saved
        xp = backend.xp_of(M)
        live = n >= self.eps
        scale = xp.where(live, g / xp.where(live, n, xp.ones_like(n)), xp.zeros_like(n))
        return (M * xp.expand_dims(scale, axis=self.axis),)


class DeLoRALinear(Delta):
    def __init__(self, A, B, lam, w_norm, dropout, rng):
        self.r, self.p, self.rng = A.shape[0], dropout, rng
        self.delora_A = trainable(A)  # (r, in)
        self.delora_B = trainable(B)  # (out, r)
        self.delora_lambda = trainable(lam)  # (1,)
        self.w_norm = (Tensor(w_norm),)  # (in,) frozen; a tuple: no parameter walk finds it (DELORA-8)

    @classmethod
    def create(cls, base, cfg: DeLoRAConfig, path: str, rng, init_weights: bool = True):
        check(isinstance(base, Linear) and not isinstance(base, Conv1D), f"target_modules (for {path})",
              type(base).__name__, "PEFT's DeLoRA adapts torch.nn.Linear only (not GPT-2's Conv1D nor a 4-bit "
              "layer), so the file could not be read there; target float Linear layers")
        (r, lam), n, m = cfg.rank_lambda_for(path), base.in_features, base.out_features
        xp = backend.xp_of(base.weight.data)
        f32 = backend.dtype("float32", xp)
        W = xp.astype(base.weight_out_in(), f32)
        w_norm = xp.sqrt(xp.sum(W * W, axis=0))  # DELORA-1: column norms of W0, (in,)
        A, B = xp.zeros((r, n), dtype=f32), xp.zeros((m, r), dtype=f32)
        if init_weights:  # a load fills A, B, lambda and w_norm from the file
            A = fan_in_uniform(rng, (r, n), n)
            if cfg.init == "random":
                B = fan_in_uniform(rng, (m, r), r)
        return cls(A, B, xp.full((1,), float(lam), dtype=f32), w_norm, cfg.module_dropout, rng)

    def saved_parameters(self):  # DELORA-8: PEFT saves the column norms beside the trained leaves
        return [("delora_A", self.delora_A), ("delora_B", self.delora_B), ("delora_lambda", self.delora_lambda),
                ("delora_w_norm", self.w_norm[0])]

    def strength(self, A, B, lam):  # DELORA-2: s_i = lambda / (r |a_i| |b_i|), (r,)
        return lam * (1.0 / self.r) / (FlooredNorm.apply(A, axis=1, eps=EPS) * FlooredNorm.apply(B, axis=0, eps=EPS))

    def adapt(self, x, y, base):  # DELORA-4
        h = F.dropout(x, self.p, self.rng, self.training) * self.w_norm[0]
        h = F.linear(h, self.delora_A) * self.strength(self.delora_A, self.delora_B, self.delora_lambda)
        return y + F.linear(h, self.delora_B)

    def delta_weight(self):  # DELORA-1: (B diag(s)) A diag(w), (out, in)
        with no_grad():
            A, B, lam = self.delora_A, self.delora_B, self.delora_lambda
            return ((B * self.strength(A, B, lam)) @ A * self.w_norm[0]).data


register("delora", DeLoRAConfig, DeLoRALinear,
         paper="DeLoRA: Decoupling Angles and Strength in Low-rank Adaptation, Bini, Girrbach, Akata 2025, "
               "arXiv:2503.18225",
         summary="DeLoRA, dW = (lambda / r) B diag(1 / (|a_i| |b_i|)) A diag(||W0 columns||): normalised rank-1 "
                 "terms with one trained strength (spec/delora.md).")
