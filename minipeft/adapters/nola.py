"""NOLA: Compressing LoRA using Linear Combination of Random Basis (Koohpayegani, Navaneet, Nooralinejad,
Kolouri, Pirsiavash, ICLR 2024, arXiv:2310.02556), spec/nola.md.

Symbols: W0 (out, in) frozen base weight, x (..., in), r the rank, s = alpha / r, k and l the numbers of
basis matrices of A and B; alpha_c (k,) and beta_c (l,) the trained coefficients (nola_alpha, nola_beta).
Bases (NOLA-1): per layer, from backend.RNG([basis_seed, crc32(path)]): A_0 (r, in) ~ U(+-1/sqrt(in)),
    then A_1..A_k (r, in) and B_1..B_l (out, r) ~ U(+-1/sqrt(k)) and U(+-1/sqrt(l)); frozen, never saved.
Factors (NOLA-2): A = A_0 + Σ_i alpha_c[i] A_i (r, in), B = Σ_j beta_c[j] B_j (out, r).
Forward (NOLA-3): h = W0 x + b + s B A dropout(x).
Init (NOLA-4): alpha_c = 0, beta_c = 0, so B = 0, A = A_0 and h = W0 x + b; beta_c's gradient is not zero.
Merge (NOLA-5): W <- W0 + s B A; unmerge subtracts it.
Trainable (NOLA-6): k + l numbers per targeted layer, whatever r, in and out.
Serialization (NOLA-7): peft_type "MINIPEFT_NOLA"; keys <layer>.nola_alpha (k,), <layer>.nola_beta (l,);
    basis_seed in adapter_config.json. Loading regenerates the bases from it.
PEFT parity: none (PEFT has no NOLA). The authors' code (github.com/UCDvision/NOLA, gpt/src/model_nola.py
    and llama/peft/tuners/lora.py: NOLALinear, GenerateParams, LoraLayer.reset_lora_parameters).
Deviations: the bases come from NumPy's PCG64, not torch's generator; they are held in memory, not
    regenerated in every forward and backward as the authors' GenerateParams does (same numbers).
"""
from __future__ import annotations

import dataclasses
import math
import zlib

from .. import backend
from ..autograd import functional as F
from ..autograd.tensor import Tensor
from .base import AdapterConfig, Delta, check, fan_in_uniform, trainable
from .lora import check_rank_alpha, lora_scaling
from .registry import register


@dataclasses.dataclass
class NOLAConfig(AdapterConfig):
    rank: int = 8
    num_basis_a: int = 128  # k: the authors' LLaMA default (nola_num_basis)
    num_basis_b: int = 128  # l
    alpha: float = 8  # s = alpha / r = 1
    dropout: float = 0.0
    basis_seed: int = 0  # the bases of every layer are drawn from it (NOLA-1)
    rank_pattern: dict = dataclasses.field(default_factory=dict)  # read by check_rank_alpha (LoRA's rule)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)

    peft_type = "MINIPEFT_NOLA"
    PEFT_FIELDS = {"rank": "r", "num_basis_a": "num_basis_a", "num_basis_b": "num_basis_b", "alpha": "lora_alpha",
                   "dropout": "lora_dropout", "basis_seed": "basis_seed"}
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "exclude_modules")

    def validate(self):
        check_rank_alpha(self)
        check(not self.rank_pattern and not self.alpha_pattern, "rank_pattern", self.rank_pattern,
              "is not supported by NOLA; one rank for every layer")
        for field in ("num_basis_a", "num_basis_b"):
            check(getattr(self, field) > 0, field, getattr(self, field), "must be a positive integer")
        check(0 <= self.basis_seed < 2 ** 63, "basis_seed", self.basis_seed, "must be an integer in [0, 2**63)")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")

    def trainable_count(self, layers: dict, mc) -> int:
        """NOLA-6: k + l per layer."""
        return (self.num_basis_a + self.num_basis_b) * len(layers)


def draw_bases(seed: int, path: str, r: int, n: int, m: int, k: int, l: int):
    """NOLA-1: A_0 (r, in), the A basis (k, r * in) and the B basis (l, out * r), in that order, from one
    stream that the adapter's seed and the layer's path fix (a load draws the same numbers)."""
    rng = backend.RNG([seed, zlib.crc32(path.encode())])
    A0 = fan_in_uniform(rng, (r, n), n)  # (r, in), torch's kaiming_uniform(a=sqrt 5)
    bound_a, bound_b = 1.0 / math.sqrt(k), 1.0 / math.sqrt(l)
    return A0, rng.uniform((k, r * n), -bound_a, bound_a), rng.uniform((l, m * r), -bound_b, bound_b)


class NOLALinear(Delta):
    MIXED_BATCH = True  # y + s B A x of the rows alone (METHOD-6)

    def __init__(self, n, m, cfg: NOLAConfig, bases: tuple, rng):
        self.n, self.m, self.r = n, m, cfg.rank
        self.s, self.p, self.rng = lora_scaling(cfg.alpha, cfg.rank, False), cfg.dropout, rng
        self.bases = bases  # (A_0, A basis, B basis): frozen; a tuple, so no parameter walk finds them
        xp = backend.xp()
        self.nola_alpha = trainable(xp.zeros((cfg.num_basis_a,), dtype=backend.dtype("float32")))  # (k,)
        self.nola_beta = trainable(xp.zeros((cfg.num_basis_b,), dtype=backend.dtype("float32")))  # (l,)

    @classmethod
    def create(cls, base, cfg: NOLAConfig, path: str, rng, init_weights: bool = True):
        n, m = base.in_features, base.out_features  # NOLA-4: the coefficients start at 0 (a load fills them)
        return cls(n, m, cfg, draw_bases(cfg.basis_seed, path, cfg.rank, n, m, cfg.num_basis_a, cfg.num_basis_b), rng)

    def factors(self):
        """NOLA-2: A (r, in) and B (out, r) as Tensors, differentiable in the coefficients."""
        dt = self.nola_alpha.data.dtype  # float64 under METHOD-5's gradient check: the bases follow
        A0, basis_a, basis_b = (Tensor(b if b.dtype == dt else backend.xp_of(b).astype(b, dt)) for b in self.bases)
        A = A0 + (self.nola_alpha.reshape(1, -1) @ basis_a).reshape(self.r, self.n)  # (r, in)
        B = (self.nola_beta.reshape(1, -1) @ basis_b).reshape(self.m, self.r)  # (out, r)
        return A, B

    def adapt(self, x, y, base):  # NOLA-3
        A, B = self.factors()
        h = F.dropout(x, self.p, self.rng, self.training)
        return y + F.linear(F.linear(h, A), B) * self.s  # (..., out)

    def delta_weight(self):  # NOLA-5: s B A, (out, in)
        A, B = (t.data for t in self.factors())
        return backend.xp_of(A).matmul(B, A) * self.s


register("nola", NOLAConfig, NOLALinear, in_peft=False,
         paper="NOLA: Compressing LoRA using Linear Combination of Random Basis, Koohpayegani et al. 2024 "
               "(ICLR), arXiv:2310.02556",
         summary="NOLA, dW = s (Σ beta_j B_j)(A_0 + Σ alpha_i A_i) over seeded random bases, only the k + l "
                 "coefficients trained (spec/nola.md).")
