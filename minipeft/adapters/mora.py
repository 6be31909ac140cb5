"""MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning (Jiang, Huang et al. 2024, arXiv:2405.12130),
spec/mora.md.

Symbols: W0 (out, in) frozen base weight, b its bias, x (..., in), r the LoRA rank the budget is given in,
    r̂ the side of the square trained matrix M (mora_M), g = ceil(in / r̂) the input's chunks, x̃ (g r̂) the
    input padded cyclically (x̃_p = x_{p mod in}, the authors' padding by x's first entries).
Size (MORA-1): r̂ = floor(sqrt((in + out) r)), one less if odd for rope; M is (r̂, r̂), r̂² <= (in + out) r.
Compress (MORA-2): truncation x[:r̂]; sharing Σ_t x̃_t (r̂), the g chunks summed; reshape x̃ as (g, r̂);
    rope R_t x̃_t, chunk t rotated by RoPE at position t (cos, sin of t 10000^(-2j/r̂)).
Decompress (MORA-3): truncation [z; 0]; sharing y_o = z_{o mod r̂}; reshape and rope the chunks
    concatenated (g r̂), y_o = z_{o mod g r̂} (truncated, or repeated up to out).
Forward (MORA-4): h = W0 x + b + f_decomp(M f_comp(dropout(x))), M applied to each chunk; no scaling.
Init (MORA-5): M = 0, so h = W0 x + b; M's gradient is not zero.
Merge (MORA-6): dW = D K P, (out, in): K = [M ... M] (sharing), diag(M, ..., M) (reshape),
    diag(M R_0, ..., M R_{g-1}) (rope); P folds the padding (column p adds to column p mod in), D picks
    row o mod rows(K); truncation dW = [[M, 0], [0, 0]]. W <- W0 + dW; unmerge subtracts it.
Rank (MORA-7): rank(dW) of a random M is min(r̂, in, out) (truncation, sharing), min(in, out) (reshape,
    rope): above r, LoRA's rank at the same number of parameters.
Trainable (MORA-8): M only, r̂² per targeted layer.
Serialization (MORA-9): peft_type "MINIPEFT_MORA"; key <layer>.mora_M (r̂, r̂); r and mora_type in the config.
PEFT parity: none (PEFT has no MoRA). The authors' code (github.com/kongds/MoRA, peft-mora/src/peft/tuners/
    lora/layer.py: update_layer, _apply_mora, get_delta_weight) settles the padding, the tiling and RoPE's form.
Deviations: r̂ is the paper's floor, where the authors' code rounds (int(x + 0.5)); their code has no
    truncation nor plain reshape type (mora_type 1 is sharing, 6 is rope).
"""
from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..autograd import concat
from ..autograd import functional as F
from ..autograd.tensor import Tensor
from .base import AdapterConfig, Delta, check, trainable
from .registry import register

MORA_TYPES = ("truncation", "sharing", "reshape", "rope")


@dataclasses.dataclass
class MoRAConfig(AdapterConfig):
    rank: int = 8  # r: the LoRA rank whose parameter count M matches (MORA-1)
    mora_type: str = "rope"  # one of MORA_TYPES; the authors recommend sharing for large r, rope for small
    dropout: float = 0.0

    peft_type = "MINIPEFT_MORA"
    PEFT_FIELDS = {"rank": "r", "mora_type": "mora_type", "dropout": "lora_dropout"}
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "exclude_modules")

    def validate(self):
        check(self.rank > 0, "rank", self.rank, "must be a positive integer")
        check(self.mora_type in MORA_TYPES, "mora_type", self.mora_type, f"use one of {', '.join(MORA_TYPES)}")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")

    def trainable_count(self, layers: dict, mc) -> int:
        """MORA-8: r̂² per layer."""
        return sum(mora_rank(n, m, self.rank, self.mora_type) ** 2 for n, m in layers.values())


def mora_rank(n: int, m: int, r: int, mora_type: str) -> int:
    """MORA-1: r̂ = floor(sqrt((in + out) r)), even for rope (RoPE turns pairs of features)."""
    r_hat = math.isqrt((n + m) * r)
    return r_hat - r_hat % 2 if mora_type == "rope" else r_hat


def cyclic(x, length: int):
    """(..., length) with entry p = x[..., p mod k], k = x.shape[-1]: the input's padding and the output's
    tiling of the authors' code."""
    k = x.shape[-1]
    tiled = concat([x] * -(-length // k), axis=-1) if length > k else x
    return tiled if length == k else tiled[..., :length]


def rope_tables(g: int, r_hat: int, xp, dt):
    """cos, sin (g, r̂) of the angle t 10000^(-2j / r̂) for chunk t and pair j, HF's layout (features j and
    j + r̂/2 turn together), as the authors' code builds them."""
    inv_freq = 1.0 / (10000.0 ** (xp.astype(xp.arange(0, r_hat, 2), dt) / r_hat))  # (r̂/2,)
    freqs = xp.astype(xp.arange(g), dt)[:, None] * inv_freq[None, :]  # (g, r̂/2)
    emb = xp.concat([freqs, freqs], axis=-1)  # (g, r̂)
    return xp.cos(emb), xp.sin(emb)


class MoRALinear(Delta):
    MIXED_BATCH = True  # y + f_decomp(M f_comp(x)) of the rows alone (METHOD-6)

    def __init__(self, n, m, r_hat, mora_type, dropout, rng):
        self.n, self.m, self.r_hat, self.mora_type = n, m, r_hat, mora_type
        self.g = -(-n // r_hat)  # chunks of the padded input
        self.p, self.rng = dropout, rng
        xp = backend.xp()
        self.mora_M = trainable(xp.zeros((r_hat, r_hat), dtype=backend.dtype("float32")))  # M (r̂, r̂), MORA-5

    @classmethod
    def create(cls, base, cfg: MoRAConfig, path: str, rng, init_weights: bool = True):
        n, m = base.in_features, base.out_features
        r_hat = mora_rank(n, m, cfg.rank, cfg.mora_type)
        check(r_hat >= 2 or cfg.mora_type != "rope", f"rank (for {path})", cfg.rank,
              f"gives r̂ = {r_hat}; rope turns pairs of features and needs r̂ >= 2: raise rank")
        check(cfg.mora_type != "truncation" or r_hat <= min(n, m), f"rank (for {path})", cfg.rank,
              f"gives r̂ = {r_hat} > min(in={n}, out={m}); truncation keeps the first r̂ inputs and outputs: "
              f"lower rank, or use mora_type 'sharing' or 'rope'")
        return cls(n, m, r_hat, cfg.mora_type, cfg.dropout, rng)

    def tables(self, dt):
        xp = backend.xp_of(self.mora_M.data)
        return rope_tables(self.g, self.r_hat, xp, dt)

    def compress(self, x):
        """MORA-2: (..., in) -> (..., r̂) for truncation and sharing, (..., g, r̂) for reshape and rope."""
        if self.mora_type == "truncation":
            return x[..., :self.r_hat]
        chunks = cyclic(x, self.g * self.r_hat).reshape(*x.shape[:-1], self.g, self.r_hat)  # (..., g, r̂)
        if self.mora_type == "sharing":
            return chunks.sum(axis=-2)  # (..., r̂)
        if self.mora_type == "rope":
            cos, sin = (Tensor(t) for t in self.tables(x.data.dtype))  # (g, r̂)
            return F.rope(chunks, cos, sin)
        return chunks

    def decompress(self, z):
        """MORA-3: (..., r̂) or (..., g, r̂) -> (..., out)."""
        if self.mora_type == "truncation":
            xp = backend.xp_of(z.data)
            zeros = Tensor(xp.zeros(z.shape[:-1] + (self.m - self.r_hat,), dtype=z.data.dtype))
            return concat([z, zeros], axis=-1)
        if self.mora_type != "sharing":
            z = z.reshape(*z.shape[:-2], self.g * self.r_hat)  # (..., g r̂)
        return cyclic(z, self.m)

    def adapt(self, x, y, base):  # MORA-4
        h = F.dropout(x, self.p, self.rng, self.training)
        return y + self.decompress(F.linear(self.compress(h), self.mora_M))  # (..., out)

    def core(self):
        """K of MORA-6: what M does to the padded input x̃, (r̂, g r̂) for sharing, (g r̂, g r̂) otherwise."""
        M = self.mora_M.data  # (r̂, r̂)
        xp = backend.xp_of(M)
        if self.mora_type == "sharing":
            return xp.concat([M] * self.g, axis=1)
        k, h = self.r_hat, self.r_hat // 2
        blocks = [M] * self.g
        if self.mora_type == "rope":  # M R_t = M diag(cos_t) + (M J) diag(sin_t), J x = rotate_half(x)
            cos, sin = self.tables(M.dtype)
            MJ = xp.concat([M[:, h:], -M[:, :h]], axis=1)  # (r̂, r̂)
            blocks = [M * cos[t][None, :] + MJ * sin[t][None, :] for t in range(self.g)]
        K = xp.zeros((self.g * k, self.g * k), dtype=M.dtype)
        for t, block in enumerate(blocks):
            K[t * k:(t + 1) * k, t * k:(t + 1) * k] = block
        return K

    def delta_weight(self):  # MORA-6: dW = D K P, (out, in)
        M = self.mora_M.data
        xp = backend.xp_of(M)
        if self.mora_type == "truncation":
            dW = xp.zeros((self.m, self.n), dtype=M.dtype)
            dW[:self.r_hat, :self.r_hat] = M
            return dW
        K = self.core()
        rows = xp.take(K, backend.asarray([o % K.shape[0] for o in range(self.m)], "int64"), axis=0)  # D K (out, g r̂)
        folds = -(-K.shape[1] // self.n)  # P: column p of D K adds to column p mod in
        padded = xp.concat([rows, xp.zeros((self.m, folds * self.n - K.shape[1]), dtype=M.dtype)], axis=1)
        return xp.sum(xp.reshape(padded, (self.m, folds, self.n)), axis=1)


register("mora", MoRAConfig, MoRALinear, in_peft=False,
         paper="MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning, Jiang, Huang et al. 2024, "
               "arXiv:2405.12130",
         summary="MoRA, dW = f_decomp(M f_comp(x)) with one square M (r̂, r̂), r̂ = floor(sqrt((in + out) r)), and "
                 "non-parametric compress/decompress (truncation, sharing, reshape, rope) (spec/mora.md).")
