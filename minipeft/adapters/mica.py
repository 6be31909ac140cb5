"""MiCA: Minor Component Adaptation (Rüdiger, Raschka 2026, "MiCA Learns More Knowledge Than LoRA and Full
Fine-Tuning", arXiv:2604.01694); PEFT's init_lora_weights="mica".

LoRA (lora.py, spec/lora.md) whose B is fixed to the minor left singular vectors of W0 and whose A alone trains.
Symbols: W0 = U S V^T (out, in) with S descending, k = min(in, out), U_minor = U[:, k-r:] (out, r) the left
    singular vectors of the r smallest singular values, A (r, in), B (out, r), s = alpha / r (LORA-2).
Init (MICA-1): B = U_minor, A = 0 (and b_B = 0), so s B A = 0 and h = W0 x + b at step 0; W0 unchanged.
Trainable (MICA-2): A only; B (and b_B) frozen, so every update s B A lies in the span of U_minor
    and the count is r in per layer.
Forward, merge (MICA-3): LoRA's, h = W0 x + b + s B A x; merge W <- W0 + s B A.
Serialization (MICA-4): PEFT's LoraConfig with init_lora_weights "mica"; lora_B is saved with lora_A.
PEFT parity: peft/tuners/lora/layer.py LoraLayer.mica_init, variants.py MiCALinearVariant.
Deviations: none known (the sign of each singular vector is LAPACK's; a saved B carries it).
"""
from __future__ import annotations

import dataclasses

from .. import backend
from .lora import LoRAInitConfig, LoRALinear
from .registry import register


@dataclasses.dataclass
class MiCAConfig(LoRAInitConfig):
    """LoRAConfig's fields; init is "mica" (MICA-1); only lora_A trains (MICA-2)."""

    init: str = "mica"

    PEFT_FLAGS = {"init_lora_weights": "mica"}

    def trainable_count(self, layers: dict, mc) -> int:
        """MICA-2: r in per layer (r from rank_pattern); B and its bias are frozen."""
        return sum(self.rank_alpha_for(p)[0] * n for p, (n, _) in layers.items())

    def initialise(self, delta, base, rng):  # MICA-1
        xp = backend.xp_of(base.weight.data)
        r, n = delta.lora_A.weight.shape
        U, _, _ = xp.linalg.svd(base.weight_out_in(), full_matrices=False)  # (out, k), S descending
        delta.lora_B.weight.data = xp.asarray(U[:, U.shape[1] - r:], copy=True)  # (out, r)
        delta.lora_A.weight.data = xp.zeros((r, n), dtype=U.dtype)  # (r, in)


class MiCALinear(LoRALinear):
    MIXED_BATCH = True

    def requires_grad_(self, flag: bool = True):  # MICA-2: B stays frozen when the adapter is made trainable
        super().requires_grad_(flag)
        self.lora_B.requires_grad_(False)
        return self


register("mica", MiCAConfig, MiCALinear, kind="initialiser",
         paper="MiCA Learns More Knowledge Than LoRA and Full Fine-Tuning, Rüdiger, Raschka 2026, arXiv:2604.01694",
         summary="MiCA, LoRA with B frozen at the minor left singular vectors of W0 and A trained from 0 "
                 "(spec/mica.md).")
