"""LoRETTA: Low-Rank Economic Tensor-Train Adaptation for Ultra-Low-Parameter Fine-Tuning of Large Language
Models (Yang, Zhou, Wong, Zhang, NAACL 2024, arXiv:2402.11417), spec/loretta.md. Both of the paper's methods,
chosen by `variant`: "rep" (LoRETTA_rep, LoRA's A and B as tensor trains) and "adp" (LoRETTA_adp, tensorised
bottleneck adapters).

Symbols: W0 (out, in) frozen base weight, b its bias, x (..., in); a TT of a (P, Q) matrix has shape (k_1..k_d),
    k_1 ... k_d = P Q, TT-ranks r_0 = r_d = 1, r_1 = ... = r_{d-1} = tensor_rank, cores G_i (r_{i-1}, k_i, r_i).
TT (LORETTA-1): T(i_1, ..., i_d) = G_1[i_1] G_2[i_2] ... G_d[i_d], read row-major as the (P, Q) matrix.
Shapes (LORETTA-2): (k_1..k_d) of a matrix with a side `size` and the other r (rep) or the bottleneck c (adp):
    tensor_shapes[size], else the authors' table TT_SHAPES[r or c][size], else tt_shape(size r): the prime
    factors of size r dealt into round(log_8(size r)) factors.
Size (LORETTA-3): a TT holds Σ_i r_{i-1} k_i r_i numbers; rep: TT(A) + TT(B) per layer; adp: TT(D) + TT(U)
    + c + size (the two biases).
Init (LORETTA-4): G_i ~ N(0, σ^(2/d) / r_i), σ² = 1 / (P + Q), so each entry of the matrix has variance σ²;
    adp biases ~ U(±1/√Q); dW != 0 (the authors' code). zero_init: the last core of B (rep) or of U and U's bias
    start at 0, so h = W0 x + b at init.
Rep forward (LORETTA-5): h = W0 x + b + s (dropout(x) A) B, A = TT_A as (in, r), B = TT_B as (r, out),
    s = alpha / r.
Rep merge (LORETTA-6): W <- W0 + s (A B)^T; unmerge subtracts it.
Adp forward (LORETTA-7): a(z) = c (f(dropout(z) D + b_D) U + b_U), D = TT_D as (size, c), U = TT_U as (c, size),
    f = non_linearity; output side (size = out): h = y + a(y), y = W0 x + b; input side (input_modules,
    size = in): h = W0 (x + a(x)) + b.
Adp merge (LORETTA-8): refused (f is not linear): a ConfigError naming the layer.
Trainable (LORETTA-9): the TT cores (and adp's two biases) only.
Serialization (LORETTA-10): peft_type "MINIPEFT_LORETTA"; keys <layer>.lora_A.<i>, <layer>.lora_B.<i> (rep),
    <layer>.adapter_down.<i> / .bias, <layer>.adapter_up.<i> / .bias (adp), core i (r_{i-1}, k_i, r_i).
PEFT parity: none (PEFT has no LoRETTA). The authors' code (github.com/yifanycc/loretta, loretta/loretta/:
    tuners/loretta_rep.py, tuners/loretta_adp.py, tensor_layers/layers.py TensorizedLinear_module,
    tensor_layers/low_rank_tensors.py TensorTrain, utils/tensor_util.py) settles the shapes, init and placement.
Deviations: shapes outside the authors' table are computed (tt_shape), where their code raises KeyError; the
    norms their code also trains are left to modules_to_save; scaling="learned" is not offered.
"""
from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..autograd import functional as F
from ..autograd import no_grad
from ..errors import ConfigError
from ..nn.module import Module
from .base import AdapterConfig, Delta, check, trainable
from .lora import lora_scaling
from .prompt_learning import relu, tanh
from .registry import register

VARIANTS = ("rep", "adp")
NON_LINEARITIES = {"relu": relu, "tanh": tanh, "silu": F.silu, "gelu": F.gelu}

# the authors' utils/tensor_util.py TRANSFORMERS_HIDDEN_SIZE_TO_TENSOR_SHAPE: {r or c: {size: (k_1..k_d)}}, less its
# 8 entries whose product is not size * r (32: 1024 1280 1536 1600 4096 5120 8192; 64: 2304), which their reshape refuses
TT_SHAPES = {
    5: {768: (5, 8, 12, 8), 1024: (4, 8, 5, 8, 4), 1280: (4, 8, 5, 8, 5), 1536: (4, 8, 5, 8, 6),
        1600: (5, 8, 5, 8, 5), 2304: (5, 8, 8, 4, 9), 4096: (16, 16, 5, 4, 4), 5120: (5, 8, 10, 8, 8),
        8192: (4, 16, 16, 10, 4)},
    8: {768: (8, 8, 12, 8), 1024: (4, 8, 8, 8, 4), 1280: (4, 8, 8, 8, 5), 1536: (4, 8, 8, 8, 6),
        1600: (5, 8, 8, 8, 5), 2304: (8, 8, 8, 4, 9), 4096: (16, 16, 8, 4, 4), 5120: (8, 8, 10, 8, 8),
        8192: (4, 16, 16, 16, 4)},
    16: {768: (8, 16, 12, 8), 1024: (4, 8, 16, 8, 4), 1280: (4, 8, 16, 8, 5), 1536: (4, 8, 16, 8, 6),
         1600: (5, 8, 16, 8, 5), 2304: (8, 8, 8, 8, 9), 4096: (16, 16, 16, 4, 4), 5120: (8, 16, 10, 8, 8),
         8192: (4, 16, 16, 16, 8)},
    32: {768: (4, 8, 12, 8, 8), 2304: (8, 8, 16, 8, 9)},
    64: {768: (8, 8, 12, 8, 8), 1024: (4, 8, 8, 8, 8, 4), 1280: (4, 8, 8, 8, 8, 5), 1536: (4, 8, 8, 8, 8, 6),
         1600: (5, 8, 8, 8, 8, 5), 4096: (16, 16, 16, 4, 4, 4),
         5120: (5, 8, 8, 16, 8, 8), 8192: (4, 16, 16, 16, 8, 4)},
    128: {768: (8, 16, 12, 8, 8), 1024: (4, 8, 16, 8, 8, 4), 1280: (4, 8, 16, 8, 8, 5),
          1536: (4, 8, 16, 8, 8, 6), 1600: (5, 8, 16, 8, 8, 5), 4096: (16, 16, 16, 8, 4, 4),
          5120: (5, 8, 16, 16, 8, 8), 8192: (4, 16, 16, 16, 16, 4)},
}


@dataclasses.dataclass
class LoRETTAConfig(AdapterConfig):
    variant: str = "rep"  # "rep": LoRETTA_rep; "adp": LoRETTA_adp (the authors recommend it for most cases)
    rank: int = 8  # rep: LoRA's r (the authors' r = 8)
    alpha: float = 16  # rep: s = alpha / r (the authors' lora_alpha = 16)
    bottleneck_size: int = 64  # adp: c (the authors' 64)
    non_linearity: str = "relu"  # adp: f, one of NON_LINEARITIES (the authors' README: relu)
    scaling: float = 1.0  # adp: the adapter's output factor (the authors' 1.0)
    tensor_rank: int = 5  # r_1 = ... = r_{d-1} of every TT (the authors' 5)
    tensor_shapes: dict = dataclasses.field(default_factory=dict)  # {size: (k_1..k_d)}, over TT_SHAPES
    input_modules: tuple = ()  # adp: targets whose adapter reads the layer's input (the authors' "mh_adapter")
    dropout: float = 0.0  # on the adapter's input (rep: x; adp: z)
    zero_init: bool = False  # the last core of B (rep) or of U and b_U (adp) start at 0: h = W0 x + b at init

    peft_type = "MINIPEFT_LORETTA"
    PEFT_FIELDS = {"variant": "variant", "rank": "r", "alpha": "lora_alpha", "bottleneck_size": "bottleneck_size",
                   "non_linearity": "non_linearity", "scaling": "scaling", "tensor_rank": "tensor_rank",
                   "tensor_shapes": "tensor_shapes", "input_modules": "input_modules", "dropout": "dropout",
                   "zero_init": "zero_init"}
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "exclude_modules")
    INIT_MOVES_OUTPUT = "the authors' init draws every TT core from a Gaussian (and adp's biases uniform), so the " \
                        "update is not 0 at init (LORETTA-4); zero_init=True starts at the base"

    def __post_init__(self):
        if isinstance(self.input_modules, (list, str)):
            self.input_modules = (self.input_modules,) if isinstance(self.input_modules, str) else tuple(self.input_modules)
        self.tensor_shapes = {str(k): tuple(v) if isinstance(v, list) else v for k, v in self.tensor_shapes.items()}
        super().__post_init__()

    def validate(self):
        check(self.variant in VARIANTS, "variant", self.variant, "use 'rep' (LoRETTA_rep) or 'adp' (LoRETTA_adp)")
        for field in ("rank", "bottleneck_size", "tensor_rank"):
            v = getattr(self, field)
            check(isinstance(v, int) and v > 0, field, v, "must be a positive integer")
        check(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha", self.alpha, "must be > 0")
        check(self.non_linearity in NON_LINEARITIES, "non_linearity", self.non_linearity,
              f"use one of {', '.join(NON_LINEARITIES)}")
        check(self.scaling > 0, "scaling", self.scaling, "must be > 0")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(not self.input_modules or self.variant == "adp", "input_modules", list(self.input_modules),
              "places adapters on layer inputs, which only variant 'adp' has; leave it empty for 'rep'")
        for size, shape in self.tensor_shapes.items():
            check(size.isdigit() and isinstance(shape, tuple) and shape and
                  all(isinstance(k, int) and k > 0 for k in shape), f"tensor_shapes[{size!r}]", list(shape),
                  "must map a layer size to a list of positive integers (k_1..k_d)")

    def inner(self) -> int:
        """The matrix side beside the layer's size: r (rep) or c (adp)."""
        return self.rank if self.variant == "rep" else self.bottleneck_size

    def shape_for(self, size: int, where: str = "") -> tuple:
        """LORETTA-2: the TT shape of the (size, r) or (c, size) matrix."""
        r = self.inner()
        shape = self.tensor_shapes.get(str(size)) or TT_SHAPES.get(r, {}).get(size) or tt_shape(size * r)
        check(math.prod(shape) == size * r, f"tensor_shapes[{str(size)!r}]{where}", list(shape),
              f"multiplies to {math.prod(shape)}, not size * {'r' if self.variant == 'rep' else 'c'} = {size * r}")
        return tuple(shape)

    def is_input_side(self, path: str) -> bool:
        return path.rsplit(".", 1)[-1] in self.input_modules

    def trainable_count(self, layers: dict, mc) -> int:
        """LORETTA-3: Σ r_{i-1} k_i r_i per TT; rep two TTs, adp two TTs and the biases (c + size)."""
        total = 0
        for path, (n, m) in layers.items():
            if self.variant == "rep":
                total += tt_count(self.shape_for(n), self.tensor_rank) + tt_count(self.shape_for(m), self.tensor_rank)
            else:
                size = n if self.is_input_side(path) else m
                total += 2 * tt_count(self.shape_for(size), self.tensor_rank) + self.bottleneck_size + size
        return total


def tt_shape(total: int) -> tuple:
    """LORETTA-2's fallback: the prime factors of `total`, largest first, each dealt to the smallest of
    max(1, round(log_8 total)) factors (the authors' factors are mostly 4 to 16); sorted largest first."""
    primes, p, n = [], 2, total
    while p * p <= n:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    primes += [n] if n > 1 else []
    bins = [1] * max(1, round(math.log(total, 8))) if total > 1 else [1]
    for q in sorted(primes, reverse=True):
        bins[bins.index(min(bins))] *= q
    return tuple(sorted((k for k in bins if k > 1), reverse=True)) or (1,)


def tt_ranks(d: int, rank: int) -> list:
    return [1] + [rank] * (d - 1) + [1]  # r_0 = r_d = 1


def tt_count(shape, rank: int) -> int:
    ranks = tt_ranks(len(shape), rank)
    return sum(ranks[i] * k * ranks[i + 1] for i, k in enumerate(shape))  # LORETTA-3


class TensorTrain(Module):
    """One tensor-train matrix (LORETTA-1): cores "0".."d-1", G_i (r_{i-1}, k_i, r_i), and an optional bias (Q,)."""

    def __init__(self, rows, cols, shape, rank, rng, bias: bool, zero_last: bool):
        self.rows, self.cols, self.d = rows, cols, len(shape)
        ranks = tt_ranks(self.d, rank)
        sigma = math.sqrt(1.0 / (rows + cols))  # LORETTA-4: the authors' target_sdv
        for i, k in enumerate(shape):
            core = rng.normal((ranks[i], k, ranks[i + 1]), std=sigma ** (1.0 / self.d) / math.sqrt(ranks[i + 1]))
            setattr(self, str(i), trainable(core * 0 if zero_last and i == self.d - 1 else core))
        if bias:
            b = rng.uniform((cols,), -1.0 / math.sqrt(cols), 1.0 / math.sqrt(cols))
            self.bias = trainable(b * 0 if zero_last else b)

    def matrix(self):
        """LORETTA-1: the cores contracted left to right, (k_1 .. k_i, r_i) after core i, as (P, Q)."""
        M = getattr(self, "0").reshape(-1, getattr(self, "0").shape[2])  # (k_1, r_1)
        for i in range(1, self.d):
            G = getattr(self, str(i))  # (r_{i-1}, k_i, r_i)
            M = (M @ G.reshape(G.shape[0], -1)).reshape(-1, G.shape[2])  # (k_1 .. k_i, r_i)
        return M.reshape(self.rows, self.cols)  # (P, Q)

    def forward(self, z):
        out = z @ self.matrix()  # (..., Q)
        return out + self.bias if hasattr(self, "bias") else out


class LoRETTALinear(Delta):
    def __init__(self, n, m, cfg: LoRETTAConfig, path: str, rng):
        self.variant, self.n, self.m, self.path = cfg.variant, n, m, path
        self.p, self.rng = cfg.dropout, rng
        where = f" (for {path})"
        if cfg.variant == "rep":
            r = cfg.rank
            self.s = lora_scaling(cfg.alpha, r, False)
            self.lora_A = TensorTrain(n, r, cfg.shape_for(n, where), cfg.tensor_rank, rng, False, False)  # (in, r)
            self.lora_B = TensorTrain(r, m, cfg.shape_for(m, where), cfg.tensor_rank, rng, False, cfg.zero_init)
        else:
            c, size = cfg.bottleneck_size, n if cfg.is_input_side(path) else m
            self.input_side, self.s, self.non_linearity = cfg.is_input_side(path), cfg.scaling, cfg.non_linearity
            shape = cfg.shape_for(size, where)
            self.adapter_down = TensorTrain(size, c, shape, cfg.tensor_rank, rng, True, False)  # D (size, c), b_D (c,)
            self.adapter_up = TensorTrain(c, size, shape, cfg.tensor_rank, rng, True, cfg.zero_init)  # U (c, size)

    @classmethod
    def create(cls, base, cfg: LoRETTAConfig, path: str, rng, init_weights: bool = True):
        return cls(base.in_features, base.out_features, cfg, path, rng)

    def adapter(self, z):  # LORETTA-7: a(z) = c (f(dropout(z) D + b_D) U + b_U)
        h = F.dropout(z, self.p, self.rng, self.training)
        return self.adapter_up(NON_LINEARITIES[self.non_linearity](self.adapter_down(h))) * self.s

    def adapt_input(self, x):
        return x + self.adapter(x) if self.variant == "adp" and self.input_side else x

    def adapt(self, x, y, base):
        if self.variant == "rep":  # LORETTA-5
            h = F.dropout(x, self.p, self.rng, self.training)
            return y + (h @ self.lora_A.matrix()) @ self.lora_B.matrix() * self.s  # (..., out)
        return y if self.input_side else y + self.adapter(y)

    def mergeable_into(self, base) -> bool:
        return self.variant == "rep"

    def merge_into(self, base):
        if self.variant == "adp":  # LORETTA-8
            raise ConfigError(f"LoRETTA_adp at {self.path}: its adapter applies a non-linearity to the layer's "
                              "output (or input), which no weight matrix can hold; keep it unmerged, or train "
                              "variant='rep', whose update merges")
        super().merge_into(base)

    def delta_weight(self):  # LORETTA-6: s (A B)^T, (out, in)
        with no_grad():
            AB = (self.lora_A.matrix() @ self.lora_B.matrix()).data  # (in, out)
        return backend.xp_of(AB).matrix_transpose(AB) * self.s


register("loretta", LoRETTAConfig, LoRETTALinear, in_peft=False,
         paper="LoRETTA: Low-Rank Economic Tensor-Train Adaptation for Ultra-Low-Parameter Fine-Tuning of Large "
               "Language Models, Yang, Zhou, Wong, Zhang 2024 (NAACL), arXiv:2402.11417",
         summary="LoRETTA, tensor-train adapters: variant 'rep' trains LoRA's A and B as tensor trains (dW = s (A B)^T), "
                 "'adp' tensorised bottleneck adapters h = y + c (f(y D + b_D) U + b_U) (spec/loretta.md).")
