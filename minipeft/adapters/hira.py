"""HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models (Huang, Ko, Zhuang, Tang, Zhang,
ICLR 2025, openreview TwJrTz9cRS), spec/hira.md.

Symbols: W0 (out, in) frozen base weight, b its bias, A (r, in), B (out, r), x (..., in); ⊙ elementwise.
Update (HIRA-1): dW = W0 ⊙ (B A). Its rank can reach rank(W0) · r, not r: the Hadamard product with W0 lifts
    a rank-r factor to a high-rank update (HIRA-5).
Forward (HIRA-2): h = W0 x + b + (W0 ⊙ (B A)) dropout(x); no scaling factor (PEFT has none either).
Init (HIRA-3): "default": A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a = sqrt 5), B = 0, so h = W0 x + b
    at step 0; "gaussian": A ~ N(0, 1/r²) (PEFT's std = 1/r), B = 0; "random": A, B ~ N(0, 1) (PEFT's
    init_weights=False, for tests).
Merge (HIRA-4): W <- W0 + W0 ⊙ (B A); unmerge puts back the W0 kept at merge time (PEFT keeps it the same way:
    dividing by 1 + B A would fail where an entry of B A is -1).
Trainable (HIRA-6): A and B, r (in + out) per layer; W0 and b get no gradient. One rank for every layer: PEFT
    0.21.2 saves rank_pattern but builds every HiRA layer at r (its dispatch_default reads hira_config.r), so a
    PEFT folder with a rank_pattern holds rank-r tensors; minipeft has no rank_pattern and warns on reading one.
Serialization (HIRA-7): peft_type "HIRA", keys <layer>.hira_A (r, in), <layer>.hira_B (out, r), PEFT's fields
    r, hira_dropout, init_weights.
PEFT parity: peft/tuners/hira/layer.py Linear.forward (F.linear(dropout(x), W ⊙ (A^T B^T)^T)), _merge, _unmerge;
    GPT-2's Conv1D stores W transposed: the product is taken with W as (out, in).
Deviations: a 4-bit base is refused (PEFT has a bitsandbytes HiRA layer). Several HiRA adapters merged into one
    layer: each multiplies the weight as it stands when it is merged (PEFT: the weight before the first merge).
"""
from __future__ import annotations

import dataclasses
import warnings

from .. import backend
from ..autograd import functional as F
from ..autograd.tensor import Tensor
from ..nn.layers import Linear
from .base import AdapterConfig, Delta, check, fan_in_uniform, orient, trainable
from .registry import register

INITS = ("default", "gaussian", "random")


@dataclasses.dataclass
class HiRAConfig(AdapterConfig):
    rank: int = 32  # PEFT's default r
    dropout: float = 0.0
    init: str = "default"  # one of INITS (HIRA-3)

    peft_type = "HIRA"
    PEFT_FIELDS = {"rank": "r", "dropout": "hira_dropout", "init": "init_weights"}
    PEFT_VALUES = {"init": {"default": True, "random": False}}

    def validate(self):
        check(isinstance(self.rank, int) and self.rank > 0, "rank", self.rank, "must be a positive integer")
        check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, "dropout", self.dropout,
              "must be in [0, 1)")
        check(self.init in INITS, "init", self.init, f"use one of {', '.join(INITS)}")

    @classmethod
    def from_peft(cls, d: dict):
        if d.get("rank_pattern"):  # HIRA-6: PEFT 0.21.2 saved it and built every layer at r
            warnings.warn(f"adapter_config.json: HiRA's rank_pattern {d['rank_pattern']!r} is ignored: PEFT 0.21.2 "
                          f"builds every HiRA layer at r={d.get('r')} (and saves rank-r tensors), and so does minipeft",
                          stacklevel=2)
        return super().from_peft(d)

    def trainable_count(self, layers: dict, mc) -> int:
        """HIRA-6: r (in + out) per layer."""
        return sum(self.rank * (n + m) for n, m in layers.values())


class HiRALinear(Delta):
    def __init__(self, A, B, dropout, rng):
        self.p, self.rng = dropout, rng
        self.hira_A = trainable(A)  # (r, in)
        self.hira_B = trainable(B)  # (out, r)
        self.w0 = None  # W0 as stored, kept while merged (HIRA-4)

    @classmethod
    def create(cls, base, cfg: HiRAConfig, path: str, rng, init_weights: bool = True):
        check(isinstance(base, Linear), f"target_modules (for {path})", type(base).__name__,
              "HiRA multiplies W0 elementwise and needs a float Linear base; load the model unquantized")
        r, n, m = cfg.rank, base.in_features, base.out_features
        xp = backend.xp_of(base.weight.data)
        f32 = backend.dtype("float32", xp)
        B = xp.zeros((m, r), dtype=f32)
        if not init_weights:  # a load fills both
            A = xp.zeros((r, n), dtype=f32)
        elif cfg.init == "default":
            A = fan_in_uniform(rng, (r, n), n)
        elif cfg.init == "gaussian":
            A = rng.normal((r, n), std=1.0 / r)
        else:  # "random"
            A, B = rng.normal((r, n)), rng.normal((m, r))
        return cls(A, B, cfg.dropout, rng)

    def update(self, base):  # HIRA-1: W0 ⊙ (B A), a Tensor (out, in) with gradients to A and B
        return Tensor(base.weight_out_in()) * (self.hira_B @ self.hira_A)

    def adapt(self, x, y, base):  # HIRA-2
        h = F.dropout(x, self.p, self.rng, self.training)
        return y + F.linear(h, self.update(base))

    def delta_weight_of(self, base):
        xp = backend.xp_of(self.hira_A.data)
        return base.weight_out_in() * xp.matmul(self.hira_B.data, self.hira_A.data)

    def merge_into(self, base):  # HIRA-4
        self.w0 = base.weight.data
        base.weight.data = base.weight.data + orient(self.delta_weight_of(base), base)

    def unmerge_from(self, base):
        if self.w0 is not None:
            base.weight.data, self.w0 = self.w0, None


register("hira", HiRAConfig, HiRALinear,
         paper="HiRA: Parameter-Efficient Hadamard High-Rank Adaptation for Large Language Models, Huang, Ko, Zhuang, "
               "Tang, Zhang, ICLR 2025 (openreview TwJrTz9cRS)",
         summary="HiRA, dW = W0 ⊙ (B A) with A (r, in), B (out, r) trained: a high-rank update (spec/hira.md).")
