"""LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters (Bałazy, Banaei, Aberer, Tabor
2024, arXiv:2405.17604), spec/loraxs.md.

Symbols: W0 (out, in) frozen base weight with SVD W0 = U Σ Vᵀ (singular values descending), r the rank,
s the scaling, x (..., in).
Frozen projections (LORAXS-1): B = U_r (out, r), A = Σ_r V_rᵀ (r, in), from W0's truncated SVD when the
    adapter is made (the authors' code: SVD of W0ᵀ, Σ folded into the input-side factor, top r kept).
Forward (LORAXS-2): h = W0 x + b + s B R A dropout(x), only R (r, r) trained; s = alpha / r (or
    alpha / sqrt(r) with use_rslora), as LoRA's.
Init (LORAXS-3): R = 0 by default, so h = W0 x at step 0 (R's gradient s Bᵀ g (A x)ᵀ is not zero, since
    A and B are not); init_std = σ > 0 draws R ~ N(0, σ²) instead (the authors' code: σ = 1e-5).
Merge (LORAXS-4): W <- W0 + s B R A; unmerge subtracts it.
Trainable (LORAXS-5): r² per targeted layer, whatever its in and out.
Serialization (LORAXS-6): peft_type "MINIPEFT_LORAXS" (PEFT has no LoRA-XS: it refuses the folder, and the
    type says whose it is); keys lora_A.weight (r, in), lora_B.weight (out, r), lora_R.weight (r, r). A and B
    are saved too: an SVD's signs differ between LAPACK builds, so R is only meaningful with its own A, B.
Deviations: R = 0 at init by default (the paper and code: N(0, 1e-5²)), so the model equals the base.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd import functional as F
from ..nn.layers import Linear
from .base import AdapterConfig, Delta, check
from .lora import check_rank_alpha, lora_scaling
from .registry import register


@dataclasses.dataclass
class LoRAXSConfig(AdapterConfig):
    rank: int = 8
    alpha: float = 8  # s = alpha / r = 1
    dropout: float = 0.0
    use_rslora: bool = False
    init_std: float = 0.0  # R ~ N(0, init_std²); 0: R = 0 (LORAXS-3)
    rank_pattern: dict = dataclasses.field(default_factory=dict)  # read by check_rank_alpha (LoRA's rule)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)

    peft_type = "MINIPEFT_LORAXS"
    PEFT_FIELDS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "use_rslora": "use_rslora",
                   "init_std": "init_std"}
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "exclude_modules")

    def validate(self):
        check_rank_alpha(self)
        check(not self.rank_pattern and not self.alpha_pattern, "rank_pattern", self.rank_pattern,
              "is not supported by LoRA-XS; one rank for every layer")
        check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, "dropout", self.dropout,
              "must be in [0, 1)")
        check(isinstance(self.init_std, (int, float)) and not isinstance(self.init_std, bool) and self.init_std >= 0,
              "init_std", self.init_std, "must be a number >= 0 (0: R = 0; the authors used 1e-5)")

    def trainable_count(self, layers: dict, mc) -> int:
        """LORAXS-5: r² per layer."""
        return self.rank ** 2 * len(layers)


class LoRAXSLinear(Delta):
    MIXED_BATCH = True  # y + s B R A x of the rows alone (METHOD-6)

    def __init__(self, in_features, out_features, r, s, dropout, rng):
        self.s, self.p, self.rng = s, dropout, rng
        self.lora_A = Linear(in_features, r, bias=False)  # Σ_r V_rᵀ (r, in), frozen
        self.lora_R = Linear(r, r, bias=False)  # R (r, r), trained
        self.lora_B = Linear(r, out_features, bias=False)  # U_r (out, r), frozen

    @classmethod
    def create(cls, base, cfg: LoRAXSConfig, path: str, rng, init_weights: bool = True):
        n, m, r = base.in_features, base.out_features, cfg.rank
        check(r <= min(n, m), f"rank (for {path})", r, f"must be <= min(in={n}, out={m})")
        check(isinstance(base, Linear), f"target (for {path})", type(base).__name__,
              "is a 4-bit layer; LoRA-XS takes the SVD of W0: load the model unquantized")
        delta = cls(n, m, r, lora_scaling(cfg.alpha, r, cfg.use_rslora), cfg.dropout, rng)
        if init_weights:  # a load fills A, R and B from the file (LORAXS-6)
            xp = backend.xp_of(base.weight.data)
            U, S, Vh = xp.linalg.svd(base.weight_out_in(), full_matrices=False)  # (out, k), (k,), (k, in)
            delta.lora_A.weight.data = S[:r, None] * Vh[:r, :]  # LORAXS-1
            delta.lora_B.weight.data = xp.asarray(U[:, :r], copy=True)
            delta.lora_R.weight.data = (rng.normal((r, r), std=cfg.init_std) if cfg.init_std > 0 else
                                        xp.zeros((r, r), dtype=xp.float32))  # LORAXS-3
        return delta

    def requires_grad_(self, flag: bool = True):  # LORAXS-5: only R trains
        super().requires_grad_(flag)
        self.lora_A.weight.requires_grad = self.lora_B.weight.requires_grad = False
        return self

    def adapt(self, x, y, base):  # LORAXS-2
        h = F.dropout(x, self.p, self.rng, self.training)
        return y + self.lora_B(self.lora_R(self.lora_A(h))) * self.s

    def delta_weight(self):  # LORAXS-4: s B R A, (out, in)
        xp = backend.xp_of(self.lora_R.weight.data)
        return xp.matmul(self.lora_B.weight.data, xp.matmul(self.lora_R.weight.data, self.lora_A.weight.data)) * self.s


register("loraxs", LoRAXSConfig, LoRAXSLinear, in_peft=False,
         paper="LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters, Bałazy et al. 2024, "
               "arXiv:2405.17604",
         summary="LoRA-XS, dW = s U_r R Σ_r V_rᵀ from W0's truncated SVD, only R (r, r) trained (spec/loraxs.md).")
