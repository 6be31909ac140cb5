"""P-tuning v2: deep prompts in every layer from a prompt encoder (Liu et al. 2022, arXiv:2110.07602).

Symbols: T = num_virtual_tokens, L layers, d_kv = Hkv D, h = encoder_hidden_size.
Method (PTV2-1): P-tuning v2 is prefix tuning (spec/prefix_tuning.md) with its reparameterization on:
    Z = tanh(E W1^T + b1) W2^T + b2, E (T, d_kv), W1 (h, d_kv), W2 (2 L d_kv, h): the encoder has
    encoder_num_layers = 2 Linear layers (PEFT's PrefixEncoder.transform; 2 is the only value PEFT has).
    So PTuningV2Config(T, h) is PrefixTuningConfig(T, prefix_projection=True, projection_dim=h).
Forward, generate, gradients (PTV2-2): PREFIX-2 .. PREFIX-5 with that Z.
Serialization (PTV2-3): PEFT has no P-tuning v2 type: peft_type "PREFIX_TUNING" with
    prefix_projection true and encoder_hidden_size h; prompt_embeddings = Z, plus minipeft's
    prompt_encoder.* tensors (PREFIX-6). A reloaded folder comes back as that PrefixTuningConfig.
PEFT parity: peft/tuners/prefix_tuning/model.py PrefixEncoder with prefix_projection=True.
Deviations: none.
"""
from __future__ import annotations

import dataclasses

from .base import check
from .prefix_tuning import PrefixTuningConfig
from .registry import register


@dataclasses.dataclass
class PTuningV2Config(PrefixTuningConfig):
    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 128  # h
    encoder_num_layers: int = 2  # Linear layers of the encoder; PEFT's PrefixEncoder has exactly 2
    prefix_projection: bool = True

    def validate(self):
        h, k = self.encoder_hidden_size, self.encoder_num_layers
        check(isinstance(h, int) and not isinstance(h, bool) and h > 0, "encoder_hidden_size", h, "must be an int > 0")
        check(k == 2, "encoder_num_layers", k, "must be 2: the encoder is Linear-tanh-Linear (PEFT's PrefixEncoder)")
        check(self.prefix_projection is True, "prefix_projection", self.prefix_projection,
              "must be True: P-tuning v2 is prefix tuning with its encoder (use PrefixTuningConfig without)")
        self.projection_dim = h
        super().validate()


register("ptuning_v2", PTuningV2Config, kind="prompt", mergeable=False,
         paper="P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales and Tasks, Liu et al. 2022, arXiv:2110.07602",
         summary="P-tuning v2: deep prompts in every layer from a prompt encoder (spec/ptuning_v2.md).")
