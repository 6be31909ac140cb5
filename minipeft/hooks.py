"""Training hooks: how a method or a training procedure takes part in `model.train` without the loop
knowing it by name (spec/training.md TRAIN-10..TRAIN-13).

A hook is a subclass of `TrainingHook` below that overrides the methods it needs (every one has a
do-nothing default; anything else is refused before training). Hooks come from two places, in order:
  1. the active adapters: a layer class with a `training_hook` attribute (a TrainingHook class)
     gets one hook per active adapter, built as training_hook(name, {path: delta}, cfg) (AdaLoRA);
     a prompt-learning adapter's one entry is {"prompt_encoder.<name>": its prompt module} (CPT);
  2. the user: TrainingConfig(hooks=[...]) (procedures: a rank schedule, merge-and-restart, ...).
Each hook's `key` names its state in a checkpoint, so keys are unique; an adapter's hook has the
adapter's name as its key.

In the loop (minipeft/train.py), per optimizer step:
    groups   = param_groups(named) of every hook, merged  (before the optimizer is made)
    opt      = the one hook's optimizer(named, groups, cfg), or AdamW(named, ..., groups)
    attach(opt) of each hook, once, before a resume loads the optimizer's state
    lr       = the schedule's lr times every hook's lr_scale(step)
    loss     = LM loss + sum of regularization() over hooks        (each micro-batch); the LM loss is
               the one hook's lm_loss(logits, labels) (CPT's), or causal_lm_loss
    backward; clip; opt.step(); after_step(step) of each hook (gradients still there); zero_grad
and at the end of training end(); checkpoints save state() and a resume gives it to load_state().
"""
from __future__ import annotations

import math

from .errors import ConfigError


class TrainingHook:
    """The hook interface: subclass it and override what the method or procedure needs."""

    key = "hook"  # its name in checkpoints (method_state.safetensors, trainer_state.json)
    exclusive = None  # a reason string: at most one hook with a reason may be active at once

    def param_groups(self, named: dict) -> dict:
        """{parameter name: {"lr_scale": float, "weight_decay": float}} for the parameters whose learning
        rate (a factor on the schedule's) or weight decay differ from the TrainingConfig's."""
        return {}

    def optimizer(self, named: dict, groups: dict, cfg):
        """An optimizer to use instead of AdamW, or None. It needs AdamW's interface: an `lr` attribute
        the loop sets each step, step(), zero_grad(), t, state_dict() and load_state_dict(arrays, t)."""
        return None

    def attach(self, opt) -> None:
        """Once, after the optimizer is made and before a resume loads its state: a procedure that prunes
        or resets the optimizer's moments (ReLoRA, Chain of LoRA) keeps `opt` here (TRAIN-16)."""

    def lr_scale(self, step: int) -> float:
        """A factor on the schedule's learning rate of step `step` (0-based): ReLoRA's restart warmup (TRAIN-16)."""
        return 1.0

    def regularization(self):
        """A scalar Tensor added to each micro-batch's loss, or None."""
        return None

    def lm_loss(self, logits, labels):
        """The language-model loss of one micro-batch instead of causal_lm_loss (CPT's weighted loss over its
        context's labels), or None. At most one active hook may give one."""
        return None

    def after_step(self, step: int) -> None:
        """After optimizer step `step` (0-based), before the gradients are cleared."""

    def end(self) -> None:
        """When training ends (normally or not)."""

    def state(self) -> tuple[dict, dict]:
        """(arrays, JSON-able dict) a resumed run needs, beyond the trainable weights."""
        return {}, {}

    def load_state(self, arrays: dict, info: dict) -> None:
        """Take back what state() returned."""


def adapter_hooks(model) -> list:
    """The hooks of the active adapters' methods (registry layer classes with a `training_hook`)."""
    from .adapters.inject import adapted_layers
    from .adapters.prompt_learning import prompt_of
    from .adapters.registry import layer_class
    hooks = []
    layers = None
    for name in model.active_adapters:
        cfg = model.peft_configs[name]
        make = getattr(layer_class(cfg), "training_hook", None)
        if make is None:
            continue
        if getattr(cfg, "is_prompt_learning", False):
            hooks.append(make(name, {f"prompt_encoder.{name}": prompt_of(model.net, name)}, cfg))
            continue
        layers = layers if layers is not None else adapted_layers(model.net)
        hooks.append(make(name, {p: m.adapters[name] for p, m in layers if name in m.adapters}, cfg))
    return hooks


def check_hooks(hooks: list) -> None:
    """Unique keys; at most one exclusive hook (two AdaLoRA adapters would each allocate ranks: ADALORA-12)."""
    for h in hooks:
        if not isinstance(h, TrainingHook):
            raise ConfigError(f"training hook {h!r} is not a minipeft.hooks.TrainingHook; subclass it")
    keys = [h.key for h in hooks]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"training hooks share the key(s) {dup}; each hook's key names its checkpoint state")
    losses = [h.key for h in hooks if type(h).lm_loss is not TrainingHook.lm_loss]
    if len(losses) > 1:
        raise ConfigError(f"training hooks {losses} each give the LM loss (lm_loss); use one of them")
    excl = [h for h in hooks if h.exclusive]
    if len(excl) > 1:
        raise ConfigError(f"adapters {[h.key for h in excl]} are active together and each {excl[0].exclusive}: "
                          f"train one at a time (set_active_adapter), as PEFT requires")


def regularization(hooks: list):
    """The sum of the hooks' regularization terms, or None."""
    terms = [t for t in (h.regularization() for h in hooks) if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


def lm_loss(hooks: list, logits, labels):
    """The one hook's LM loss of the micro-batch, or causal_lm_loss (MODEL-6)."""
    from .models.blocks import causal_lm_loss
    for h in hooks:
        loss = h.lm_loss(logits, labels)
        if loss is not None:
            return loss
    return causal_lm_loss(logits, labels)


def attach(hooks: list, opt) -> None:
    """Give every hook the optimizer (TRAIN-16)."""
    for h in hooks:
        h.attach(opt)


def lr_scale(hooks: list, step: int) -> float:
    """The product of the hooks' lr_scale(step) (TRAIN-16)."""
    return math.prod(h.lr_scale(step) for h in hooks)


def param_groups(hooks: list, named: dict) -> dict:
    """The hooks' parameter groups merged, a later hook's entries updating an earlier's."""
    out: dict = {}
    for h in hooks:
        for pname, group in h.param_groups(named).items():
            if pname not in named:
                raise ConfigError(f"hook {h.key!r} sets a group for {pname!r}, which is not a trainable parameter")
            out.setdefault(pname, {}).update(group)
    return out


def optimizer(hooks: list, named: dict, groups: dict, cfg):
    """The one optimizer a hook supplies, or None (two are an error)."""
    made = [(h.key, o) for h in hooks if (o := h.optimizer(named, groups, cfg)) is not None]
    if len(made) > 1:
        raise ConfigError(f"hooks {[k for k, _ in made]} each replace the optimizer; use one of them")
    return made[0][1] if made else None
