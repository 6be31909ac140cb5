"""RandLoRA: full-rank parameter-efficient fine-tuning of large models (Albert, Zhang, Saratchandran, Rodriguez-Opazo,
van den Hengel, Abbasnejad, 2025, arXiv:2502.00987), spec/randlora.md.

Symbols: W0 (out, in); per adapter, frozen random bases A (r, 1, min_dim) and B (max_dim, nb_max, r) shared by every
    layer, max_dim / min_dim the larger / smaller of the largest (out, in) over the targets, nb_max = ceil(min_dim / r);
    a layer has mn = min(in, out), mx = max(in, out), nb = ceil(mn / r), trained lam (r, nb) (randlora_lambda) and
    gam (nb, mn) (randlora_gamma); s = alpha / r.
Factors (RANDLORA-1): S = lam[:, :, None] * A[:, :, :mn] * gam[None] (r, nb, mn), S_f = S.reshape(r nb, mn);
    B_f = B[:mx, :nb, :].reshape(mx, nb r).
Delta weight (RANDLORA-2): dW = s B_f S_f if in <= out, else s S_f^T B_f^T (out, in).
Forward (RANDLORA-3): h = W0 x + b + dW dropout(x), as two products (x through the in side first).
Init (RANDLORA-4): lam = 0 (init_weights; False: N(0, 1)), gam = 1 / max(nb, mn), so h = W0 x + b at step 0. Dense
    bases: U(-1, 1), each divided by its std (unbiased); sparse / very_sparse: entries -1, 0, 1 with P(+-1) = 1 / (2 t),
    t = 3 / sqrt(min_dim), divided by their std. Drawn from backend.RNG(projection_prng_key), A first.
Merge (RANDLORA-5): W <- W0 + dW (dW^T for GPT-2's Conv1D); unmerge subtracts it.
Trainable (RANDLORA-6): lam and gam, nb (r + mn) per layer; W0, A and B get no gradient.
Serialization (RANDLORA-7): peft_type "RANDLORA"; <layer>.randlora_lambda, <layer>.randlora_gamma, and, with
    save_projection, A and B as base_model.randlora_A / base_model.randlora_B and under every layer's path (PEFT's
    per-layer buffers). A file without them is refused (PEFT regenerates them with torch's generator).
PEFT parity: peft/tuners/randlora/layer.py get_scaled_bases, get_delta_weight, forward; model.py _find_dim,
    _init_randlora_A_randlora_B, _init_randlora_A_randlora_B_sparse.
Deviations: the bases come from NumPy's generator, not torch's (files carry them, as VeRA's).
"""
from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..autograd import functional as F
from ..autograd.tensor import Tensor
from .base import AdapterConfig, Delta, check, trainable
from .registry import register


@dataclasses.dataclass
class RandLoRAConfig(AdapterConfig):
    rank: int = 32  # PEFT's default r
    alpha: float = 640  # s = alpha / r = 20
    dropout: float = 0.0
    projection_prng_key: int = 0
    save_projection: bool = True
    sparse: bool = False
    very_sparse: bool = False
    init_weights: bool = True  # lam = 0; False: lam ~ N(0, 1) (tests)
    fan_in_fan_out: bool = False  # accepted for PEFT's sake: each layer's own storage decides
    bias: str = "none"  # "none" | "all" | "randlora_only"

    peft_type = "RANDLORA"
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "fan_in_fan_out")
    PEFT_FIELDS = {"rank": "r", "alpha": "randlora_alpha", "dropout": "randlora_dropout",
                   "projection_prng_key": "projection_prng_key", "save_projection": "save_projection",
                   "sparse": "sparse", "very_sparse": "very_sparse", "init_weights": "init_weights", "bias": "bias"}

    def validate(self):
        check(self.rank > 0, "rank", self.rank, "must be a positive integer")
        check(self.projection_prng_key >= 0, "projection_prng_key", self.projection_prng_key, "must be >= 0")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(self.bias in ("none", "all", "randlora_only"), "bias", self.bias,
              "use 'none', 'all' or 'randlora_only'")
        check(self.layers_pattern is None or self.layers_to_transform is not None, "layers_pattern",
              self.layers_pattern, "needs layers_to_transform (PEFT's rule)")

    def trainable_count(self, layers: dict, mc) -> int:
        """RANDLORA-6: nb (r + mn) per layer."""
        return sum(bases(min(n, m), self.rank) * (self.rank + min(n, m)) for n, m in layers.values())


def bases(mn: int, r: int) -> int:
    """nb = ceil(mn / r): enough rank-r bases for a full-rank update."""
    return -(-mn // r)


def draw(key, shape, cfg: RandLoRAConfig, min_dim: int) -> Tensor:
    """RANDLORA-4: one frozen basis, dense or sparse, divided by its (unbiased) std."""
    xp = backend.xp()
    u = key.uniform(shape, 0.0, 1.0) if (cfg.sparse or cfg.very_sparse) else key.uniform(shape, -1.0, 1.0)
    if cfg.sparse or cfg.very_sparse:
        t = math.sqrt(min_dim) if cfg.very_sparse else 3.0
        u = xp.astype(u > 1 - 1 / (2 * t), u.dtype) - xp.astype(u < 1 / (2 * t), u.dtype)
    c = u - xp.mean(u)
    return Tensor(u / xp.sqrt(xp.sum(c * c) / (c.size - 1)))  # unbiased std, as torch's .std()


class RandLoRALinear(Delta):
    MIXED_BATCH = True  # y + dW x of the rows alone (METHOD-6)

    def __init__(self, n, m, projections: tuple, cfg: RandLoRAConfig, rng):
        self.n, self.m, self.p, self.rng = n, m, cfg.dropout, rng
        self.s, self.save_projection = cfg.alpha / cfg.rank, cfg.save_projection
        self.projections = projections  # (A, B): shared and frozen; a tuple, so no parameter walk finds them
        r, mn = cfg.rank, min(n, m)
        nb = bases(mn, r)
        xp, f32 = backend.xp(), backend.dtype("float32")
        lam = xp.zeros((r, nb), dtype=f32) if cfg.init_weights else rng.normal((r, nb))
        self.randlora_lambda = trainable(lam)  # (r, nb)
        self.randlora_gamma = trainable(xp.full((nb, mn), 1.0 / max(nb, mn), dtype=f32))  # (nb, mn)

    @classmethod
    def create_all(cls, base_layers: dict, cfg: RandLoRAConfig, rng, init_weights: bool = True):
        """One A, B for all targets, sized by the largest (out, in) among them (RANDLORA-1, 7)."""
        check(init_weights or cfg.save_projection, "save_projection", cfg.save_projection,
              "the file has no randlora_A / randlora_B: PEFT regenerates them with torch's random generator, "
              "which minipeft cannot reproduce; save the adapter with save_projection=True")
        out = max(b.out_features for b in base_layers.values())
        inn = max(b.in_features for b in base_layers.values())
        max_dim, min_dim = max(out, inn), min(out, inn)
        key = backend.RNG(cfg.projection_prng_key)
        A = draw(key, (cfg.rank, 1, min_dim), cfg, min_dim)  # (r, 1, min_dim)
        B = draw(key, (max_dim, bases(min_dim, cfg.rank), cfg.rank), cfg, min_dim)  # (max_dim, nb_max, r)
        deltas = {p: cls(b.in_features, b.out_features, (A, B), cfg, rng) for p, b in base_layers.items()}
        return deltas, ({"randlora_A": A, "randlora_B": B} if cfg.save_projection else {})

    def saved_parameters(self):
        """RANDLORA-7: lam, gam, and PEFT's per-layer copies of the shared bases."""
        own = [("randlora_lambda", self.randlora_lambda), ("randlora_gamma", self.randlora_gamma)]
        return own + (list(zip(("randlora_A", "randlora_B"), self.projections)) if self.save_projection else [])

    def factors(self):
        """RANDLORA-1/2: (first, second) with dW = s second @ first, first (k, in), second (out, k)."""
        A, B = self.projections
        r, nb = self.randlora_lambda.shape
        mn, mx = min(self.n, self.m), max(self.n, self.m)
        S = self.randlora_lambda.reshape(r, nb, 1) * Tensor(A.data[:, :, :mn]) * self.randlora_gamma.reshape(1, nb, mn)
        S_f = S.reshape(r * nb, mn)  # (r nb, mn)
        B_f = Tensor(B.data[:mx, :nb, :]).reshape(mx, nb * r)  # (mx, nb r)
        return (S_f, B_f) if mn == self.n else (B_f.T, S_f.T)

    def adapt(self, x, y, base):  # RANDLORA-3
        first, second = self.factors()
        return y + F.linear(F.linear(F.dropout(x, self.p, self.rng, self.training), first), second) * self.s

    def delta_weight(self):  # RANDLORA-2: (out, in)
        first, second = (t.data for t in self.factors())
        return backend.xp_of(first).matmul(second, first) * self.s


register("randlora", RandLoRAConfig, RandLoRALinear,
         paper="RandLoRA: full-rank parameter-efficient fine-tuning of large models, Albert et al. 2025, "
               "arXiv:2502.00987",
         summary="RandLoRA, dW = (alpha / r) sum_b B_b diag(lam_b) A diag(gam_b) over frozen random bases shared by "
                 "all layers, trained lam and gam (spec/randlora.md).")
