"""What LoHa (loha.py) and LoKr (lokr.py) share: PEFT's LycorisConfig / LycorisLayer, without the rest.

Config: rank r and alpha, with per-module rank_pattern / alpha_pattern (LoRA's rule, LORA-2);
    rank_dropout, module_dropout; init_weights (PEFT's values; each method maps them to the leaves
    it zeroes).
Scaling (LOHA-2, LOKR-2): s = alpha / r.
Training-time dropouts (LOHA-4, LOKR-5): the adapter's output term t (..., out) becomes
    0                          with probability module_dropout (one draw per call), else
    t * m                      m (out,) = [u_i > rank_dropout], u_i ~ U(0, 1), one draw per call;
                               divided by mean(m) (LoHa always, LoKr with rank_dropout_scale).
    PEFT applies m to the rows of dW before x dW^T, which is the same as scaling t's columns.
Init: each leaf is zero or kaiming-uniform(a=sqrt 5), U(-1/sqrt(cols), 1/sqrt(cols)) for a (rows, cols) leaf.
PEFT parity: peft/tuners/lycoris_utils.py (LycorisConfig, LycorisLayer.merge/unmerge), the
    rank-dropout lines of get_delta_weight and the module-dropout test of forward in
    peft/tuners/loha/layer.py and peft/tuners/lokr/layer.py.
Deviations: when every row is dropped, PEFT divides 0 by mean(m) = 0 and gets NaN; here the term is 0.
    The random draws come from minipeft's RNG (NumPy PCG64), not torch's.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd.tensor import Tensor
from .base import AdapterConfig, Delta, check, fan_in_uniform, trainable
from .lora import LoRAConfig, check_rank_alpha


@dataclasses.dataclass
class LycorisConfig(AdapterConfig):
    rank: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0  # drop rows of dW (output features) in training
    module_dropout: float = 0.0  # skip the whole adapter in training
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    init_weights: bool | str = True  # a key of the method's ZEROED table

    PEFT_COMMON = AdapterConfig.PEFT_COMMON[:-1]  # PEFT's LoHa/LoKr configs have no fan_in_fan_out
    PEFT_FIELDS = {"rank": "r", "alpha": "alpha", "rank_dropout": "rank_dropout", "module_dropout": "module_dropout",
                   "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern", "init_weights": "init_weights"}
    ZEROED = {}  # init_weights value -> names of the leaves it sets to zero (the rest: kaiming)

    def validate(self):
        check_rank_alpha(self)
        for field, closed in (("rank_dropout", False), ("module_dropout", True)):
            v = getattr(self, field)
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            rule = "must be in [0, 1]" if closed else "must be in [0, 1)"
            check(number and 0.0 <= v and (v <= 1 if closed else v < 1), field, v, rule)
        known = any(self.init_weights is k or (isinstance(k, str) and self.init_weights == k) for k in self.ZEROED)
        check(known, "init_weights", self.init_weights, f"use one of {', '.join(map(repr, self.ZEROED))}")

    rank_alpha_for = LoRAConfig.rank_alpha_for  # (r, alpha) of one module: LoRA's pattern rule

    def trainable_count(self, layers: dict, mc) -> int:
        return sum(self.leaf_count(self.rank_alpha_for(p)[0], n, m) for p, (n, m) in layers.items())

    def leaf_count(self, r: int, n: int, m: int) -> int:
        """The numbers one layer's leaves hold, (in, out) = (n, m): the method's own rule."""
        raise NotImplementedError


def scaling(alpha, r) -> float:
    """LOHA-2 / LOKR-2, the one place the LyCORIS scaling rule is written."""
    return alpha / r


def init_leaves(delta, zeroed, rng) -> None:
    """Each leaf zero (its name in `zeroed`) or kaiming-uniform with a = sqrt 5: U(+-1/sqrt(cols))."""
    for name, t in delta.named_parameters():
        zero = backend.xp().zeros(t.shape, dtype=t.data.dtype)
        t.data = zero if name in zeroed else fan_in_uniform(rng, t.shape, t.shape[1])


class LycorisDelta(Delta):
    """Base of LoHaLinear and LoKrLinear: the dropouts around the method's own `term(x)`."""

    rescale_rank_dropout = True

    def __init__(self, s, cfg: LycorisConfig, rng):
        self.s, self.rng = s, rng
        self.rank_dropout, self.module_dropout = cfg.rank_dropout, cfg.module_dropout

    @classmethod
    def create(cls, base, cfg: LycorisConfig, path: str, rng, init_weights: bool = True):
        """The delta for the layer at `path`; init_weights=False leaves zeros for a load to fill.
        Subclasses take (in_features, out_features, r, s, cfg, rng)."""
        r, alpha = cfg.rank_alpha_for(path)
        delta = cls(base.in_features, base.out_features, r, scaling(alpha, r), cfg, rng)
        if init_weights:
            init_leaves(delta, cfg.ZEROED[cfg.init_weights], rng)
        return delta

    def leaf(self, name, shape) -> Tensor:
        t = trainable(backend.xp().zeros(shape, dtype=backend.dtype("float32")))
        setattr(self, name, t)
        return t

    def adapt(self, x, y, base):
        if self.training and self.module_dropout > 0 and float(self.rng.uniform((), 0.0, 1.0)) <= self.module_dropout:
            return y  # PEFT applies the adapter when rand > module_dropout
        t = self.term(x)  # (..., out)
        if self.training and self.rank_dropout > 0:
            t = t * Tensor(self.rank_mask(t.shape[-1]))
        return y + t

    def rank_mask(self, out):
        xp = backend.xp()
        m = xp.astype(self.rng.uniform((out,), 0.0, 1.0) > self.rank_dropout, backend.dtype("float32"))  # (out,)
        mean = float(xp.mean(m))
        return m / mean if self.rescale_rank_dropout and mean > 0 else m

    def term(self, x):
        raise NotImplementedError
