"""Orthogonal LoRA initialisation (PEFT's init_lora_weights="orthogonal"; a blog post, no paper: spec/orthogonal.md).

LoRA (lora.py, spec/lora.md) whose A and B both start random, yet B A = 0, so the output at step 0 is the
base model's while neither factor starts at zero.
Symbols: r the rank (even), h = r / 2, Q (r, r) orthogonal, Q_o = Q[0::2] and Q_e = Q[1::2] (h, r) its even-
    and odd-indexed rows, G_A (in, h) and G_B (out, h) with entries N(0, 1), A (r, in), B (out, r).
Init (ORTHOGONAL-1): X ~ N(0, 1)^{r x r}, Q R = X (QR), A = (G_A Q_o)^T / 10, B = G_B Q_e / 10; W0 unchanged.
Product (ORTHOGONAL-2): B A = G_B Q_e Q_o^T G_A^T / 100 = 0, since the rows of Q are orthonormal; A's
    columns and B's rows span complementary h-dimensional subspaces of R^r.
Rank (ORTHOGONAL-3): r (and every rank_pattern value) must be even: ConfigError otherwise.
Forward, merge, gradients, serialization: LoRA's (LORA-2..LORA-5); saved with init_lora_weights "orthogonal"
    and loaded back as OrthogonalConfig (ORTHOGONAL-4).
PEFT parity: peft/tuners/lora/layer.py LoraLayer.orthogonal_init.
Deviations: the Gaussians come from minipeft's RNG (NumPy PCG64), not torch's generator, so A and B differ
    from PEFT's draws for the same seed; what holds in both is ORTHOGONAL-2.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from .base import check
from .lora import LoRAInitConfig
from .registry import register


@dataclasses.dataclass
class OrthogonalConfig(LoRAInitConfig):
    """LoRAConfig's fields; init is "orthogonal" (ORTHOGONAL-1) and every rank even (ORTHOGONAL-3)."""

    init: str = "orthogonal"

    PEFT_FLAGS = {"init_lora_weights": "orthogonal"}

    def validate(self):
        super().validate()
        for where, r in [("rank", self.rank)] + [(f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items()]:
            check(r % 2 == 0, where, r, "must be even for the orthogonal init (its A and B take r / 2 rows of Q each)")

    def initialise(self, delta, base, rng):  # ORTHOGONAL-1
        xp = backend.xp_of(base.weight.data)
        r, n = delta.lora_A.weight.shape
        m = delta.lora_B.weight.shape[0]
        Q, _ = xp.linalg.qr(rng.normal((r, r)))  # (r, r), orthogonal
        delta.lora_A.weight.data = xp.matmul(rng.normal((n, r // 2)), Q[0::2, :]).T / 10.0  # (r, in)
        delta.lora_B.weight.data = xp.matmul(rng.normal((m, r // 2)), Q[1::2, :]) / 10.0  # (out, r)


register("orthogonal", OrthogonalConfig, kind="initialiser",
         paper="Orthogonal LoRA init: no paper and no arXiv id; PEFT cites the blog post "
               "https://datta0.github.io/posts/rethink-lora-init/#orthogonal-initialisation",
         summary="LoRA with A and B drawn from the rows of one random orthogonal matrix, so B A = 0 at step 0 "
                 "(spec/orthogonal.md).")
