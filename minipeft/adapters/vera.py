"""VeRA: Vector-based Random Matrix Adaptation (Kopiczko et al. 2023, arXiv:2310.11454).

Symbols: W0 (out, in) frozen base weight, x (..., in); A (r, max_in) and B (max_out, r) frozen random
    projections shared by every adapted layer of one adapter, max_in / max_out the largest in / out
    over its targeted layers; A_s = A[:, :in] (r, in), B_s = B[:out, :] (out, r) this layer's slices;
    lam_d (r,) and lam_b (out,) the trainable vectors (PEFT's vera_lambda_d, vera_lambda_b).
Init (VERA-1): lam_b = 0, lam_d = d_initial, so h = W0 x + b at step 0. A, B ~ kaiming-uniform with
    gain sqrt 2: U(-sqrt(6 / fan_in), sqrt(6 / fan_in)), fan_in = max_in for A and r for B, A drawn
    first, from backend.RNG(projection_prng_key).
Forward (VERA-2): h = W0 x + b + lam_b ⊙ (B_s (lam_d ⊙ (A_s dropout(x)))).
Delta weight / merge (VERA-3): dW = diag(lam_b) B_s diag(lam_d) A_s, (out, in); W <- W0 + dW
    (dW^T for the gpt2 Conv1D layout); unmerge subtracts it (W0 to rounding).
Shared (VERA-4): A and B are one frozen array each per adapter name, referenced by every layer.
Trainable (VERA-5): lam_b and lam_d only: out + r numbers per layer; W0, A and B get no gradient.
Serialization (VERA-6): peft_type "VERA"; keys <layer>.vera_lambda_b (out,), <layer>.vera_lambda_d (r,)
    and, with save_projection, base_model.vera_A (r, max_in) and base_model.vera_B (max_out, r).
PEFT parity: peft/tuners/vera/layer.py Linear.forward and get_delta_weight ((lam_b B_s) @ (lam_d A_s));
    peft/tuners/vera/model.py _find_dim (max_in, max_out over the targets) and _kaiming_init.
Deviations: PEFT draws A and B from torch.Generator().manual_seed(projection_prng_key); minipeft
    cannot reproduce torch's stream and draws from NumPy's PCG64 with the same seed. Files are exact
    across libraries because they carry A and B; a file saved with save_projection=False is refused
    (VERA-7). Each adapter name has its own A and B (PEFT gives a later adapter the first one's).
    PEFT's init_weights=False (debug: lam_b = 1, lam_d ~ N(0, 1)) is not offered.
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
class VeRAConfig(AdapterConfig):
    rank: int = 256  # VeRA trains r + out numbers per layer, so r can be far above LoRA's
    projection_prng_key: int = 0  # seed of A and B
    save_projection: bool = True  # write A and B into the file (needed to reload exactly)
    dropout: float = 0.0
    d_initial: float = 0.1  # lam_d's initial value
    fan_in_fan_out: bool = False  # accepted for PEFT's sake: each layer's own storage decides (PEFT resets it too)
    bias: str = "none"  # "none" | "all" | "vera_only"
    shared_across_layers: bool = True  # one A and B for every layer: what VeRA is (False is refused)

    peft_type = "VERA"
    BIAS_MODES = ("none", "all", "vera_only")
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "fan_in_fan_out")
    PEFT_FIELDS = {"rank": "r", "projection_prng_key": "projection_prng_key", "save_projection": "save_projection",
                   "dropout": "vera_dropout", "d_initial": "d_initial", "bias": "bias"}

    def validate(self):
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0, "rank", self.rank,
              "must be a positive integer")
        check(isinstance(self.projection_prng_key, int) and not isinstance(self.projection_prng_key, bool)
              and self.projection_prng_key >= 0, "projection_prng_key", self.projection_prng_key,
              "must be an integer >= 0")
        check(number(self.dropout) and 0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(number(self.d_initial), "d_initial", self.d_initial, "must be a finite number")
        check(self.bias in self.BIAS_MODES, "bias", self.bias, f"use one of {', '.join(self.BIAS_MODES)}")
        for field in ("save_projection", "fan_in_fan_out"):
            check(isinstance(getattr(self, field), bool), field, getattr(self, field), "must be True or False")
        check(self.shared_across_layers is True, "shared_across_layers", self.shared_across_layers,
              "must be True: VeRA's A and B are shared by all adapted layers (PEFT has no other mode)")
        check(self.layers_pattern is None or self.layers_to_transform is not None, "layers_pattern",
              self.layers_pattern, "needs layers_to_transform (PEFT's rule)")

    def trainable_count(self, layers: dict, mc) -> int:
        """VERA-5: lam_b (out,) and lam_d (r,) per layer; the shared A, B are frozen."""
        return sum(m + self.rank for _, m in layers.values())


def kaiming_uniform(rng, shape) -> Tensor:
    """VERA-1: U(+-sqrt(3) gain / sqrt(fan_in)) with gain sqrt 2, fan_in = shape[1]; frozen."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return Tensor(rng.uniform(shape, -bound, bound))


class VeRALinear(Delta):
    SHARED = ("vera_A", "vera_B")  # the shared projections' saved names, base_model.<name>

    def __init__(self, in_features, out_features, projections: tuple, cfg: VeRAConfig, rng):
        self.bind(in_features, out_features, projections, cfg, rng)
        xp = backend.xp()
        self.vera_lambda_b = trainable(xp.zeros((out_features,), dtype=backend.dtype("float32")))  # (out,)
        self.vera_lambda_d = trainable(xp.full((cfg.rank,), cfg.d_initial, dtype=backend.dtype("float32")))  # (r,)

    def bind(self, in_features, out_features, projections: tuple, cfg, rng):
        self.n, self.m, self.p, self.rng = in_features, out_features, cfg.dropout, rng
        self.projections = projections  # (A, B): shared and frozen; a tuple, so no parameter walk finds them

    @staticmethod
    def a_rows(cfg) -> int:
        """Rows of A: r (PVeRA's A has 2r, a mean half and a log-variance half)."""
        return cfg.rank

    @classmethod
    def create_all(cls, bases: dict, cfg: VeRAConfig, rng, init_weights: bool = True):
        """One A, B for all targets (VERA-4), sized by the largest in / out among them; init_weights=False
        (a load) needs A and B in the file (VERA-7)."""
        check(init_weights or cfg.save_projection, "save_projection", cfg.save_projection,
              f"the file has no {' / '.join(cls.SHARED)}: PEFT regenerates them with torch's random generator, which "
              "minipeft cannot reproduce; save the adapter with save_projection=True")
        max_in = max(b.in_features for b in bases.values())
        max_out = max(b.out_features for b in bases.values())
        key = backend.RNG(cfg.projection_prng_key)
        A = kaiming_uniform(key, (cls.a_rows(cfg), max_in))  # (r, max_in)
        B = kaiming_uniform(key, (max_out, cfg.rank))  # (max_out, r)
        deltas = {p: cls(b.in_features, b.out_features, (A, B), cfg, rng) for p, b in bases.items()}
        return deltas, (dict(zip(cls.SHARED, (A, B))) if cfg.save_projection else {})

    def slices(self):
        """A_s (r, in), B_s (out, r): constants to autograd."""
        A, B = self.projections
        return Tensor(A.data[:, :self.n]), Tensor(B.data[:self.m, :])

    def adapt(self, x, y, base):  # VERA-2
        return y + self.low_rank(F.dropout(x, self.p, self.rng, self.training))

    def low_rank(self, h):  # lam_b ⊙ (B_s (lam_d ⊙ (A_s h))), (..., out)
        A_s, B_s = self.slices()
        return self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(h, A_s), B_s)

    def delta_weight(self):  # VERA-3: diag(lam_b) B_s diag(lam_d) A_s, (out, in)
        A_s, B_s = (t.data for t in self.slices())
        xp = backend.xp_of(A_s)
        return xp.matmul(self.vera_lambda_b.data[:, None] * B_s, self.vera_lambda_d.data[:, None] * A_s)


register("vera", VeRAConfig, VeRALinear, paper="VeRA: Vector-based Random Matrix Adaptation, Kopiczko et al. 2023, arXiv:2310.11454",
         summary="VeRA, dW = diag(lam_b) B diag(lam_d) A with A, B frozen, random and shared (spec/vera.md).")
