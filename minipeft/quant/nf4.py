"""NF4 / FP4 4-bit block quantization with double quantization, as bitsandbytes 0.50 on the CPU.

QLoRA: Efficient Finetuning of Quantized LLMs, Dettmers et al. 2023 (arXiv 2305.14314). The
normative text is spec/nf4.md; the code books are in codebooks.py.

Symbols:
  x (n,)        the weight, flattened row-major, as float32 (float16 is upcast exactly)
  B             block size, one of 32, 64, 128, 256; nb = ceil(n / B) blocks
  c (16,)       the code book, indexed by 4-bit pattern; m (15,) midpoints of its sorted values
  a (nb,)       block absmax, float32
  q (n,)        4-bit patterns; packed (ceil(n / 2),) uint8
Quantize (NF4-3, NF4-4, NF4-5):
  a_b = max |x_i| over block b;  s_i = x_i * fl(1 / max(a_b, 1e-38));  q_i = order[#{k : m_k < s_i}]
Pack (NF4-6):         packed_j = (q_2j << 4) | q_2j+1
Dequantize (NF4-7):   y_i = fl(c[q_i] * a_b), then rounded to the compute dtype
Double quantization (NF4-8):
  mu = mean(a);  v = a - mu in blocks of 256;  a2 = max |v| per block;  r = 8-bit codes of v / a2
  in the dynamic map d (NF4-9);  the absmax read back is fl(fl(d[r] * a2) + mu)
Storage (NF4-10):     4 + 8/B + 32/(256 B) bits per parameter, plus 32 bits for mu

bitsandbytes parity: functional.quantize_4bit / dequantize_4bit (compress_statistics=True is
double quantization); backends/default/ops.py, the quantize_4bit kernel that the CPU uses;
csrc/cpu_ops.cpp, quantize_cpu_impl (the 8-bit absmax codes) and dequantizeBlockwise4bitCpu.
Deviations: non-finite inputs raise (bitsandbytes returns garbage); FP4 pattern 8 reads as +0
(one of bitsandbytes' CPU loops writes -0); see spec/nf4.md for the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .. import backend
from ..errors import CheckpointError, ConfigError
from .cascade_sum import torch_mean
from .codebooks import CODES, dynamic_map, ranks

BLOCK_SIZES = (32, 64, 128, 256)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
ABSMAX_BLOCK = 256  # block size of the double quantization
TINY = 1e-38  # bitsandbytes clamps the absmax to this (as float32, a subnormal) before dividing
LUT_SIZE = 65536  # bitsandbytes' 8-bit quantizer reads codes from a table over [-1, 1]


@dataclass(frozen=True)
class NF4Tensor:
    """A 4-bit quantized array. Exactly one of `absmax` and the double-quantized triple
    (`absmax_codes`, `absmax_scales`, `offset`) is set."""

    packed: Any  # (ceil(n/2),) uint8: two 4-bit patterns per byte, the even element in the high nibble
    absmax: Any | None  # (nb,) float32 block absmax, without double quantization
    absmax_codes: Any | None  # (nb,) uint8: dynamic-map codes of (absmax - offset) / absmax_scales
    absmax_scales: Any | None  # (ceil(nb/256),) float32 absmax of absmax - offset per 256 blocks
    offset: float | None  # mean of the absmax, a float32 value
    shape: tuple[int, ...]
    dtype: str  # dtype of the array that was quantized: "float32" or "float16"
    block_size: int = 64
    quant_type: str = "nf4"

    def __post_init__(self):
        _check_choices(self.block_size, self.quant_type)
        if self.dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"NF4Tensor.dtype {self.dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        n, nb = self.numel, -(-self.numel // self.block_size)
        _check_array("packed", self.packed, "uint8", (n + 1) // 2, f"shape {self.shape}")
        if self.absmax_codes is None:
            _check_array("absmax", self.absmax, "float32", nb, f"{nb} blocks of {self.block_size}")
            return
        if self.absmax is not None or self.offset is None:
            raise CheckpointError("a double-quantized NF4Tensor needs absmax_codes, absmax_scales and offset, "
                                  "and no absmax")
        _check_array("absmax_codes", self.absmax_codes, "uint8", nb, f"{nb} blocks of {self.block_size}")
        nb2 = -(-nb // ABSMAX_BLOCK)
        _check_array("absmax_scales", self.absmax_scales, "float32", nb2, f"{nb} absmax in blocks of 256")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def double_quantization(self) -> bool:
        return self.absmax_codes is not None


def _check_choices(block_size, quant_type) -> None:
    if block_size not in BLOCK_SIZES:
        raise ConfigError(f"block_size {block_size!r} is not supported; choose one of {BLOCK_SIZES}")
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"quant_type {quant_type!r} is not supported; choose 'nf4' or 'fp4'")


def _check_array(name: str, a, dtype: str, length: int, why: str) -> None:
    if a is None or not hasattr(a, "shape"):
        raise CheckpointError(f"NF4Tensor.{name} is missing")
    if backend.dtype_name(a) != dtype or tuple(a.shape) != (length,):
        raise CheckpointError(f"NF4Tensor.{name} is {backend.dtype_name(a)} of shape {tuple(a.shape)}, but "
                              f"{why} needs {dtype} of shape ({length},): a truncated or mismatched buffer")


# ---- quantize ---------------------------------------------------------------------------------
def _ranks(xp, s, quant_type: str):
    """NF4-5: the 4-bit pattern of each scaled value s (1-D): its rank among the sorted code
    values, #{k : m_k < s} (a value on a midpoint takes the lower code), mapped to its pattern."""
    order, midpoints = ranks(quant_type)
    r = xp.zeros(s.shape, dtype=xp.uint8)
    for m in midpoints:  # 15 comparisons beat a (n, 16) argmin in time and memory
        r = r + xp.astype(s > m, xp.uint8)
    if quant_type == "nf4":  # NF4 patterns are already in ascending order
        return r
    return xp.take(xp.asarray(order, dtype=xp.uint8), r)


def _quantize_blocks(xp, x, block_size: int, quant_type: str):
    """NF4-3, NF4-4: (absmax (nb,) float32, patterns (n,) uint8) of x (n,) float32."""
    n = x.shape[0]
    full = n - n % block_size
    blocks = xp.reshape(x[:full], (-1, block_size))  # (nb_full, B)
    absmax = xp.max(xp.abs(blocks), axis=1)  # (nb_full,)
    tail = x[full:]
    if n > full:  # the last, partial block stores its absmax clamped to TINY, and divides by it
        a_tail = xp.maximum(xp.max(xp.abs(tail)), TINY)
        absmax = xp.concat([absmax, xp.reshape(a_tail, (1,))])
    if not bool(xp.all(xp.isfinite(absmax))):
        raise ConfigError("nf4_quantize got non-finite values (inf or nan): they have no 4-bit code")
    s = blocks * (1.0 / xp.maximum(absmax[: full // block_size], TINY))[:, None]  # no clip: all m_k are in (-1, 1)
    q = _ranks(xp, xp.reshape(s, (-1,)), quant_type)  # (full,)
    if n > full:
        q = xp.concat([q, _ranks(xp, tail / a_tail, quant_type)])
    return absmax, q


def _pack(xp, q, quant_type: str):
    """NF4-6: two patterns per byte, the even element in the high nibble; an odd n is padded with
    the pattern of 0.0 (NF4: 7, FP4: 0)."""
    if q.shape[0] % 2:
        q = xp.concat([q, _ranks(xp, xp.zeros(1, dtype=xp.float32), quant_type)])
    return (q[0::2] << 4) | q[1::2]


def nf4_quantize(w, block_size: int = 64, double_quantization: bool = True, quant_type: str = "nf4") -> NF4Tensor:
    """Quantize w (any shape, float32 or float16; bfloat16 as float32 values) to 4 bits per element."""
    _check_choices(block_size, quant_type)
    dtype = backend.dtype_name(w) if hasattr(w, "dtype") else type(w).__name__
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"nf4_quantize needs a float32 or float16 array (bfloat16 as float32 values), got {dtype}")
    xp = backend.xp_of(w)
    x = xp.reshape(xp.astype(w, xp.float32, copy=False), (-1,))  # (n,)
    if x.shape[0] == 0:
        raise ConfigError("nf4_quantize got an empty array")
    absmax, q = _quantize_blocks(xp, x, block_size, quant_type)
    packed = _pack(xp, q, quant_type)
    shape = tuple(w.shape)
    if not double_quantization:
        return NF4Tensor(packed, absmax, None, None, None, shape, dtype, block_size, quant_type)
    codes, scales, offset = _double_quantize(xp, absmax)
    return NF4Tensor(packed, None, codes, scales, offset, shape, dtype, block_size, quant_type)


# ---- double quantization (NF4-8) ---------------------------------------------------------------
def _dynamic_lut(xp):
    """bitsandbytes' 8-bit quantizer reads codes from a table: entry j is the code nearest to
    g_j = -1 + 2j/65535 (float32), i.e. the number of dynamic-map midpoints below g_j."""
    d = dynamic_map()
    midpoints = 0.5 * (d[:-1] + d[1:])  # (255,)
    g = -1.0 + (2.0 * xp.arange(LUT_SIZE, dtype=xp.float32)) / float(LUT_SIZE - 1)  # (65536,)
    return xp.astype(xp.searchsorted(midpoints, g, side="left"), xp.uint8)


def _double_quantize(xp, a):
    """(codes (nb,) uint8, scales (nb2,) float32, offset) of the absmax a (nb,)."""
    nb = a.shape[0]
    nb2 = -(-nb // ABSMAX_BLOCK)
    offset = torch_mean(a)  # () float32, in torch's order of additions (cascade_sum.py)
    v = a - offset  # (nb,)
    padded = xp.concat([v, xp.zeros(nb2 * ABSMAX_BLOCK - nb, dtype=xp.float32)])
    scales = xp.max(xp.abs(xp.reshape(padded, (nb2, ABSMAX_BLOCK))), axis=1)  # (nb2,)
    block = xp.arange(nb) // ABSMAX_BLOCK  # (nb,) the scale block of each absmax
    inv = 1.0 / xp.where(scales == 0, 1.0, scales)  # a zero block gets codes 0, as in bitsandbytes
    t = xp.clip(v * xp.take(inv, block), -1.0, 1.0)  # (nb,)
    j = xp.astype((t + 1.0) * 0.5 * float(LUT_SIZE - 1) + 0.5, xp.int64)  # float32 steps, then truncated
    codes = xp.take(_dynamic_lut(xp), j)
    codes = xp.where(xp.take(scales, block) == 0, xp.zeros_like(codes), codes)
    return codes, scales, float(offset)


def _absmax(t: NF4Tensor):
    """The block absmax: stored, or read back from its double quantization (NF4-8)."""
    if not t.double_quantization:
        return t.absmax
    xp = backend.xp_of(t.absmax_codes)
    block = xp.arange(t.absmax_codes.shape[0]) // ABSMAX_BLOCK
    return xp.take(dynamic_map(), xp.astype(t.absmax_codes, xp.int64)) * xp.take(t.absmax_scales, block) + t.offset


# ---- dequantize (NF4-7) ------------------------------------------------------------------------
DEQUANT_CHUNK = 262144  # packed bytes per step on the CPU (2 MB of float32 output): fastest of 64K/256K/1M, measured


def _pair_table(xp, quant_type: str):
    """(256,) uint64: the bits of each byte's two float32 values (high nibble first), so that one
    gather per byte reads both of its values."""
    code = xp.asarray(CODES[quant_type], dtype=xp.float32)  # (16,)
    byte = xp.arange(256)
    pairs = xp.stack([xp.take(code, byte >> 4), xp.take(code, byte & 15)], axis=1)  # (256, 2)
    return xp.reshape(backend.bitcast(pairs, "uint64"), (256,))


def nf4_dequantize(t: NF4Tensor, dtype: str = "float32"):
    """The array t stands for, in float32, float16, or bfloat16 (as float32 values).
    y_i = fl(c[q_i] * a_b), computed in chunks of DEQUANT_CHUNK bytes on the CPU (BACKEND-8)."""
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"unsupported compute dtype {dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
    xp = backend.xp_of(t.packed)
    pairs = _pair_table(xp, t.quant_type)  # (256,)
    a = _absmax(t)  # (nb,)
    n, b = t.numel, t.block_size
    y = xp.empty((n,), dtype=xp.float32)
    step = backend.chunk_length(t.packed, DEQUANT_CHUNK)  # 2 * step is a multiple of b on the CPU
    m = t.packed.shape[0]

    def chunk(start):  # values 2 start .. of y, from packed bytes start .. start + step (disjoint per chunk)
        v = backend.bitcast(xp.take(pairs, t.packed[start:min(start + step, m)]), "float32")
        lo = 2 * start  # v holds values lo .. lo + len(v) - 1 (the last one padding when n is odd)
        hi = min(lo + v.shape[0], n)
        full = (hi - lo) // b * b  # whole blocks in this chunk; a partial one only at the very end
        k = lo // b
        backend.multiply_into(y, lo, xp.reshape(v[:full], (-1, b)), a[k:k + full // b, None])
        if lo + full < hi:
            y[lo + full:hi] = v[full:hi - lo] * a[k + full // b]

    backend.map_chunks(chunk, range(0, m, step), t.packed)  # chunks on the host's threads (BACKEND-9)
    y = xp.reshape(y, t.shape)
    if dtype == "float16":
        return xp.astype(y, xp.float16)
    return backend.round_to_bf16(y) if dtype == "bfloat16" else y


def storage_bits(t: NF4Tensor) -> Fraction:
    """NF4-10: bits per parameter of the stored arrays, exactly."""
    bits = 8 * t.packed.shape[0]
    if t.double_quantization:
        bits += 8 * t.absmax_codes.shape[0] + 32 * t.absmax_scales.shape[0] + 32  # + offset
    else:
        bits += 32 * t.absmax.shape[0]
    return Fraction(bits, t.numel)
