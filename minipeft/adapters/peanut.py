"""PEANuT: Parameter-Efficient Adaptation with Weight-aware Neural Tweakers (Zhong, Jiang, Li, Nakada, Liu,
Zhang, Yao, Wang, arXiv:2410.01870), as PEFT 0.21.2's PEANUT tuner; spec/peanut.md.

Symbols: W0 (out, in) = (m, n) frozen base weight, b its bias, x (..., n); r the hidden width, L = depth;
    A (r, m), E_1..E_L (r, r), D_1..D_L (r, r), B (m, r) trained (PEFT's peanut_A.weight, peanut_encoders.<i>.weight,
    peanut_decoders.<i>.weight, peanut_B.weight); sigma the activation act_fn; s = scaling.
Tweaker (PEANUT-1): H_0 = sigma(W0^T A^T) (n, r); encoder i = 1..L: H_i = sigma(H_{i-1} E_i^T);
    decoder i = 1..L: G_0 = H_L, G_i = sigma(G_{i-1} D_i^T) + H_{L-i}; f(W0) = G_L B^T (n, m).
Delta weight (PEANUT-2): dW = s f(W0)^T (m, n): a function of the frozen weight, not a fixed low-rank product.
Forward (PEANUT-3): h = W0 x + b + dW x, with dW rebuilt from W0 at every call (no dropout, as PEFT).
Init (PEANUT-4): A, E_i, D_i ~ U(+-1/sqrt(fan_in)) (kaiming-uniform, a = sqrt 5; fan_in m for A, r for E, D);
    init_weights=True: B = 0, so h = W0 x + b at step 0; False: B ~ U(+-1/sqrt(r)) too.
Merge (PEANUT-5): W <- W0 + dW(W0); unmerge puts back the W0 kept at merge time.
Trainable (PEANUT-6): A, B, E_i, D_i: 2 r m + 2 L r^2 per layer; W0 and b get no gradient.
Activations (PEANUT-7): act_fn is an HF ACT2FN name; the ones written here are ACTIVATIONS' keys.
Serialization (PEANUT-8): peft_type "PEANUT"; keys <layer>.peanut_A.weight (r, m), .peanut_B.weight (m, r),
    .peanut_encoders.<i>.weight (r, r), .peanut_decoders.<i>.weight (r, r), i = 0..L-1; fields r, depth, act_fn,
    scaling, init_weights.
PEFT parity: peft/tuners/peanut/layer.py Linear._compute_delta_weight, forward, merge, unmerge;
    reset_peanut_parameters.
Deviations: ACT2FN names outside ACTIVATIONS are a ConfigError. Several PEANuT adapters merged into one layer: each
    reads the weight as it stands when it is merged (PEFT: the weight before the first merge). Draws come from
    minipeft's RNG, not torch's.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd import functional as F
from ..autograd.function import no_grad
from ..autograd.tensor import Tensor
from ..nn.module import ModuleList
from .base import AdapterConfig, Delta, check, check_peft_linear, fan_in_uniform
from .gralora import general_factor
from .hira import HiRALinear
from .registry import register


def _step(x, lo: float = 0.0):
    """A constant Tensor: 1 where x > 0, lo elsewhere (relu's derivative is 0 at 0, as torch's)."""
    xp = backend.xp_of(x.data)
    return Tensor(xp.where(x.data > 0, xp.asarray(1.0, dtype=x.data.dtype), xp.asarray(lo, dtype=x.data.dtype)))


def _sigmoid(x):
    return 1.0 / ((-x).exp() + 1.0)


# PEANUT-7: HF ACT2FN names -> the function of a Tensor
ACTIVATIONS = {
    "relu": lambda x: x * _step(x),
    "leaky_relu": lambda x: x * _step(x, 0.01),  # torch's negative_slope 0.01
    "relu2": lambda x: (x * _step(x)) * (x * _step(x)),
    "silu": F.silu, "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, "tanh"), "gelu_pytorch_tanh": lambda x: F.gelu(x, "tanh"),
    "quick_gelu": lambda x: x * _sigmoid(x * 1.702),
    "sigmoid": _sigmoid,
    "tanh": lambda x: _sigmoid(x * 2.0) * 2.0 - 1.0,
    "linear": lambda x: x,
}


@dataclasses.dataclass
class PEANuTConfig(AdapterConfig):
    rank: int = 32  # r, PEFT's default
    depth: int = 0  # L encoder / decoder pairs between A and B
    act_fn: str = "relu"  # sigma, one of ACTIVATIONS (PEANUT-7)
    scaling: float = 1.0  # s
    init_weights: bool = True  # True: B = 0 (the base); False: B kaiming too

    peft_type = "PEANUT"
    PEFT_FIELDS = {"rank": "r", "depth": "depth", "act_fn": "act_fn", "scaling": "scaling",
                   "init_weights": "init_weights"}
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "exclude_modules")

    def validate(self):
        check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0, "rank", self.rank,
              "must be a positive integer (PEFT's r)")
        check(isinstance(self.depth, int) and not isinstance(self.depth, bool) and self.depth >= 0, "depth",
              self.depth, "must be a non-negative integer (0: A and B only)")
        check(self.act_fn in ACTIVATIONS, "act_fn", self.act_fn, f"use one of {', '.join(ACTIVATIONS)}")
        check(isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool), "scaling", self.scaling,
              "must be a number")
        check(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "must be True or False")

    def trainable_count(self, layers: dict, mc) -> int:
        """PEANUT-6: 2 r m + 2 L r^2 per layer."""
        r, L = self.rank, self.depth
        return sum(2 * r * m + 2 * L * r * r for _, m in layers.values())


class PEANuTLinear(Delta):
    def __init__(self, A, B, encoders, decoders, act_fn: str, scaling: float):
        self.act, self.s = act_fn, scaling
        self.peanut_A = general_factor(*A.shape, A)  # (r, m)
        self.peanut_B = general_factor(*B.shape, B)  # (m, r)
        self.peanut_encoders = ModuleList(general_factor(*E.shape, E) for E in encoders)  # L x (r, r)
        self.peanut_decoders = ModuleList(general_factor(*D.shape, D) for D in decoders)  # L x (r, r)
        self.w0 = None  # W0 as stored, kept while merged (PEANUT-5)

    @classmethod
    def create(cls, base, cfg: PEANuTConfig, path: str, rng, init_weights: bool = True):
        check_peft_linear(base, path, "PEANUT", "PEANuT")
        r, m, L = cfg.rank, base.out_features, cfg.depth
        xp = backend.xp_of(base.weight.data)
        f32 = backend.dtype("float32", xp)
        if not init_weights:  # a load fills them
            zeros = [xp.zeros(shape, dtype=f32) for shape in [(r, m), (m, r)] + [(r, r)] * (2 * L)]
            return cls(zeros[0], zeros[1], zeros[2:2 + L], zeros[2 + L:], cfg.act_fn, cfg.scaling)
        A = fan_in_uniform(rng, (r, m), m)  # PEANUT-4
        E = [fan_in_uniform(rng, (r, r), r) for _ in range(L)]
        D = [fan_in_uniform(rng, (r, r), r) for _ in range(L)]
        B = xp.zeros((m, r), dtype=f32) if cfg.init_weights else fan_in_uniform(rng, (m, r), r)
        return cls(A, B, E, D, cfg.act_fn, cfg.scaling)

    def update(self, W0):  # PEANUT-1, PEANUT-2: dW = s f(W0)^T, a Tensor (m, n) with gradients to every leaf
        sigma = ACTIVATIONS[self.act]
        H = sigma(Tensor(W0).T @ self.peanut_A.weight.T)  # (n, r)
        kept = []
        for E in self.peanut_encoders:
            kept.append(H)
            H = sigma(H @ E.weight.T)  # (n, r)
        for D, H_skip in zip(self.peanut_decoders, reversed(kept)):
            H = sigma(H @ D.weight.T) + H_skip  # (n, r)
        return (H @ self.peanut_B.weight.T).T * self.s  # (m, n)

    def adapt(self, x, y, base):  # PEANUT-3
        return y + F.linear(x, self.update(base.weight_out_in()))

    def delta_weight(self):
        raise NotImplementedError("PEANuT's dW is a function of W0: use delta_weight_of(base)")

    def delta_weight_of(self, base):
        with no_grad():
            return self.update(base.weight_out_in()).data

    merge_into = HiRALinear.merge_into  # PEANUT-5: W <- W0 + dW(W0), W0 kept for an exact unmerge (as HIRA-4)
    unmerge_from = HiRALinear.unmerge_from


register("peanut", PEANuTConfig, PEANuTLinear,
         paper="PEANuT: Parameter-Efficient Adaptation with Weight-aware Neural Tweakers, Zhong, Jiang, Li, Nakada, "
               "Liu, Zhang, Yao, Wang, arXiv:2410.01870",
         summary="PEANuT, dW = s f(W0)^T: a small network A, encoders, decoders, B of the frozen weight "
                 "(spec/peanut.md).")
