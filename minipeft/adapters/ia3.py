"""IA3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022, arXiv:2205.05638).

A learned vector rescales a layer's output (attention targets) or its input (feed-forward targets).
Symbols: W0 (out, in) frozen base weight, b its bias, x (..., in), l the learned vector (PEFT's ia3_l):
    (out, 1) for an output-scaled layer, (1, in) for a feed-forward (input-scaled) layer.
Init (IA3-1): l = 1, so h = W0 x + b at step 0.
Feed-forward (IA3-2): a target is feed-forward when its path ends with a feedforward_modules entry
    (a plain suffix, PEFT's rule) or fully matches it when it is a string (a regex).
Forward (IA3-3): output-scaled: h = l ⊙ (W0 x + b); feed-forward: h = W0 (l ⊙ x) + b.
    Several active IA3 adapters multiply their vectors (as PEFT).
Merge (IA3-4): output-scaled: W <- diag(l) W0 and b <- l ⊙ b; feed-forward: W <- W0 diag(l), b unchanged.
    unmerge divides by l (W0 to rounding); an entry l = 0 cannot be undone and is refused.
Trainable (IA3-5): l only; W0 and b get no gradient.
Serialization (IA3-6): peft_type "IA3", key <layer>.ia3_l, feedforward_modules in adapter_config.json.
PEFT parity: peft/tuners/ia3/layer.py Linear.forward (result * ia3_scaling, or base_layer(x * ia3_scaling))
    and Linear.merge / unmerge; GPT-2 Conv1D stores W transposed: the same scaling on W's other axis.
Deviations: PEFT's unmerge divides by l + 1e-8 (off by about 1e-8 relative, and finite for l = 0);
    minipeft divides by l exactly and refuses l = 0.
"""
from __future__ import annotations

import dataclasses
import re

from .. import backend
from ..errors import MiniPeftError
from ..nn.layers import Linear
from .base import AdapterConfig, Delta, check, orient, trainable
from .registry import register


@dataclasses.dataclass
class IA3Config(AdapterConfig):
    target_modules: tuple | str = ("k_proj", "v_proj", "down_proj")
    feedforward_modules: tuple | str = ("down_proj",)  # targets whose input (not output) is scaled

    peft_type = "IA3"
    PEFT_FIELDS = {"feedforward_modules": "feedforward_modules"}
    PEFT_COMMON = ("target_modules", "modules_to_save", "exclude_modules", "fan_in_fan_out")  # no layer selection

    def validate(self):
        if isinstance(self.feedforward_modules, list):
            self.feedforward_modules = tuple(self.feedforward_modules)
        ff, tm = self.feedforward_modules, self.target_modules
        check(isinstance(ff, str) or (isinstance(ff, tuple) and all(isinstance(e, str) for e in ff)),
              "feedforward_modules", ff, "must be a list of module names or a regex")
        check(isinstance(ff, str) or isinstance(tm, str) or set(ff) <= set(tm), "feedforward_modules", ff,
              f"must be a subset of target_modules {tm!r} (PEFT's rule)")

    def is_feedforward(self, path: str) -> bool:  # IA3-2
        ff = self.feedforward_modules
        return re.fullmatch(ff, path) is not None if isinstance(ff, str) else any(path.endswith(e) for e in ff)

    def trainable_count(self, layers: dict, mc) -> int:
        """IA3-5: l has in entries on a feed-forward target, out on the others."""
        return sum(n if self.is_feedforward(p) else m for p, (n, m) in layers.items())


class IA3Linear(Delta):
    def __init__(self, n: int, feedforward: bool):
        self.feedforward = feedforward
        self.ia3_l = trainable(backend.xp().ones((1, n) if feedforward else (n, 1), dtype=backend.dtype("float32")))

    @classmethod
    def create(cls, base, cfg: IA3Config, path: str, rng, init_weights: bool = True):
        check(isinstance(base, Linear), f"target_modules (for {path})", type(base).__name__,
              "IA3 needs a float Linear base")
        ff = cfg.is_feedforward(path)
        return cls(base.in_features if ff else base.out_features, ff)  # IA3-1: ones

    def adapt_input(self, x):  # IA3-3, feed-forward: l ⊙ x
        return x * self.ia3_l.reshape(-1) if self.feedforward else x

    def adapt(self, x, y, base):  # IA3-3, output-scaled: l ⊙ (W0 x + b)
        return y if self.feedforward else y * self.ia3_l.reshape(-1)

    def scale(self, base, factor):
        """Multiply W's rows (output-scaled, and b) or columns (feed-forward) by factor, (out, 1) or (1, in)."""
        base.weight.data = orient(base.weight_out_in() * factor, base)
        if not self.feedforward and base.bias is not None:
            base.bias.data = base.bias.data * factor[:, 0]

    def merge_into(self, base):  # IA3-4
        self.scale(base, self.ia3_l.data)

    def unmerge_from(self, base):
        xp = backend.xp_of(self.ia3_l.data)
        if not bool(xp.all(self.ia3_l.data != 0)):
            raise MiniPeftError("ia3_l has a zero entry: the merged weight cannot be divided back to W0 "
                                "(unmerge_adapter / disable_adapters need l != 0)")
        self.scale(base, 1.0 / self.ia3_l.data)


register("ia3", IA3Config, IA3Linear,
         paper="IA3: Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning, Liu et al. 2022, arXiv:2205.05638",
         summary="Learned vectors scaling layer outputs, or inputs of feed-forward layers (spec/ia3.md).")
