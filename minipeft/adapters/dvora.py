"""DVoRA: DoRA's magnitude/direction split over VeRA's update (Liu, Wang, Yin, Molchanov, Wang, Cheng,
Chen, "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024, arXiv:2402.09353, Section 5.3), spec/dvora.md.

Symbols: W0 (out, in) frozen base weight, b its bias, x (..., in); A_s (r, in), B_s (out, r) this layer's
    slices of VeRA's frozen shared random projections (VERA-1, VERA-4); lam_b (out,), lam_d (r,) VeRA's
    vectors; dV = diag(lam_b) B_s diag(lam_d) A_s (out, in); V = W0 + dV; n = ||V||_row (out,);
    m (out,) the magnitude (dvora_magnitude_vector); g = m / n.
Weight (DVORA-1): W' = m ⊙ V / ||V||_row = g (W0 + dV), row by row.
Forward (DVORA-2): h = W0 x + b + (g - 1) (W0 x) + g (lam_b ⊙ B_s (lam_d ⊙ A_s x)) = W' x + b (DoRA's DORA-2 with
    VeRA's product in place of s B A; with dropout in training both extra terms read dropout(x)).
Init (DVORA-3): lam_b = 0, lam_d = d_initial, A, B as VeRA's (VERA-1); m = ||W0||_row, so h = W0 x + b.
Detached norm (DVORA-4): n is a constant to autograd, as DoRA's (DORA-3).
Limits (DVORA-5): m = ||V||_row gives VeRA's forward; A_s, B_s, lam_b, lam_d = A, s B, 1, 1 give DoRA's.
Merge (DVORA-6): W <- g (W0 + dV) with n cached; unmerge: W <- W / g - dV.
Trainable (DVORA-7): lam_b, lam_d and m: 2 out + r per layer; W0, A, B frozen.
Serialization (DVORA-8): peft_type "MINIPEFT_DVORA"; VeRA's keys (<layer>.vera_lambda_b, <layer>.vera_lambda_d,
    base_model.vera_A, base_model.vera_B) plus <layer>.dvora_magnitude_vector (out,).
PEFT parity: none (PEFT's VeRA has no DoRA option); the parts are dora.py's Magnitude and vera.py's VeRALinear.
Deviations: none known; the paper states DVoRA in words (see spec/dvora.md).
"""
from __future__ import annotations

import dataclasses

from ..nn.layers import Linear
from .base import check, trainable
from .dora import Magnitude
from .registry import register
from .vera import VeRAConfig, VeRALinear


@dataclasses.dataclass
class DVoRAConfig(VeRAConfig):
    """VeRAConfig's fields (rank, projection_prng_key, save_projection, dropout, d_initial, ...)."""

    peft_type = "MINIPEFT_DVORA"

    def trainable_count(self, layers: dict, mc) -> int:
        """DVORA-7: VeRA's out + r per layer, plus out for m."""
        return super().trainable_count(layers, mc) + sum(m for _, m in layers.values())


class DVoRALinear(Magnitude, VeRALinear):
    MIXED_BATCH = False  # as DoRA's

    @classmethod
    def create_all(cls, bases: dict, cfg: DVoRAConfig, rng, init_weights: bool = True):
        for path, b in bases.items():
            check(isinstance(b, Linear), f"target_modules (for {path})", type(b).__name__,
                  "DVoRA needs a float Linear base (its row norms); a 4-bit layer is not supported")
        deltas, shared = super().create_all(bases, cfg, rng, init_weights)
        for path, delta in deltas.items():  # DVORA-3: lam_b = 0, so ||W0 + dV||_row = ||W0||_row
            delta.dvora_magnitude_vector = trainable(delta.row_norm(bases[path]))  # (out,)
        return deltas, shared

    @property
    def magnitude(self):
        return self.dvora_magnitude_vector


register("dvora", DVoRAConfig, DVoRALinear, in_peft=False,
         paper="DoRA: Weight-Decomposed Low-Rank Adaptation (its DVoRA), Liu et al. 2024 (ICML), arXiv:2402.09353",
         summary="DVoRA, W' = m (W0 + diag(lam_b) B diag(lam_d) A) / ||...||_row: DoRA's magnitude over VeRA's "
                 "frozen shared projections (spec/dvora.md).")
