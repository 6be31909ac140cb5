"""QLoRA: Efficient Finetuning of Quantized LLMs (Dettmers et al. 2023, arXiv:2305.14314).

QLoRA is LoRA (lora.py, spec/lora.md) over a base whose linear layers are 4-bit Linear4bit layers
(quant/linear4bit.py, spec/nf4.md). This file holds only the config; the layer is LoRALinear.
Symbols: t the NF4Tensor of W0 (out, in), cd the compute dtype, rd(v) v rounded to cd,
    A (r, in), B (out, r), s = alpha / r.
Forward (QLORA-4, QLORA-5): h = rd(rd(x) dequant(t, cd)^T + rd(b)) + s B A dropout(x)   (the LoRA path in float32).
Trainable (QLORA-6, QLORA-7): A, B; the 4-bit weight has no gradient and no float copy between calls.
Merge (QLORA-8): merge_and_unload gives float layers W = dequant(t) + s B A; merge_adapter alone raises.
PEFT parity: peft/tuners/lora/bnb.py Linear4bit.forward (result = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling,
    the LoRA path in the adapter's float32); the adapter is saved as a plain LoRA adapter, peft_type "LORA".
Deviations: PEFT's merge requantizes W0 + s B A to 4 bits; minipeft's merge_and_unload keeps it in
    float (the QLoRA paper's and PEFT issue 1080's advice: merge onto the dequantized base).
"""
from __future__ import annotations

import dataclasses

from .base import check
from .lora import MUTATING, LoRAConfig
from .registry import register


@dataclasses.dataclass
class QLoRAConfig(LoRAConfig):
    """A LoRAConfig for a 4-bit base (Model.apply_qlora); saved and loaded as PEFT's LORA."""

    peft_type = "LORA"

    def validate(self):
        super().validate()
        check(self.init not in MUTATING, "init", self.init,
              "rewrites W0, which a 4-bit base cannot hold; use 'default' or 'gaussian'")


register("qlora", QLoRAConfig, paper="QLoRA: Efficient Finetuning of Quantized LLMs, Dettmers et al. 2023, arXiv:2305.14314",
         summary="LoRA over the 4-bit linear layers of a model loaded with quantization= (spec/qlora.md).",
         quantized_base=True)
