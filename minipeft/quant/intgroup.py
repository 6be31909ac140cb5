"""Group-wise INT-N quantization with a scale and a zero per group (QA-LoRA's base, spec/qalora.md QALORA-1).

Symbols: W (out, in) a float weight, N the bit width, L the group size (L divides in), G = in / L the number
of groups; group g of row o is W[o, g L : (g + 1) L].
Quantize (QALORA-1): per group, beta = min, alpha = (max - min) / (2^N - 1), codes q = round((W - beta) / alpha)
    in {0, ..., 2^N - 1} (round half to even, as torch.round); a group whose values are all equal has
    alpha = 0 and codes 0. Dequantize: W~ = alpha q + beta, alpha and beta broadcast over the group's L inputs.
    The min maps to code 0 and the max to 2^N - 1, so quantizing W~ again gives the same codes and alpha.
This is round-to-nearest min-max quantization, the paper's Section 3.1 quantizer applied per group (3.3);
the authors quantize with GPTQ, which chooses the codes by minimising the layer's output error on calibration
data (not done here).
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..errors import ConfigError

BITS = (2, 3, 4, 8)


@dataclasses.dataclass
class GroupQuant:
    """W~ = scale[:, g] q + zero[:, g] over each group g of L inputs."""

    codes: object  # (out, in) uint8 in {0, ..., 2^bits - 1}
    scale: object  # alpha (out, G) float32
    zero: object  # beta (out, G) float32
    bits: int
    group_size: int


def group_quantize(W, bits: int, group_size: int) -> GroupQuant:
    """QALORA-1: W (out, in) to codes, scales and zeros per group of group_size inputs."""
    if bits not in BITS:
        raise ConfigError(f"bits={bits!r}: use one of {', '.join(map(str, BITS))}")
    out, n = W.shape
    if n % group_size:
        raise ConfigError(f"in_features={n} is not a multiple of group_size={group_size}")
    xp = backend.xp_of(W)
    Wg = xp.reshape(xp.astype(W, xp.float32), (out, n // group_size, group_size))  # (out, G, L)
    lo, hi = xp.min(Wg, axis=-1), xp.max(Wg, axis=-1)  # (out, G)
    scale = (hi - lo) / (2 ** bits - 1)
    safe = xp.where(scale > 0, scale, xp.ones_like(scale))
    q = xp.clip(xp.round((Wg - lo[..., None]) / safe[..., None]), 0, 2 ** bits - 1)  # (out, G, L)
    return GroupQuant(xp.astype(xp.reshape(q, (out, n)), xp.uint8), scale, lo, bits, group_size)


def group_dequantize(t: GroupQuant, zero=None):
    """W~ = alpha q + beta (out, in) float32; zero= replaces beta (QA-LoRA's merge, QALORA-5)."""
    xp = backend.xp_of(t.scale)
    out, n = t.codes.shape
    zero = t.zero if zero is None else zero
    q = xp.reshape(xp.astype(t.codes, xp.float32), (out, n // t.group_size, t.group_size))  # (out, G, L)
    return xp.reshape(t.scale[..., None] * q + zero[..., None], (out, n))
