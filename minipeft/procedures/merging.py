"""What the merge-and-restart procedures share (ReLoRA, Delta-LoRA, Chain of LoRA): the LoRA layers they may
fold into W, the fold itself with LoRA's re-initialisation, the optimizer-moment surgery, and a TrainingHook
base that saves the changed base weights so that a resume is exact.

A procedure changes W, which is frozen and so not in a checkpoint's trainable.safetensors: its hook's state()
holds each touched layer's current W (the bits, not the sum of the merged deltas, so a resumed run adds to the
same W as the uninterrupted one). After training, W holds part of what was learnt: the documented output is
model.merge_and_unload().save(path); model.save_adapters warns that the adapter alone lacks that part.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .. import backend
from ..adapters.base import orient
from ..adapters.inject import adapted_layers
from ..adapters.lora import LoRALinear, init_default
from ..autograd import no_grad
from ..errors import ConfigError
from ..hooks import TrainingHook
from ..nn.layers import Linear
from ..optimizers.pairs import LoRAPair, lora_pairs


class Target(NamedTuple):
    pair: LoRAPair  # the adapter's A (r, in), B (out, r), their parameter names, its LoRALinear
    base: Linear  # the float base layer whose W the procedure changes


def merge_targets(model, procedure: str) -> list[Target]:
    """The trained plain-LoRA layers over float bases; anything a procedure cannot fold into W is a ConfigError."""
    bases = {path: layer.base_layer for path, layer in adapted_layers(model.net)}
    targets = [Target(p, bases[p.path]) for p in lora_pairs(model) if p.B.requires_grad]
    if not targets:
        raise ConfigError(f"{procedure} needs trainable LoRA layers (lora_A, lora_B): apply_lora first")
    for t in targets:
        where = f"{procedure}: {t.pair.path} (adapter {t.pair.adapter!r})"
        if type(t.pair.delta) is not LoRALinear:
            raise ConfigError(f"{where} is {type(t.pair.delta).__name__}; {procedure} folds s B A into W, "
                              f"so it needs plain LoRA layers (apply_lora)")
        if not isinstance(t.base, Linear):
            raise ConfigError(f"{where} has a {type(t.base).__name__} base (4-bit): its W cannot take s B A at "
                              f"every merge; load the model unquantized (load_model without quantization)")
        if t.pair.delta.lora_B.bias is not None:
            raise ConfigError(f"{where} has lora_bias=True; {procedure} folds only s B A into W: use lora_bias=False")
    return targets


def tie_knot(t: Target, rng) -> None:
    """W <- W + s B A, then A re-initialised as LoRA's default (LORA-1) and B = 0: the model's output is unchanged."""
    with no_grad():
        t.pair.delta.merge_into(t.base)
        init_default(t.pair.delta, t.base, rng)
        t.pair.B.data = backend.xp_of(t.pair.B.data).zeros_like(t.pair.B.data)  # (out, r)


def add_to_W(t: Target, dW) -> None:
    """W <- W + dW for dW (out, in), in the base weight's own layout."""
    t.base.weight.data = t.base.weight.data + orient(dW, t.base)


def magnitude_prune(a, ratio: float):
    """a with the entries whose |a| is at most the ratio-quantile of |a| set to 0 (the ReLoRA authors' rule:
    threshold = torch.quantile(|a|, ratio), linear interpolation; keep |a| > threshold)."""
    xp = backend.xp_of(a)
    mag = xp.abs(a)
    flat = xp.sort(xp.reshape(mag, (-1,)))  # (n,)
    pos = ratio * (flat.shape[0] - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, flat.shape[0] - 1)
    threshold = flat[lo] + (flat[hi] - flat[lo]) * (pos - lo)
    return xp.where(mag > threshold, a, xp.zeros_like(a))


def check_moments(opt, procedure: str) -> None:
    """The procedures edit AdamW's moment dicts m, v (AdamW and the optimisers built on it have them)."""
    if not (isinstance(getattr(opt, "m", None), dict) and isinstance(getattr(opt, "v", None), dict)):
        raise ConfigError(f"{procedure} prunes or resets AdamW's moments, and {type(opt).__name__} has none "
                          f"(m, v): use TrainingConfig(optimizer=None) or an AdamW-based optimiser")


class MergingHook(TrainingHook):
    """The part the three procedures share: the targets, the RNG that re-initialises A, the optimizer, and
    state() / load_state() of the touched W (and the RNG), so a resumed run is bit-exact (TRAIN-13)."""
    procedure = "a procedure"

    def __init__(self, model, opts):
        self.model, self.opts = model, opts
        self.targets = merge_targets(model, self.procedure)
        self.rng = backend.RNG(getattr(opts, "seed", 0))
        self.opt, self.changed = None, False

    def attach(self, opt):
        check_moments(opt, self.procedure)
        self.opt = opt

    def knot(self) -> None:
        """Fold every target into W and restart it (tie_knot)."""
        for t in self.targets:
            tie_knot(t, self.rng)
        self.changed = True

    def state(self):
        arrays = {f"W.{t.pair.path}": backend.to_host(t.base.weight.data) for t in self.targets} if self.changed else {}
        return arrays, {"rng": self.rng.get_state(), "changed": self.changed}

    def load_state(self, arrays, info):
        self.rng.set_state(info["rng"])
        self.changed = info["changed"]
        for t in self.targets:
            if f"W.{t.pair.path}" in arrays:
                t.base.weight.data = backend.asarray(arrays[f"W.{t.pair.path}"])

    def end(self):
        if self.changed:  # Model.save_adapters warns from here on: the adapter alone lacks what W took
            self.model.base_changed_by = self.procedure
