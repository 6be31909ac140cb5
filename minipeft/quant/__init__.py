"""4-bit quantization: NF4 and FP4 with double quantization, as bitsandbytes (spec/nf4.md)."""
from .config import QuantizationConfig
from .nf4 import NF4Tensor, nf4_dequantize, nf4_quantize, storage_bits

__all__ = ["NF4Tensor", "nf4_quantize", "nf4_dequantize", "storage_bits", "QuantizationConfig"]
