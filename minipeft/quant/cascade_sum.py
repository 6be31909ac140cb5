"""torch.sum of a 1-D float32 array on the CPU, in torch's order of additions (spec/nf4.md, NF4-8).

Double quantization subtracts offset = absmax.mean() before quantizing the absmax, and
bitsandbytes takes that mean with torch: a float32 sum divided by n. A float32 sum depends on the
order of its additions (a plain or a float64 sum differs from torch's in about a third of cases),
so matching bitsandbytes byte for byte means adding in torch's order. ATen's cascade_sum
(aten/src/ATen/native/cpu/SumKernel.cpp), for a contiguous row of n floats, single-threaded:

- n < L (L = the float lanes of torch's Vectorized<float>; 8 as measured against torch 2.13 on
  an AVX-512 CPU): row_sum over the scalars. Otherwise row_sum over the n // L vectors of L lanes, then a scalar total that
  starts at 0, adds the tail of n % L floats one by one, then the L lanes one by one.
- row_sum: 4 interleaved accumulators (element 4i + k goes to accumulator k) run through
  multi_row_sum; leftover elements are added to accumulator 0; then ((acc0 + acc1) + acc2) + acc3.
- multi_row_sum: chunks of 2^p rows (p = max(4, ceil(log2 rows) / 4)) are summed one by one from
  0; chunk sums go into a level-1 accumulator, flushed every 2^p chunks into level 2, flushed every
  2^(2p) chunks into level 3; leftover rows are summed from 0, and the levels are added last.

With more than one thread and n >= 32768 torch splits the row among threads (two-pass
reduction) and the order changes; this module follows the single-thread order.
"""
from __future__ import annotations

from .. import backend

TORCH_LANES = 8  # float lanes of torch's CPU sum kernel (measured; bit-equal for n = 1 .. 300001)


def _ceil_log2(n: int) -> int:
    return 1 if n <= 2 else (n - 1).bit_length()


def _multi_row_sum(xp, rows):
    """(S, W) float32 -> (W,): the cascade over S rows of W independent columns."""
    size = rows.shape[0]
    step = 1 << max(4, _ceil_log2(size) // 4)
    full = size // step
    zero = xp.zeros(rows.shape[1:], dtype=rows.dtype)
    level1, level2, level3 = zero, zero, zero
    if full:
        chunks = xp.reshape(rows[: full * step, :], (full, step, -1))
        sums = zero
        for j in range(step):  # every chunk, one row at a time from 0
            sums = sums + chunks[:, j, :]  # (full, W)
        for m in range(full):
            level1 = level1 + sums[m, :]
            if (m + 1) % step == 0:
                level2, level1 = level2 + level1, zero
                if (m + 1) % (step * step) == 0:
                    level3, level2 = level3 + level2, zero
    rest = zero
    for i in range(full * step, size):
        rest = rest + rows[i, :]
    return ((rest + level1) + level2) + level3


def _row_sum(xp, elems):
    """(S, W) -> (W,): torch's row_sum of S elements, each a vector of W lanes."""
    size, width = elems.shape
    n4 = size // 4
    if n4:
        acc = xp.reshape(_multi_row_sum(xp, xp.reshape(elems[: 4 * n4, :], (n4, 4 * width))), (4, width))
    else:
        acc = xp.zeros((4, width), dtype=elems.dtype)
    first = acc[0, :]
    for i in range(4 * n4, size):
        first = first + elems[i, :]
    return ((first + acc[1, :]) + acc[2, :]) + acc[3, :]


def torch_sum(x, lanes: int = TORCH_LANES):
    """The float32 sum of the 1-D float32 array x, added in the order of torch.sum on one CPU thread."""
    xp = backend.xp_of(x)
    n = x.shape[0]
    if n < lanes:
        return _row_sum(xp, xp.reshape(x, (n, 1)))[0]
    nvec = n // lanes
    lane_sums = _row_sum(xp, xp.reshape(x[: nvec * lanes], (nvec, lanes)))  # (lanes,)
    total = xp.zeros((), dtype=x.dtype)
    for k in range(nvec * lanes, n):
        total = total + x[k]
    for k in range(lanes):
        total = total + lane_sums[k]
    return total


def torch_mean(x, lanes: int = TORCH_LANES):
    """x.mean() as torch computes it on the CPU: torch_sum(x) / n, rounded to float32."""
    return torch_sum(x, lanes) / x.shape[0]
