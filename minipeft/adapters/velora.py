"""VeLoRA: Memory Efficient Training using Rank-1 Sub-Token Projections (Miles, Reddy, Elezi, Deng, NeurIPS 2024,
arXiv:2405.17991), as PEFT 0.21.2's LoraConfig(velora_config=...), spec/velora.md.

LoRA (lora.py) whose backward keeps, for the gradient of A, a compressed copy of A's input: each token is cut
into G sub-tokens of D features, and each sub-token is kept as one number, its projection on a unit vector v.
Symbols: x (N, in) the tokens of dropout(x) entering A, A (r, in), B (out, r), s = alpha / r (LORA-2),
    G = num_groups, D = ceil(in / G), pad(x) (N, G D) x with zero columns appended, u_tg (D,) = pad(x)[t, gD:(g+1)D],
    v (D,) PEFT's lora_velora_embed, c = velora_config["scale"].
Projection (VELORA-1): v = m / |m| for m the mean of every sub-token u_tg of the batch (m = 0: v = 1 / sqrt(D)):
    "batch_average" in every training forward, "batch_average_once" in the first one (after a load too),
    "random": v = n / |n|, n ~ N(0, I_D), drawn when the adapter is made and never changed.
Forward (VELORA-2): h = W0 x + b + s (B A dropout(x) + b_B), LoRA's, in every mode; merge/unmerge are LoRA's.
Backward (VELORA-3), in training with gradients on: with g = dL/d(A x) (N, r), the compressed input
    k_tg = u_tg . v (N, G) is all the layer keeps of x, X~ = c pad^-1(k_tg v) (N, in) (the first in columns), and
    dL/dA = g^T X~, dL/dx = g A (exact), dL/dB and dL/db_B exact. X~ = c x when every u_tg is parallel to v.
Reference (VELORA-4): this is the exact gradient of f(x, A) = X~(x) A^T + x A0^T - X~(x) A0^T at A = A0
    (A0, v held constant), equal to x A^T in value; gradient_reference makes the forward f.
Trainable (VELORA-5): LoRA's, r (in + out) per layer (+ out with lora_bias); v is saved, not trained.
Serialization (VELORA-6): PEFT's LoraConfig with velora_config {num_groups, scale, init_type} (peft_type "LORA");
    key <layer>.lora_velora_embed (D,) beside LoRA's.
PEFT parity: peft/tuners/lora/velora.py VeloraFunction, _compress_activations, _reconstruct_activations,
    _normalize_projection; variants.py VeloraLinearVariant (init, _maybe_update_embed, forward).
Deviations: the "random" draw is minipeft's generator (the saved v is what a load uses); a 4-bit base is refused
    (PEFT's bitsandbytes layers refuse velora_config).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

from .. import backend
from ..autograd import functional as F
from ..autograd.function import Function, is_grad_enabled
from ..autograd.tensor import Tensor
from ..nn.layers import Linear
from .base import check
from .data_init import sub_config
from .lora import LoRAConfig, LoRALinear
from .registry import register

VELORA_DEFAULTS = {"num_groups": 64, "scale": 1.0, "init_type": "batch_average"}  # PEFT's VeloraConfig
INIT_TYPES = ("batch_average", "batch_average_once", "random")


@dataclasses.dataclass
class VeLoRAConfig(LoRAConfig):
    """LoRAConfig's fields, plus PEFT's velora_config {num_groups, scale, init_type} (missing keys: PEFT's defaults)."""

    velora_config: dict = dataclasses.field(default_factory=dict)

    PEFT_FLAGS = {"velora_config": True}
    PEFT_FIELDS = {**LoRAConfig.PEFT_FIELDS, "velora_config": "velora_config"}

    def validate(self):
        super().validate()
        self.velora_config = c = sub_config(self.velora_config, VELORA_DEFAULTS, "velora_config", "VeloraConfig")
        g, scale = c["num_groups"], c["scale"]
        check(isinstance(g, int) and not isinstance(g, bool) and g > 0, "velora_config['num_groups']", g,
              "must be a positive integer (the sub-tokens each token is cut into)")
        check(isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0,
              "velora_config['scale']", scale, "must be a number > 0 (the factor on the reconstructed input)")
        check(c["init_type"] in INIT_TYPES, "velora_config['init_type']", c["init_type"], f"use one of {INIT_TYPES}")

    def to_peft(self) -> dict:
        d = super().to_peft()
        d["velora_config"] = dict(self.velora_config)  # the flag's value is the sub-config itself
        return d


def subtokens(x2, G: int):
    """(N, in) -> (N, G, D), D = ceil(in / G), zero columns appended to fill the last group."""
    xp, (N, n) = backend.xp_of(x2), x2.shape
    D = -(-n // G)
    if G * D != n:
        x2 = xp.concat((x2, xp.zeros((N, G * D - n), dtype=x2.dtype)), axis=1)  # (N, G D)
    return xp.reshape(x2, (N, G, D))


def projection(x2, G: int):
    """VELORA-1: the unit mean sub-token of x2 (N, in), (D,); ones / sqrt(D) if the mean is 0."""
    xp = backend.xp_of(x2)
    u = subtokens(x2, G)
    m = xp.mean(xp.reshape(u, (-1, u.shape[-1])), axis=0)  # (D,)
    norm = xp.linalg.vector_norm(m)
    if float(norm) == 0.0:
        m = xp.ones_like(m)
        norm = xp.linalg.vector_norm(m)
    return m / norm


def compressed(x2, v, G: int):
    """VELORA-3: k_tg = u_tg . v, (N, G), for x2 (N, in): all that backward keeps of x."""
    return backend.xp_of(x2).matmul(subtokens(x2, G), backend.xp_of(x2).astype(v, x2.dtype))


def reconstructed(k, v, n: int, c: float):
    """VELORA-3: X~ = c pad^-1(k_tg v), (N, in), from k (N, G)."""
    xp = backend.xp_of(k)
    v = xp.astype(v, k.dtype)
    return xp.reshape(k[:, :, None] * v[None, None, :], (k.shape[0], -1))[:, :n] * c  # (N, in)


class SubTokenLinear(Function):
    """z = x A^T (A (r, in)); backward dx = g A, dA = g^T X~ (VELORA-3). Keeps k (N, G) and A, not x."""

    def forward(self, x, A, v=None, groups=1, scale=1.0):
        xp = backend.xp_of(x)
        self.x_shape, self.v, self.G, self.c = x.shape, v, groups, scale
        x2 = xp.reshape(x, (-1, x.shape[-1]))  # (N, in)
        self.save_for_backward(compressed(x2, v, groups) if self.needs_input_grad[1] else None, A)  # k (N, G)
        return xp.reshape(xp.matmul(x2, xp.matrix_transpose(A)), tuple(x.shape[:-1]) + (A.shape[0],))

    def backward(self, g):
        k, A = self.saved
        xp = backend.xp_of(g)
        g2 = xp.reshape(g, (-1, g.shape[-1]))  # (N, r)
        gx = xp.reshape(xp.matmul(g2, A), self.x_shape) if self.needs_input_grad[0] else None
        gA = None
        if self.needs_input_grad[1]:
            Xt = reconstructed(xp.astype(k, g.dtype), self.v, A.shape[1], self.c)  # (N, in)
            gA = xp.matmul(xp.matrix_transpose(g2), Xt)  # (r, in)
        return gx, gA


class VeLoRALinear(LoRALinear):
    initialized = False  # v taken from a batch yet (PEFT's lora_velora_initialized; not saved)
    held = None  # (A0,) inside gradient_reference (VELORA-4)

    @classmethod
    def create(cls, base, cfg: VeLoRAConfig, path: str, rng, init_weights: bool = True):
        check(isinstance(base, Linear), f"target_modules (for {path})", type(base).__name__,
              "VeLoRA needs a float Linear base (PEFT's 4-bit LoRA layers refuse velora_config)")
        delta = super().create(base, cfg, path, rng, init_weights)
        c = cfg.velora_config
        delta.G, delta.c, delta.init_type = c["num_groups"], float(c["scale"]), c["init_type"]
        D = -(-base.in_features // delta.G)
        if delta.init_type == "random":  # VELORA-1
            n = rng.normal((D,))
            v, delta.initialized = n / backend.xp_of(n).linalg.vector_norm(n), True
        else:
            v = backend.xp().zeros((D,), dtype=backend.dtype("float32"))
        delta.embed = [Tensor(v)]  # a list: no parameter walk finds v, so it never trains (VELORA-5)
        return delta

    def saved_parameters(self):  # VELORA-6: v beside A and B
        return list(self.named_parameters()) + [("lora_velora_embed", self.embed[0])]

    @contextlib.contextmanager
    def gradient_reference(self, base):
        """VELORA-4: hold A0 = A (and v) so the forward is f, whose exact gradient backward computes."""
        self.held = (backend.xp_of(self.lora_A.weight.data).asarray(self.lora_A.weight.data, copy=True),)
        try:
            yield
        finally:
            self.held = None

    def adapt(self, x, y, base):  # VELORA-2, VELORA-3
        h = F.dropout(x, self.p, self.rng, self.training)
        if not self.training:
            z = self.lora_A(h)
        elif self.held is not None:
            z = self.reference(h)
        elif is_grad_enabled():
            if self.init_type == "batch_average" or not self.initialized:  # VELORA-1
                hd = h.data
                v = projection(backend.xp_of(hd).reshape(hd, (-1, hd.shape[-1])), self.G)
                self.embed[0].data, self.initialized = backend.xp_of(v).astype(v, self.embed[0].dtype), True
            z = SubTokenLinear.apply(h, self.lora_A.weight, v=self.embed[0].data, groups=self.G, scale=self.c)
        else:
            z = self.lora_A(h)
        return y + self.lora_B(z) * self.s

    def reference(self, h):
        """f(x, A) = X~ A^T + x A0^T - X~ A0^T, (..., r), X~ and A0 constants (VELORA-4)."""
        xp, v = backend.xp_of(h.data), self.embed[0].data
        x2 = xp.reshape(h.data, (-1, h.shape[-1]))  # (N, in)
        Xt = Tensor(xp.reshape(reconstructed(compressed(x2, v, self.G), v, x2.shape[1], self.c), h.shape))
        A0 = Tensor(self.held[0])
        return F.linear(Xt, self.lora_A.weight) + F.linear(h, A0) - F.linear(Xt, A0)


register("velora", VeLoRAConfig, VeLoRALinear,
         paper="VeLoRA: Memory Efficient Training using Rank-1 Sub-Token Projections, Miles et al. 2024, "
               "arXiv:2405.17991",
         summary="LoRA whose backward keeps A's input as one number per sub-token (its projection on a unit v): "
                 "dL/dA = g^T X~ (spec/velora.md).")
