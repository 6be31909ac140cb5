"""LN tuning: Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning (Zhao, Tu, Wei, Mei, Xie
2023, arXiv:2312.11420): train the normalisation layers alone, as PEFT 0.21.2's LN_TUNING tuner
(peft/tuners/ln_tuning), spec/ln_tuning.md.

Symbols: a targeted norm has weight g (d,) and, for LayerNorm, bias β (d,); RMSNorm has g only. The adapter holds a
    trained copy (g', β') of them (PEFT's ln_tuning_layers).
Forward (LN_TUNING-1): norm(x; g', β') in place of norm(x; g, β): LayerNorm g' ⊙ (x − μ)/sqrt(σ² + ε) + β',
    RMSNorm g' ⊙ x / sqrt(mean(x²) + ε); one LN tuning adapter is active at a time (PEFT's rule).
Init (LN_TUNING-2): (g', β') = (g, β), a copy, so the adapted model equals the base at step 0 (PEFT has no other init).
Merge (LN_TUNING-3): the norm's tensors and the copy's swap places, so the base norm computes with (g', β'); unmerge
    swaps them back and restores (g, β) bit for bit.
Trainable (LN_TUNING-4): g' (and β'): d numbers per RMSNorm, 2 d per LayerNorm; nothing else moves.
Targets (LN_TUNING-5): LayerNorm and RMSNorm modules only; target_modules=None is PEFT's default for the model type
    (llama, mistral: input_layernorm, post_attention_layernorm, norm; qwen2: post_attention_layernorm; phi:
    input_layernorm, final_layernorm; gpt2: ln_1, ln_2, ln_f), and a model type PEFT has none for (bert) a ConfigError.
Serialization (LN_TUNING-6): peft_type "LN_TUNING", keys <norm>.ln_tuning_layers.weight (d,) [and .bias (d,)];
    fields target_modules, exclude_modules, modules_to_save (PEFT's LNTuningConfig has no others).
Deviations: PEFT copies whatever module a name matches (a Linear too); minipeft copies norms only (LN_TUNING-5).
    PEFT raises on a forward with two LN tuning adapters active; minipeft runs the last one's copy.
"""
from __future__ import annotations

import copy
import dataclasses

from ..nn.layers import LayerNorm, RMSNorm
from .base import AdapterConfig, Delta
from .registry import register

NORM_HAS_BIAS = ("gpt2", "bert", "phi")  # the families built on LayerNorm; llama, mistral, qwen2 use RMSNorm


@dataclasses.dataclass
class LNTuningConfig(AdapterConfig):
    target_modules: tuple | str | None = None  # LN_TUNING-5: None is PEFT's default for the model type

    peft_type = "LN_TUNING"
    PEFT_COMMON = ("target_modules", "exclude_modules", "modules_to_save")
    TARGET_TYPES = (LayerNorm, RMSNorm)
    DEFAULT_TARGETS = {"llama": ("input_layernorm", "post_attention_layernorm", "norm"),
                       "mistral": ("input_layernorm", "post_attention_layernorm", "norm"),
                       "qwen2": ("post_attention_layernorm",), "phi": ("input_layernorm", "final_layernorm"),
                       "gpt2": ("ln_1", "ln_2", "ln_f")}  # PEFT's TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING

    def trainable_count(self, layers: dict, mc) -> int:
        """LN_TUNING-4: d per RMSNorm, 2 d (weight and bias) per LayerNorm."""
        return sum(d * (2 if mc.model_type in NORM_HAS_BIAS else 1) for d, _ in layers.values())


class LNTuningNorm(Delta):
    MIXED_BATCH = True  # the copy on the rows alone (METHOD-6)

    def __init__(self, norm):
        self.ln_tuning_layers = copy.deepcopy(norm)  # (g', β') = (g, β), LN_TUNING-2

    @classmethod
    def create(cls, base, cfg: LNTuningConfig, path: str, rng, init_weights: bool = True):
        return cls(base)

    def adapt(self, x, y, base):  # LN_TUNING-1: the copy's output replaces the base norm's
        return self.ln_tuning_layers(x)

    def merge_into(self, base):  # LN_TUNING-3
        self._swap(base)

    def unmerge_from(self, base):
        self._swap(base)

    def _swap(self, base):
        for name, t in self.ln_tuning_layers.named_parameters():
            held = getattr(base, name)
            held.data, t.data = t.data, held.data


register("ln_tuning", LNTuningConfig, LNTuningNorm,
         paper="Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM Finetuning, Zhao, Tu, Wei, Mei, Xie "
               "2023, arXiv:2312.11420",
         summary="LN tuning, a trained copy of each targeted norm's weight (and bias) in place of the norm's "
                 "(spec/ln_tuning.md).")
