"""LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning
(Zhang, Zhang, Shi, Chu, Li 2023, arXiv:2308.03303), as PEFT 0.21 implements it
(peft/optimizers/lorafa.py LoraFAOptimizer, create_lorafa_optimizer). spec/lorafa.md:

  LORAFA-1 A is frozen (its initial value stays); B and every other trainable parameter are trained.
  LORAFA-2 B's gradient is projected (the paper's optimal g_B for a frozen A, PEFT's projection):
               g~_B = (1 / s^2) g_B (A A^T + delta I_r)^+        delta = 1e-8, s the layer's LoRA scaling
  LORAFA-3 every trained parameter steps with Hugging Face's AdamW (PEFT's base, not torch's):
               m <- b1 m + (1-b1) g,  v <- b2 v + (1-b2) g^2
               p <- p - eta sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)        eps = 1e-6
               p <- p - eta wd p      (decay after the step, on every trained parameter, 1-d included)
           with g = g~_B for B. betas (0.9, 0.999) as PEFT fixes them.

PEFT computes g~_B under bfloat16 autocast when accelerate reports bf16 support (most CPUs and GPUs);
minipeft computes it in the parameters' dtype (float32), the paper's math. LoRA-FA applies to plain
LoRA layers (LoRA, QLoRA); PEFT pairs parameters by the substring "lora" in order, which mis-pairs
DoRA's lora_magnitude_vector and lora_B's bias, so those are refused here.
"""
from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..adapters.lora import LoRALinear, lora_scaling
from ..adapters.registry import register
from ..autograd import no_grad
from ..errors import ConfigError
from ..hooks import TrainingHook
from ..nn.optim import AdamW
from .checks import number
from .pairs import lora_pairs

DELTA = 1e-8  # PEFT's damping before the pseudo-inverse


@dataclasses.dataclass
class LoraFAConfig:
    """PEFT's create_lorafa_optimizer arguments beyond lr and weight_decay. PEFT 0.21 uses each layer's own
    scaling s, not r and lora_alpha; given here, they must agree with every trained LoRA layer."""
    r: int | None = None
    lora_alpha: float | None = None

    def __post_init__(self):
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0):
            raise ConfigError(f"LoraFAConfig.r={self.r!r} must be a positive integer")
        if self.lora_alpha is not None:
            number("LoraFAConfig", "lora_alpha", self.lora_alpha)


def trained_pairs(model, opts: LoraFAConfig) -> list:
    """The LoRA pairs whose B is trainable, checked for LoRA-FA (plain LoRA, no lora_bias, s as r, alpha say)."""
    pairs = [p for p in lora_pairs(model) if p.B.requires_grad]
    if not pairs:
        raise ConfigError("LoRA-FA needs trainable LoRA layers (lora_A, lora_B): apply_lora or apply_qlora first")
    for p in pairs:
        if type(p.delta) is not LoRALinear:
            raise ConfigError(f"LoRA-FA: {p.path} (adapter {p.adapter!r}) is {type(p.delta).__name__}; LoRA-FA is for "
                              f"plain LoRA layers (PEFT's pairing mis-pairs DoRA's magnitude vector)")
        if p.delta.lora_B.bias is not None:
            raise ConfigError(f"LoRA-FA: {p.path} (adapter {p.adapter!r}) has lora_bias=True; LoRA-FA is for LoRA "
                              f"without lora_B's bias (PEFT's pairing mis-pairs it)")
        cfg = model.peft_configs[p.adapter]
        r = p.A.shape[0]
        if opts.r is not None and opts.r != r:
            raise ConfigError(f"LoRA-FA: r={opts.r} but {p.path} (adapter {p.adapter!r}) has rank {r}; PEFT 0.21 "
                              f"uses each layer's own scaling, so leave r and lora_alpha out")
        if opts.lora_alpha is not None and not math.isclose(lora_scaling(opts.lora_alpha, r, cfg.use_rslora), p.delta.s):
            raise ConfigError(f"LoRA-FA: lora_alpha={opts.lora_alpha} gives scaling "
                              f"{lora_scaling(opts.lora_alpha, r, cfg.use_rslora):g} but {p.path} (adapter "
                              f"{p.adapter!r}) has {p.delta.s:g}; leave r and lora_alpha out")
    return pairs


def projected_grad_B(g_B, A, s: float):
    """LORAFA-2: (1 / s^2) g_B (A A^T + delta I)^+, shapes (out, r), (r, in) -> (out, r)."""
    xp = backend.xp_of(A)
    r = A.shape[0]
    AAt = xp.matmul(A, xp.permute_dims(A, (1, 0))) + DELTA * xp.eye(r, dtype=A.dtype)
    return (1.0 / s ** 2) * xp.matmul(g_B, xp.linalg.pinv(AAt))


class LoraFAAdamW(AdamW):
    """LORAFA-3: Hugging Face's AdamW, with B's gradient projected first. `scalings`: {B's name: (A, s)}."""

    def __init__(self, named_params: dict, scalings: dict, lr=1e-3, weight_decay=0.0, eps=1e-6,
                 betas=(0.9, 0.999), groups=None):
        super().__init__(named_params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         no_decay=lambda name, p: False, groups=groups)
        self.scalings = scalings

    def step(self):
        b1, b2 = self.betas
        self.t += 1
        step_size = math.sqrt(1.0 - b2 ** self.t) / (1.0 - b1 ** self.t)
        with no_grad():
            for name, p in self.params.items():
                g = p.grad
                if g is None:
                    continue
                if name in self.scalings:
                    A, s = self.scalings[name]
                    g = projected_grad_B(g, A.data, s)
                xp = backend.xp_of(g)
                m, v = self.moments(name, g)
                lr = self.lr * self.scale[name]
                w = p.data - (lr * step_size) * m / (xp.sqrt(v) + self.eps)
                p.data = w - (lr * self.wd[name]) * w if self.wd[name] else w


def scalings(pairs) -> dict:
    """{B's name: (A, s)}: what LoraFAAdamW projects B's gradient with."""
    return {p.b_name: (p.A, p.delta.s) for p in pairs}


def _freeze_A(pairs) -> list:
    """Freeze every A (LORAFA-1); returns [(A, requires_grad before)]."""
    before = [(p.A, p.A.requires_grad) for p in pairs]
    for p in pairs:
        p.A.requires_grad = False
        p.A.grad = None
    return before


def create_lorafa_optimizer(model, r: int | None = None, lora_alpha: float | None = None, lr: float = 1e-3,
                            weight_decay: float = 0.0) -> LoraFAAdamW:
    """peft.optimizers.create_lorafa_optimizer: freezes every lora_A of the trained LoRA layers (for good, as
    PEFT does) and returns the LoRA-FA AdamW over the remaining trainable parameters."""
    pairs = trained_pairs(model, LoraFAConfig(r, lora_alpha))
    _freeze_A(pairs)
    named = model.net.named_trainable_parameters()
    return LoraFAAdamW(named, scalings(pairs), lr=lr, weight_decay=weight_decay)


class LoraFAHook(TrainingHook):
    """LoRA-FA in model.train: A frozen while training (and trainable again after, as before), LoRA-FA's AdamW
    with the TrainingConfig's learning-rate schedule and weight decay."""
    key = "lorafa"

    def __init__(self, model, opts: LoraFAConfig):
        self.pairs = trained_pairs(model, opts)
        self.before = _freeze_A(self.pairs)

    def optimizer(self, named, groups, cfg):
        return LoraFAAdamW(named, scalings(self.pairs), lr=cfg.learning_rate,
                           weight_decay=cfg.weight_decay, groups=groups)

    def end(self):
        for A, trainable in self.before:
            A.requires_grad = trainable


register("lorafa", LoraFAConfig, kind="optimiser", hook=LoraFAHook,
         paper="LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning, Zhang et al. "
               "2023, arXiv:2308.03303",
         summary="LoRA-FA, lora_A frozen and lora_B trained with the projected gradient (1/s^2) g_B (A A^T)^-1 "
                 "(spec/lorafa.md).")
