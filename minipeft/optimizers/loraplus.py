"""LoRA+: Efficient Low Rank Adaptation of Large Models (Hayou, Ghosh, Yu 2024, arXiv:2402.12354).

LoRA's forward, trained by AdamW with a larger learning rate for B than for A: eta_B = ratio * eta_A
(the paper's lambda = eta_B / eta_A, about 2^4 for LLMs). The parameter groups are PEFT's
(peft/optimizers/loraplus.py create_loraplus_optimizer), spec/loraplus.md:
  LORAPLUS-1 group "B": every trainable parameter named lora_B, and every 1-d trainable parameter
             (biases, DoRA's magnitude, norm weights of modules_to_save): lr = ratio * lr.
             Inside it, parameters of a LayerNorm module and names containing "bias" get weight decay 0
             ("B, no decay"); the rest loraplus_weight_decay.
  LORAPLUS-2 group "A": every other trainable parameter (lora_A, 2-d modules_to_save weights, LoHa's
             factors, ...): lr, weight decay loraplus_weight_decay (even where the name says "bias").
  LORAPLUS-3 group "embedding": LoRA factors of an embedding layer at loraplus_lr_embedding. minipeft
             has no LoRA on embeddings, so this group is always empty; the value is still checked.
Each group steps as torch.optim.AdamW with that lr and weight decay (TRAIN-10).
"""
from __future__ import annotations

import dataclasses

from ..adapters.registry import register
from ..errors import ConfigError
from ..hooks import TrainingHook
from ..nn.layers import LayerNorm
from ..nn.optim import AdamW
from .checks import number


@dataclasses.dataclass
class LoraPlusConfig:
    """PEFT's create_loraplus_optimizer arguments. loraplus_weight_decay=None: in model.train, the
    TrainingConfig's weight_decay; in create_loraplus_optimizer, 0.0 (PEFT's default)."""
    loraplus_lr_ratio: float = 16.0  # eta_B / eta_A; the paper's 2^4 (PEFT has no default)
    loraplus_lr_embedding: float = 1e-6
    loraplus_weight_decay: float | None = None

    def __post_init__(self):
        number("LoraPlusConfig", "loraplus_lr_ratio", self.loraplus_lr_ratio)
        number("LoraPlusConfig", "loraplus_lr_embedding", self.loraplus_lr_embedding)
        if self.loraplus_weight_decay is not None:
            number("LoraPlusConfig", "loraplus_weight_decay", self.loraplus_weight_decay, strict=False)


def loraplus_groups(model, named: dict, ratio: float, weight_decay: float) -> dict:
    """{name: {"lr_scale", "weight_decay"}} for every trainable parameter (LORAPLUS-1, LORAPLUS-2)."""
    in_layernorm = {f"{path}.{n}" if path else n for path, m in model.net.named_modules() if isinstance(m, LayerNorm)
                    for n, _ in m.named_parameters()}
    groups = {}
    for name, p in named.items():
        if "lora_B" in name or p.ndim == 1:  # LORAPLUS-1
            decays = name not in in_layernorm and "bias" not in name
            groups[name] = {"lr_scale": float(ratio), "weight_decay": float(weight_decay) if decays else 0.0}
        else:  # LORAPLUS-2
            groups[name] = {"lr_scale": 1.0, "weight_decay": float(weight_decay)}
    return groups


def create_loraplus_optimizer(model, *, lr: float, loraplus_lr_ratio: float, loraplus_lr_embedding: float = 1e-6,
                              loraplus_weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                              weight_decay=None) -> AdamW:
    """AdamW over the model's trainable parameters in LoRA+'s groups: peft.optimizers.create_loraplus_optimizer
    with optimizer_cls=torch.optim.AdamW. `weight_decay` is refused: PEFT passes it to the optimizer, where every
    group's own weight decay overrides it, so it does nothing there; use loraplus_weight_decay."""
    if weight_decay is not None:
        raise ConfigError("create_loraplus_optimizer: weight_decay has no effect in PEFT (each LoRA+ group sets its "
                          "own); pass loraplus_weight_decay instead")
    opts = LoraPlusConfig(loraplus_lr_ratio, loraplus_lr_embedding, loraplus_weight_decay)
    named = model.net.named_trainable_parameters()
    if not named:
        raise ConfigError("create_loraplus_optimizer: the model has no trainable parameters; apply an adapter first")
    groups = loraplus_groups(model, named, opts.loraplus_lr_ratio, opts.loraplus_weight_decay)
    return AdamW(named, lr=lr, betas=betas, eps=eps, groups=groups)


class LoraPlusHook(TrainingHook):
    """LoRA+ in model.train: the groups above, on the TrainingConfig's learning-rate schedule."""
    key = "loraplus"

    def __init__(self, model, opts: LoraPlusConfig):
        self.model, self.opts = model, opts

    def optimizer(self, named, groups, cfg):
        wd = cfg.weight_decay if self.opts.loraplus_weight_decay is None else self.opts.loraplus_weight_decay
        own = loraplus_groups(self.model, named, self.opts.loraplus_lr_ratio, wd)
        for name, g in groups.items():  # other hooks' groups: their lr_scale multiplies LoRA+'s
            own[name] = {"lr_scale": own[name]["lr_scale"] * g.get("lr_scale", 1.0),
                         "weight_decay": g.get("weight_decay", own[name]["weight_decay"])}
        return AdamW(named, lr=cfg.learning_rate, groups=own)


register("loraplus", LoraPlusConfig, kind="optimiser", hook=LoraPlusHook,
         paper="LoRA+: Efficient Low Rank Adaptation of Large Models, Hayou, Ghosh, Yu 2024, arXiv:2402.12354",
         summary="LoRA+, AdamW with the learning rate of lora_B (and 1-d parameters) ratio times that of "
                 "lora_A (spec/loraplus.md).")
