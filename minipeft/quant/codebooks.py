"""The code books of bitsandbytes' 4-bit types and of its 8-bit dynamic map (spec/nf4.md).

NF4 (NF4-1) is a table of 16 normal quantiles, FP4 (NF4-2) a 4-bit float read through a table, and
the dynamic map (NF4-9) the signed 8-bit code that double quantization uses for the absmax. The
tables are float32 values. Each construction repeats bitsandbytes' float32 steps: its linspace is
torch's, whose CPU kernel computes start + step*i with a single rounding (a fused multiply-add).
That is why `_linspace_f32` rounds a float64 result once.

The 16 NF4 values are written out because bitsandbytes writes them out; `normal_float_code()`
rebuilds them from the QLoRA construction, and tests/test_nf4.py checks that the two agree.
"""
from __future__ import annotations

import math
import struct

from .. import backend

# NF4-1: the NF4 table, ascending (bitsandbytes functional.get_4bit_type("nf4")).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_OFFSET = 0.9677083  # the outermost quantile; ppf(0.9677083) ~ 1.848 standard deviations


def _f32(v: float) -> float:
    """v rounded to the nearest float32 (ties to even), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _linspace_f32(xp, start: float, end: float, steps: int):
    """torch.linspace(start, end, steps) in float32: the first half counts up from start, the
    second half down from end, each element start + step*i rounded once."""
    start, end = _f32(start), _f32(end)
    step = _f32(_f32(end - start) / (steps - 1))
    i = xp.arange(steps, dtype=xp.float64)
    up = start + step * i  # exact in float64, rounded once below
    down = end - step * (steps - 1 - i)
    return xp.astype(xp.where(i < steps // 2, up, down), xp.float32)


def _normal_ppf(xp, p):
    """The standard normal quantile Phi^-1(p) in float64: Newton's method on Phi(x) = (1 + erf(x/sqrt 2))/2."""
    x = xp.zeros_like(p)
    for _ in range(40):  # converges quadratically from 0 for 0.5 <= p <= 0.97
        cdf = 0.5 * (1.0 + backend.erf(x / math.sqrt(2.0)))
        pdf = xp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        x = x - (cdf - p) / pdf
    return x


def normal_float_code(offset: float = NF4_OFFSET):
    """NF4-1: the NF4 code from normal quantiles (QLoRA, arXiv 2305.14314, appendix E): 8 positive
    quantiles from linspace(offset, 1/2, 9), 7 negative ones from linspace(offset, 1/2, 8), and an
    exact zero; rounded to float32, sorted and divided by the largest. Returns (16,) float32."""
    xp = backend.xp()
    pos = _normal_ppf(xp, xp.astype(_linspace_f32(xp, offset, 0.5, 9)[:-1], xp.float64))  # (8,)
    neg = -_normal_ppf(xp, xp.astype(_linspace_f32(xp, offset, 0.5, 8)[:-1], xp.float64))  # (7,)
    v = xp.sort(xp.astype(xp.concat([pos, xp.zeros(1, dtype=xp.float64), neg]), xp.float32))
    return v / xp.max(v)


def _fp4_values() -> tuple[float, ...]:
    """NF4-2: the FP4 code in bitsandbytes' bit order: bit 3 is the sign, bits 2-1 an exponent e,
    bit 0 a mantissa m. |value| = m/16 for e = 0 (subnormal), (1 + m/2) * 2^(4-e) otherwise, then
    divided by 12 in float32. Pattern 8 (a negative zero) is +0, as in bitsandbytes' table."""
    mags = [(b & 1) / 16 if b >> 1 == 0 else (1 + (b & 1) / 2) * 2.0 ** (4 - (b >> 1)) for b in range(8)]
    pos = tuple(_f32(v / 12) for v in mags)  # 0, 1/192, 2/3, 1, 1/3, 1/2, 1/6, 1/4
    return pos + tuple(0.0 - v for v in pos)  # 0.0 - 0.0 = +0.0


FP4_CODE = _fp4_values()
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def ranks(quant_type: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(order, midpoints) of a 4-bit code book. order[r] is the 4-bit pattern of the r-th smallest
    value (a stable sort, so FP4's +0, pattern 0, ranks before pattern 8); midpoints[k] =
    (c_(k) + c_(k+1)) / 2 in float32 over the ascending values: the 15 decision bounds of NF4-5."""
    code = CODES[quant_type]
    order = tuple(sorted(range(16), key=lambda k: code[k]))  # Python's sort is stable
    c = [code[k] for k in order]
    return order, tuple(_f32(c[k] + c[k + 1]) / 2 for k in range(15))


def dynamic_map():
    """NF4-9: bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True)), (256,)
    float32 ascending. For i = 0..6, 2^i means of neighbours of linspace(0.1, 1, 2^i + 1), scaled
    by 10^(i-6), with both signs; plus 0 and 1 (so the smallest value is -0.99297, not -1)."""
    xp = backend.xp()
    parts = [xp.asarray([0.0, 1.0], dtype=xp.float32)]
    for i in range(7):
        edges = _linspace_f32(xp, 0.1, 1.0, 2**i + 1)
        means = (edges[:-1] + edges[1:]) / 2.0  # (2^i,)
        scaled = _f32(10.0 ** (i - 6)) * means  # a float32 scalar times float32 values
        parts += [scaled, -scaled]
    return xp.sort(xp.concat(parts))
