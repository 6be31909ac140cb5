"""RoAd: 2D Rotary Adaptation for Efficient Batched LLM Fine-tuning (Liao, Monz et al. 2024, arXiv:2409.00119),
as PEFT 0.21.2's RoAd tuner (peft/tuners/road), spec/road.md.

Symbols: W0 (out, in) frozen base weight, b its bias (or none), y = W0 x + b (..., out), g the group size, h = g/2.
Pairing (ROAD-1): the outputs split into groups of g; within a group element i (i < h) pairs with element i + h.
Coefficients (ROAD-2): per output j, c1_j (on the diagonal) and c2_j (on the pair):
    road_1: θ, α (out/2 each), one (θ, α) per pair: c1 = α cos θ, c2 = α sin θ, both halves of a group alike;
    road_2: θ, α (out each): c1 = α cos θ, c2 = α sin θ per element;
    road_4: θ, α (2 out each), per group [θ1 (g), θ2 (g)]: c1 = α1 cos θ1, c2 = α2 sin θ2.
Forward (ROAD-3): y' = R y with, per pair (y_i, y_{i+h}):
    y'_i = c1_i y_i - c2_i y_{i+h},  y'_{i+h} = c1_{i+h} y_{i+h} + c2_{i+h} y_i;
    for road_1/road_2 a rotation by θ scaled by α, so |(y'_i, y'_{i+h})| = α |(y_i, y_{i+h})| (ROAD-4).
Init (ROAD-5): θ = 0, α = 1 (init_weights=True): R = I, the base model; init_weights=False draws θ ~ N(0, 0.5²),
    α ~ N(1, 0.5²) (PEFT's, for tests).
Merge (ROAD-6): W0 <- R W0, b <- R b (R y = R W0 x + R b); unmerge puts back the W0 and b kept at merge time
    (PEFT multiplies by R^-1: equal up to rounding).
Trainable (ROAD-7): θ and α: out (road_1), 2 out (road_2), 4 out (road_4) numbers per layer.
Serialization (ROAD-8): peft_type "ROAD", keys <layer>.road_theta, <layer>.road_alpha (1-D), fields variant,
    group_size, init_weights, target_modules, modules_to_save; default targets q_proj, v_proj (PEFT's mapping).
PEFT parity: peft/tuners/road/layer.py _prepare_cols, _apply_road, _get_delta_weight, Linear.merge/unmerge.
Deviations: GPT-2's Conv1D is refused (PEFT supports torch.nn.Linear only); a 4-bit base adapts but does not merge.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd.function import Function
from ..autograd.tensor import Tensor
from ..errors import ConfigError
from ..nn.layers import Linear
from .base import AdapterConfig, Delta, check, put_back, trainable
from .registry import register

VARIANTS = {"road_1": 1, "road_2": 2, "road_4": 4}  # variant -> numbers of θ (and of α) per 2 outputs


@dataclasses.dataclass
class RoadConfig(AdapterConfig):
    variant: str = "road_1"
    group_size: int = 64  # PEFT's default; every targeted out_features must be a multiple
    init_weights: bool = True  # ROAD-5

    peft_type = "ROAD"
    PEFT_FIELDS = {"variant": "variant", "group_size": "group_size", "init_weights": "init_weights"}
    PEFT_COMMON = ("target_modules", "modules_to_save")

    def validate(self):
        check(self.variant in VARIANTS, "variant", self.variant, f"use one of {', '.join(VARIANTS)}")
        check(isinstance(self.group_size, int) and self.group_size > 0 and self.group_size % 2 == 0, "group_size",
              self.group_size, "must be a positive even integer (a group pairs its two halves)")

    def trainable_count(self, layers: dict, mc) -> int:
        """ROAD-7: θ and α, out/2, out or 2 out each per layer."""
        return sum(VARIANTS[self.variant] * m for _, m in layers.values())


def _groups(v, g: int, xp):
    """(..., out) -> (..., out/g, 2, g/2): each group's two halves, paired elementwise (ROAD-1)."""
    return xp.reshape(v, tuple(v.shape[:-1]) + (v.shape[-1] // g, 2, g // 2))


def _rotate_half(y, g: int, sign: int):
    """Per group (y1, y2) -> (-y2, y1) (sign +1, PEFT's rotate_half) or its transpose (y2, -y1) (sign -1)."""
    xp = backend.xp_of(y)
    v = _groups(y, g, xp)
    y1, y2 = v[..., 0, :], v[..., 1, :]
    pair = (-y2, y1) if sign > 0 else (y2, -y1)
    return xp.reshape(xp.stack(pair, axis=-2), y.shape)


def coefficients(variant: str, g: int, theta, alpha):
    """ROAD-2: (c1, c2), each (out,), from θ and α; also the pieces backward needs."""
    xp = backend.xp_of(theta)
    if variant == "road_4":  # per group [first g: c1's, second g: c2's]
        t, a = (xp.reshape(v, (-1, 2, g)) for v in (theta, alpha))
        c1 = xp.reshape(a[:, 0, :] * xp.cos(t[:, 0, :]), (-1,))
        c2 = xp.reshape(a[:, 1, :] * xp.sin(t[:, 1, :]), (-1,))
        return c1, c2
    if variant == "road_1":  # one (θ, α) per pair: the group's first half repeated on its second
        theta, alpha = (xp.reshape(xp.broadcast_to(xp.reshape(v, (-1, 1, g // 2)), (v.shape[0] // (g // 2), 2, g // 2)),
                                   (-1,)) for v in (theta, alpha))
    return alpha * xp.cos(theta), alpha * xp.sin(theta)


def apply_road(variant: str, g: int, theta, alpha, y):
    """ROAD-3 on arrays: y c1 + rotate_half(y) c2 along the last axis."""
    c1, c2 = coefficients(variant, g, theta, alpha)
    return y * c1 + _rotate_half(y, g, +1) * c2


class RoadRotate(Function):
    """y' = y c1 + rotate_half(y) c2 (ROAD-3). Backward: dy = g c1 + rotate_half^T(g c2); dc1 = Σ g y,
    dc2 = Σ g rotate_half(y) over the leading axes; then through ROAD-2 to θ and α."""

    def forward(self, y, theta, alpha, variant, g):
        self.y, self.theta, self.alpha, self.variant, self.g = y, theta, alpha, variant, g
        self.c = coefficients(variant, g, theta, alpha)
        return y * self.c[0] + _rotate_half(y, g, +1) * self.c[1]

    def backward(self, grad):
        xp = backend.xp_of(grad)
        y, g, (c1, c2) = self.y, self.g, self.c
        gy = grad * c1 + _rotate_half(grad * c2, g, -1) if self.needs_input_grad[0] else None
        if not (self.needs_input_grad[1] or self.needs_input_grad[2]):
            return gy, None, None
        flat = (-1, y.shape[-1])
        g1 = xp.sum(xp.reshape(grad * y, flat), axis=0)
        g2 = xp.sum(xp.reshape(grad * _rotate_half(y, g, +1), flat), axis=0)
        t, a = self.theta, self.alpha
        if self.variant == "road_4":
            t3, a3 = (xp.reshape(v, (-1, 2, g)) for v in (t, a))
            G1, G2 = (xp.reshape(v, (-1, g)) for v in (g1, g2))
            gt = xp.stack((-G1 * a3[:, 0, :] * xp.sin(t3[:, 0, :]), G2 * a3[:, 1, :] * xp.cos(t3[:, 1, :])), axis=1)
            ga = xp.stack((G1 * xp.cos(t3[:, 0, :]), G2 * xp.sin(t3[:, 1, :])), axis=1)
            return gy, xp.reshape(gt, (-1,)), xp.reshape(ga, (-1,))
        if self.variant == "road_1":  # the two halves of a group share a (θ, α): their gradients add
            g1, g2 = (xp.reshape(xp.sum(_groups(v, g, xp), axis=-2), (-1,)) for v in (g1, g2))
        s, c = xp.sin(t), xp.cos(t)
        return gy, (g2 * c - g1 * s) * a, g1 * c + g2 * s


class RoadLinear(Delta):
    MIXED_BATCH = True  # R y_rows: the rows' own outputs alone (METHOD-7)

    def __init__(self, theta, alpha, variant: str, group_size: int):
        self.road_theta = trainable(theta)
        self.road_alpha = trainable(alpha)
        self.variant, self.group_size = variant, group_size
        self.kept = None  # (W0, b) as stored, while merged (ROAD-6)

    @classmethod
    def create(cls, base, cfg: RoadConfig, path: str, rng, init_weights: bool = True):
        check(not getattr(base, "fan_in_fan_out", False), f"target_modules (for {path})", type(base).__name__,
              "RoAd adapts torch.nn.Linear layers only (PEFT's rule); GPT-2's Conv1D is not one")
        m = base.out_features
        if m % cfg.group_size:
            raise ConfigError(f"RoadConfig.group_size={cfg.group_size}: {path} has out_features={m}, not a multiple "
                              f"of it; pick a group_size dividing every targeted layer's out_features")
        size = m * VARIANTS[cfg.variant] // 2
        xp = backend.xp()
        f32 = backend.dtype("float32", xp)
        if init_weights and not cfg.init_weights:  # PEFT's init_weights=False
            theta, alpha = rng.normal((size,), std=0.5), 1.0 + rng.normal((size,), std=0.5)
        else:
            theta, alpha = xp.zeros((size,), dtype=f32), xp.ones((size,), dtype=f32)
        return cls(theta, alpha, cfg.variant, cfg.group_size)

    def adapt(self, x, y, base):  # ROAD-3
        return RoadRotate.apply(y, self.road_theta, self.road_alpha, variant=self.variant, g=self.group_size)

    def mergeable_into(self, base) -> bool:
        return isinstance(base, Linear)

    def rotate(self, v):
        """R applied along v's last axis (arrays, no gradient)."""
        return apply_road(self.variant, self.group_size, self.road_theta.data, self.road_alpha.data, v)

    def merge_into(self, base):  # ROAD-6: R W0 (the rows of W0^T are output vectors) and R b
        if not isinstance(base, Linear):
            raise ConfigError(f"RoAd: cannot merge into a {type(base).__name__} base (R W0 needs float weights); "
                              f"keep the adapter unmerged, or load the model unquantized")
        xp = backend.xp_of(base.weight.data)
        self.kept = (base.weight.data, None if base.bias is None else base.bias.data)
        base.weight.data = xp.matrix_transpose(self.rotate(xp.matrix_transpose(base.weight.data)))
        if base.bias is not None:
            base.bias.data = self.rotate(base.bias.data)

    def unmerge_from(self, base):
        put_back(base, self.kept)
        self.kept = None


register("road", RoadConfig, RoadLinear,
         paper="RoAd: 2D Rotary Adaptation for Efficient Batched LLM Fine-tuning, Liao, Monz et al. 2024, "
               "arXiv:2409.00119",
         summary="RoAd, y' = R y: each pair of outputs rotated by θ and scaled by α (road_1/2/4) (spec/road.md).")
