"""BEFT: Bias-Efficient Fine-Tuning of Language Models in Low-Data Regimes (Huang, Balashankar, Aminifar 2025,
arXiv:2509.15974): fine-tune the value projection's bias b_v, as PEFT 0.21.2's BEFT tuner (peft/tuners/beft), spec/beft.md.

Symbols: W0 (out, in) frozen base weight, b its bias (or none), x (..., in), Δb (1, out) the trained bias offset
    (PEFT's beft_bias).
Forward (BEFT-1): h = W0 x + b + Δb; several active BEFT adapters add their offsets.
Init (BEFT-2): Δb = 0 (init_weights=True), so h = W0 x + b at step 0; init_weights=False draws Δb ~ N(0, 1)
    (PEFT's torch.randn, for tests).
Merge (BEFT-3): b <- b + Δb, unmerge b <- b - Δb; a layer with no bias cannot hold the merge: a ConfigError
    (PEFT raises too), so merge needs a base with biases (llama's attention has none unless attention_bias).
Trainable (BEFT-4): Δb only, out numbers per targeted layer; W0 and b get no gradient.
Targets (BEFT-5): the value projection by default (PEFT's mapping: v_proj for llama, mistral, qwen2, phi), a
    float or 4-bit Linear; GPT-2's Conv1D is refused, as PEFT supports torch.nn.Linear only.
Serialization (BEFT-6): peft_type "BEFT", key <layer>.beft_bias (1, out), fields init_weights, target_modules,
    modules_to_save (PEFT's BeftConfig has no exclude_modules or layer selection).
Deviations: none known.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..errors import ConfigError
from .base import AdapterConfig, Delta, check, trainable
from .registry import register


@dataclasses.dataclass
class BEFTConfig(AdapterConfig):
    target_modules: tuple | str = ("v_proj",)
    init_weights: bool = True  # BEFT-2: Δb = 0; False: N(0, 1)

    peft_type = "BEFT"
    PEFT_FIELDS = {"init_weights": "init_weights"}
    PEFT_COMMON = ("target_modules", "modules_to_save")

    def trainable_count(self, layers: dict, mc) -> int:
        """BEFT-4: out per layer."""
        return sum(m for _, m in layers.values())


class BEFTLinear(Delta):
    MIXED_BATCH = True  # y_rows + Δb of the rows alone (METHOD-6)

    def __init__(self, bias):
        self.beft_bias = trainable(bias)  # (1, out)

    @classmethod
    def create(cls, base, cfg: BEFTConfig, path: str, rng, init_weights: bool = True):
        check(not getattr(base, "fan_in_fan_out", False), f"target_modules (for {path})", type(base).__name__,
              "BEFT adapts torch.nn.Linear layers only (PEFT's rule); GPT-2's Conv1D is not one")
        m = base.out_features
        xp = backend.xp()
        if init_weights and not cfg.init_weights:
            return cls(rng.normal((1, m)))
        return cls(xp.zeros((1, m), dtype=backend.dtype("float32", xp)))

    def adapt(self, x, y, base):  # BEFT-1
        return y + self.beft_bias.reshape(-1)

    def mergeable_into(self, base) -> bool:
        return base.bias is not None

    def merge_into(self, base):  # BEFT-3
        if base.bias is None:
            raise ConfigError("BEFT: this layer has no bias to merge beft_bias into (PEFT refuses too); keep the "
                              "adapter unmerged, or use a base with biases")
        base.bias.data = base.bias.data + self.beft_bias.data[0]

    def unmerge_from(self, base):
        base.bias.data = base.bias.data - self.beft_bias.data[0]


register("beft", BEFTConfig, BEFTLinear,
         paper="BEFT: Bias-Efficient Fine-Tuning of Language Models in Low-Data Regimes, Huang, Balashankar, Aminifar "
               "2025, arXiv:2509.15974",
         summary="BEFT, a trained offset on the value projection's bias: h = W0 x + b + Δb (spec/beft.md).")
