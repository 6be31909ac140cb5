"""BOFT: Orthogonal Butterfly, as PEFT 0.21.2 implements it. Liu, Qiu, Feng, Xiu, Xue, Yu, Feng, Liu, Heo, Peng,
Wen, Black, Weller, Schoelkopf 2023, "Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization",
arXiv:2311.06243; spec/boft.md.

Symbols: W0 (out, in) frozen base weight, b0 its bias, x (..., in); f the number of butterfly factors, b the block
    size, D = in / b the number of blocks; A (f, D, b, b) the trainable blocks (PEFT's boft_R), s (out, 1) the
    trainable scale (PEFT's boft_s).
Sizes (BOFT-1): exactly one of boft_block_size / boft_block_num is non-zero, the other is in / it; it must divide
    in; with f > 1, b 2^(f-1) must divide in, and b and D must be even (ConfigError naming the layer).
Blocks (BOFT-2): Q_kd = (A_kd - A_kd^T) / 2, R_kd = Cayley(Q_kd) = (I - Q_kd)(I + Q_kd)^-1 (OFT's exact Cayley).
Butterfly (BOFT-3): B_k = blockdiag(R_k1..R_kD) (in, in); P_k the permutation matrix of PEFT's
    block_butterfly_perm(in, D / 2^k, b / 2, f - 1) (P_0 = I); R = M_{f-1} ... M_1 M_0 with M_k = P_k B_k P_k^T.
Forward (BOFT-4): h = s * (W0 (R^T x)) + b0: x (row) -> x R, the base layer, then (y - b0) * s + b0.
Init (BOFT-5): A = 0, s = 1: R = I and h = base. init="random" (PEFT init_weights=False): A ~ N(0, 0.1),
    s ~ N(1, 0.1).
Dropout (BOFT-6): in training, in one factor k drawn at random, int(p D) random blocks use R_kd = I.
Merge (BOFT-7): W <- diag(s) W0 R^T (PEFT's W^T <- R W^T, then * s); unmerge W <- diag(1/s) W R.
Trainable (BOFT-8): f D b^2 + out numbers per layer; bias "none" | "all" | "boft_only".
Serialization (BOFT-9): peft_type "BOFT", keys <layer>.boft_R (f, D, b, b) and <layer>.boft_s (out, 1).
Targets (BOFT-10): Linear layers; GPT-2's Conv1D is a ConfigError (PEFT's BOFT takes nn.Linear and nn.Conv2d).
PEFT parity: peft/tuners/boft/layer.py BOFTLayer.update_layer, block_butterfly_perm, perm2mat, cayley_batch,
    MultiplicativeDropoutLayer, Linear.get_delta_weight, forward, merge, unmerge.
Deviations: PEFT builds f > 1 only with its CUDA extension (fbd_cuda); without it (any CPU machine) it silently
    uses f = 1, so its file says boft_n_butterfly_factor = f but holds boft_R (1, D, b, b). minipeft builds the
    butterfly the config asks for everywhere (PEFT's CUDA-path product); such a file is refused (CheckpointError
    naming both factor counts; check_shapes); set boft_n_butterfly_factor to 1 in its adapter_config.json to read what PEFT computed.
    PEFT's Conv2d BOFT is not offered (minipeft's models have none).
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd.tensor import Tensor
from ..errors import CheckpointError
from .base import AdapterConfig, Delta, check, orient, trainable
from .oft import cayley, to_identity
from .registry import register

INITS = ("default", "random")


@dataclasses.dataclass
class BOFTConfig(AdapterConfig):
    boft_block_size: int = 4  # b (0: derived from boft_block_num)
    boft_block_num: int = 0  # D (0: derived from boft_block_size)
    boft_n_butterfly_factor: int = 1  # f
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    init: str = "default"  # one of INITS (BOFT-5)
    bias: str = "none"  # "none" | "all" | "boft_only"

    peft_type = "BOFT"
    PEFT_FIELDS = {"boft_block_size": "boft_block_size", "boft_block_num": "boft_block_num",
                   "boft_n_butterfly_factor": "boft_n_butterfly_factor", "boft_dropout": "boft_dropout",
                   "init": "init_weights", "bias": "bias"}
    PEFT_VALUES = {"init": {"default": True, "random": False}}

    def validate(self):
        for field in ("boft_block_size", "boft_block_num"):
            check(getattr(self, field) >= 0, field, getattr(self, field), "must be an integer >= 0")
        check((self.boft_block_size != 0) != (self.boft_block_num != 0), "boft_block_size / boft_block_num",
              (self.boft_block_size, self.boft_block_num),
              "set exactly one of them (boft_block_size x boft_block_num = in_features)")
        check(self.boft_n_butterfly_factor >= 1, "boft_n_butterfly_factor", self.boft_n_butterfly_factor,
              "must be a positive integer (1 is OFT's single block-diagonal factor)")
        check(0.0 <= self.boft_dropout < 1.0, "boft_dropout", self.boft_dropout, "must be in [0, 1)")
        check(self.init in INITS, "init", self.init, f"use one of {', '.join(INITS)}")
        check(self.bias in ("none", "all", "boft_only"), "bias", self.bias, "use 'none', 'all' or 'boft_only'")

    def sizes_for(self, n: int, path: str = "") -> tuple:  # BOFT-1: (f, D, b) for in_features n
        f, where = self.boft_n_butterfly_factor, f"(for {path or 'a layer'})"
        field = "boft_block_size" if self.boft_block_size else "boft_block_num"
        given = self.boft_block_size or self.boft_block_num
        check(given <= n and n % given == 0, f"{field} {where}", given, f"must divide the layer's in_features = {n}")
        b = self.boft_block_size or n // self.boft_block_num
        if f > 1:
            span = b * 2 ** (f - 1)  # the widest factor's blocks
            check(n % span == 0, f"boft_n_butterfly_factor {where}", f,
                  f"{f} factors need boft_block_size x 2^{f - 1} = {span} to divide in_features = {n}; "
                  f"use fewer factors or a smaller block")
            check(b % 2 == 0 and (n // b) % 2 == 0, f"{field} {where}", given,
                  f"with boft_n_butterfly_factor > 1 the block size ({b}) and the number of blocks ({n // b}) "
                  "must both be even")
        return f, n // b, b

    def trainable_count(self, layers: dict, mc) -> int:
        """BOFT-8: f D b^2 + out per layer."""
        total = 0
        for p, (n, m) in layers.items():
            f, D, b = self.sizes_for(n, p)
            total += f * D * b * b + m
        return total


def butterfly_perm(n: int, blocks: int, r: int) -> list:
    """PEFT's block_butterfly_perm(n, blocks, r): within each run of n / blocks indices, the chunks of r taken
    even ones first, then odd ones."""
    size = n // blocks
    order = [c * r + j for c in list(range(0, size // r, 2)) + list(range(1, size // r, 2)) for j in range(r)]
    return [start + o for start in range(0, n, size) for o in order]


def perm_matrix(perm: list):
    """P (n, n) with P[i, perm[i]] = 1 (PEFT's perm2mat)."""
    xp = backend.xp()
    return xp.take(xp.eye(len(perm), dtype=backend.dtype("float32")), xp.asarray(perm), axis=0)


class BOFTLinear(Delta):
    def __init__(self, n: int, m: int, sizes: tuple, cfg: BOFTConfig, rng):
        self.n, (self.f, self.D, self.b) = n, sizes
        self.cfg, self.rng = cfg, rng
        xp, dt = backend.xp(), backend.dtype("float32")
        self.boft_R = trainable(xp.zeros((self.f, self.D, self.b, self.b), dtype=dt))  # BOFT-5: A = 0
        self.boft_s = trainable(xp.ones((m, 1), dtype=dt))  # s = 1
        # BOFT-3: P_k for k >= 1 (P_0 = I); PEFT builds them with f - 1 butterfly factors
        self.P = [Tensor(perm_matrix(butterfly_perm(n, self.D // 2 ** k, self.b // 2))) for k in range(1, self.f)]

    @classmethod
    def create(cls, base, cfg: BOFTConfig, path: str, rng, init_weights: bool = True):
        check(not base.fan_in_fan_out, f"target_modules (for {path})", "Conv1D",
              "PEFT's BOFT adapts torch.nn.Linear and Conv2d only (not GPT-2's Conv1D), so the file could not be "
              "read there")
        delta = cls(base.in_features, base.out_features, cfg.sizes_for(base.in_features, path), cfg, rng)
        if init_weights and cfg.init == "random":  # BOFT-5
            delta.boft_R.data = rng.normal(delta.boft_R.shape, std=0.1)
            delta.boft_s.data = rng.normal(delta.boft_s.shape, std=0.1) + 1.0
        return delta

    def check_shapes(self, loaded: dict, key: str, where: str):  # BOFT-9: PEFT's one-factor fallback
        got = loaded.get(key + "boft_R")
        if got is not None and len(got.shape) == 4 and got.shape[0] != self.f and \
                tuple(got.shape[1:]) == (self.D, self.b, self.b):
            raise CheckpointError(
                f"{where}: {key}boft_R holds {got.shape[0]} butterfly factor(s), shape {tuple(got.shape)}, but "
                f"adapter_config.json's field boft_n_butterfly_factor={self.f} gives shape {tuple(self.boft_R.shape)}: PEFT "
                "without its CUDA extension (fbd_cuda) builds one factor whatever the config says; set "
                f"boft_n_butterfly_factor to {got.shape[0]} in adapter_config.json to read what PEFT computed")

    def blocks(self, dropout: bool) -> Tensor:  # BOFT-2, BOFT-6: R_kd (f, D, b, b)
        A = self.boft_R.reshape(self.f * self.D, self.b, self.b)
        R = cayley((A - A.transpose(1, 2)) * 0.5, exact=True, terms=0)  # the series' terms unused
        p = self.cfg.boft_dropout
        if dropout and self.training and p > 0:  # BOFT-6: one factor, int(p D) of its blocks
            k = self.rng.integer(0, self.f - 1)
            R = to_identity(R, {k * self.D + int(i) for i in self.rng.permutation(self.D)[: int(p * self.D)]})
        return R.reshape(self.f, self.D, self.b, self.b)

    def rotation(self, dropout: bool = False) -> Tensor:  # BOFT-3: R = M_{f-1} ... M_0 (in, in)
        xp = backend.xp_of(self.boft_R.data)
        eye = Tensor(xp.reshape(xp.eye(self.n, dtype=self.boft_R.data.dtype), (self.n, self.D, 1, self.b)))
        Rk = self.blocks(dropout)
        R = None
        for k in range(self.f):
            B = (eye @ Rk[k]).reshape(self.n, self.n)  # blockdiag(R_k1..R_kD): row j of I times the blocks
            M = B if k == 0 else self.P[k - 1] @ B @ self.P[k - 1].T
            R = M if R is None else M @ R
        return R

    def adapt_input(self, x):  # BOFT-4: x R
        return x @ self.rotation(dropout=True)

    def adapt(self, x, y, base):  # (y - b0) * s + b0
        s = self.boft_s.reshape(self.boft_s.shape[0])
        return y * s if base.bias is None else (y - base.bias) * s + base.bias

    def merge_into(self, base):  # BOFT-7: diag(s) W0 R^T
        xp = backend.xp_of(base.weight.data)
        R = self.rotation().data
        base.weight.data = orient(xp.matmul(base.weight_out_in(), xp.matrix_transpose(R)) * self.boft_s.data, base)

    def unmerge_from(self, base):  # diag(1/s) W R
        xp = backend.xp_of(base.weight.data)
        base.weight.data = orient(xp.matmul(base.weight_out_in(), self.rotation().data) / self.boft_s.data, base)


register("boft", BOFTConfig, BOFTLinear,
         paper="Parameter-Efficient Orthogonal Finetuning via Butterfly Factorization, Liu et al. 2023, "
               "arXiv:2311.06243",
         summary="BOFT, x -> x R with R a butterfly product of block-diagonal Cayley-orthogonal factors, "
                 "output rows scaled by s (spec/boft.md).")
