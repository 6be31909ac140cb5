"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, arXiv:2402.09353).

LoRA (lora.py) whose updated weight W0 + s B A is split into a per-row magnitude m and a direction.
Symbols: W0 (out, in) frozen base weight, b its bias, A (r, in), B (out, r), s = alpha / r (LORA-2),
    V = W0 + s B A (out, in), n = ||V||_row (out,) the L2 norm of each output row (over the in dim),
    m (out,) the magnitude (PEFT's lora_magnitude_vector), g = m / n (out,).
Init (DORA-1): A, B as LoRA (B = 0); m = ||W0 + s B A||_row = ||W0||_row, so g = 1 and h = W0 x + b at step 0.
Forward (DORA-2): h = W0 x + b + (g - 1) (W0 x) + g s B A x = g (W0 + s B A) x + b   (eval, or dropout p = 0);
    with dropout in training, both extra terms read d = dropout(x): h = W0 x + b + (g - 1) W0 d + g s B A d.
Detached norm (DORA-3): n is a constant to autograd (paper sec 4.3): no gradient flows through n.
Trainable (DORA-4): A, B and m (m frozen with decompose_magnitude=False); W0 gets no gradient.
Merge (DORA-5): W <- g (W0 + s B A), n cached; unmerge: W <- W / g - s B A with the cached n (W0 to rounding).
    The bias is not scaled. GPT-2 Conv1D stores W transposed: the same formula on W^T.
Serialization (DORA-6): PEFT's LoraConfig with use_dora: true (peft_type "LORA"); key
    <layer>.lora_magnitude_vector (out,), next to lora_A.weight and lora_B.weight.
PEFT parity: peft/tuners/lora/dora.py DoraLinearLayer.forward (result + (m/n - 1) base_result
    + (m/n) lora_B(lora_A(x)) s, base_result = result - bias) and variants.py DoraLinearVariant.merge/unmerge.
Deviations: none known. lora_bias and 4-bit bases are refused (PEFT refuses lora_bias too).
"""
from __future__ import annotations

import contextlib
import dataclasses

from .. import backend
from ..autograd import functional as F
from ..autograd.tensor import Tensor
from ..nn.layers import Linear
from .base import check, orient, trainable
from .lora import LoRAConfig, LoRALinear
from .registry import register


@dataclasses.dataclass
class DoRAConfig(LoRAConfig):
    """LoRAConfig's fields, plus decompose_magnitude: train m (True) or keep it at ||W0||_row."""

    decompose_magnitude: bool = True

    PEFT_FLAGS = {"use_dora": True}
    PEFT_FIELDS = {**LoRAConfig.PEFT_FIELDS, "decompose_magnitude": "decompose_magnitude"}

    def validate(self):
        super().validate()
        check(isinstance(self.decompose_magnitude, bool), "decompose_magnitude", self.decompose_magnitude,
              "must be True or False")
        check(not self.lora_bias, "lora_bias", self.lora_bias, "is not supported with DoRA (PEFT refuses it too)")

    def trainable_count(self, layers: dict, mc) -> int:
        """DORA-4: LoRA's r (in + out) per layer, plus out for m when it trains."""
        return super().trainable_count(layers, mc) + (sum(m for _, m in layers.values()) if self.decompose_magnitude else 0)

    def to_peft(self) -> dict:
        d = super().to_peft()
        if self.decompose_magnitude:  # not a PEFT field: written only when m is frozen (PEFT ignores it)
            del d["decompose_magnitude"]
        return d


class Magnitude:
    """DoRA's magnitude/direction split (DORA-2, 3, 5) over any delta that has delta_weight() (s B A, or
    DVoRA's VeRA product), low_rank(x) (that update applied to x) and its magnitude Tensor m (out,)."""

    held_norm = None  # n held by gradient_reference, else computed in each call
    merged_norm = None  # n at merge time, for unmerge (as PEFT caches it)

    @contextlib.contextmanager
    def gradient_reference(self, base):
        """DORA-3: backward treats n as a constant, so the function it differentiates holds n where it is."""
        self.held_norm = self.row_norm(base)
        try:
            yield
        finally:
            self.held_norm = None

    def row_norm(self, base):
        """n = ||W0 + dW||_row, (out,): an array, so autograd sees a constant (DORA-3)."""
        if self.held_norm is not None:  # inside gradient_reference
            return self.held_norm
        V = base.weight_out_in() + self.delta_weight()  # (out, in)
        return backend.xp_of(V).linalg.vector_norm(V, axis=1)  # (out,)

    def adapt(self, x, y, base):  # DORA-2
        g = self.magnitude / Tensor(self.row_norm(base))  # (out,)
        if self.training and self.p > 0:
            x = F.dropout(x, self.p, self.rng, self.training)
            base_out = F.linear(x, base.weight, fan_in_fan_out=base.fan_in_fan_out)  # W0 d, (..., out)
        else:
            base_out = y if base.bias is None else y - base.bias  # W0 x, (..., out)
        return y + (g - 1.0) * base_out + g * self.low_rank(x)

    def merge_into(self, base):  # DORA-5
        self.merged_norm = self.row_norm(base)
        g = self.magnitude.data / self.merged_norm  # (out,)
        base.weight.data = orient(g[:, None] * (base.weight_out_in() + self.delta_weight()), base)

    def unmerge_from(self, base):
        g = self.magnitude.data / self.merged_norm  # (out,)
        base.weight.data = orient(base.weight_out_in() / g[:, None] - self.delta_weight(), base)
        self.merged_norm = None


class DoRALinear(Magnitude, LoRALinear):
    MIXED_BATCH = False  # PEFT refuses adapter_names with DoRA too

    @classmethod
    def create(cls, base, cfg: DoRAConfig, path: str, rng, init_weights: bool = True):
        check(isinstance(base, Linear), f"target_modules (for {path})", type(base).__name__,
              "DoRA needs a float Linear base (its row norms); a 4-bit layer is not supported")
        delta = super().create(base, cfg, path, rng, init_weights)
        delta.learn_m = cfg.decompose_magnitude
        delta.lora_magnitude_vector = trainable(delta.row_norm(base))  # DORA-1: (out,)
        return delta

    @property
    def magnitude(self):
        return self.lora_magnitude_vector

    def low_rank(self, x):  # s B A x, (..., out)
        return self.lora_B(self.lora_A(x)) * self.s

    def requires_grad_(self, flag: bool = True):
        super().requires_grad_(flag)
        self.lora_magnitude_vector.requires_grad = flag and self.learn_m  # DORA-4
        return self


register("dora", DoRAConfig, DoRALinear, paper="DoRA: Weight-Decomposed Low-Rank Adaptation, Liu et al. 2024, arXiv:2402.09353",
         summary="LoRA with a learned per-row magnitude, W' = m (W0 + s B A) / ||W0 + s B A||_row (spec/dora.md).")
