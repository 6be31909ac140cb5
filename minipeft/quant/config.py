"""QuantizationConfig: how `load_model(..., quantization=)` stores the linear layers (spec/qlora.md).

The fields are bitsandbytes' BitsAndBytesConfig(load_in_4bit=True, ...) under shorter names:
    quant_type          bnb_4bit_quant_type        "nf4" | "fp4"
    compute_dtype       bnb_4bit_compute_dtype     "bfloat16" | "float16" | "float32"
    double_quantization bnb_4bit_use_double_quant  the absmax in 8 bits, in blocks of 256 (NF4-8)
    block_size          (bitsandbytes' blocksize)  32 | 64 | 128 | 256 weights per absmax
The double quantization's own block is 256, as in bitsandbytes; it is not a field.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..adapters.base import check
from .nf4 import ABSMAX_BLOCK, BLOCK_SIZES, COMPUTE_DTYPES, QUANT_TYPES


@dataclass
class QuantizationConfig:
    quant_type: str = "nf4"
    compute_dtype: str = "bfloat16"
    double_quantization: bool = True
    block_size: int = 64

    double_quant_block_size = ABSMAX_BLOCK  # fixed by bitsandbytes (and NF4-8)

    def __post_init__(self):  # QLORA-1
        check(self.quant_type in QUANT_TYPES, "quant_type", self.quant_type, "use 'nf4' or 'fp4'")
        check(self.compute_dtype in COMPUTE_DTYPES, "compute_dtype", self.compute_dtype,
              f"use one of {', '.join(COMPUTE_DTYPES)}")
        check(isinstance(self.double_quantization, bool), "double_quantization", self.double_quantization,
              "must be True or False")
        check(type(self.block_size) is int and self.block_size in BLOCK_SIZES, "block_size", self.block_size,
              f"use one of {', '.join(map(str, BLOCK_SIZES))}")
