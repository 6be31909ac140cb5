"""Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models (Zhang & Pilanci 2024, arXiv:2402.02347),
as PEFT 0.21 implements it (peft/optimizers/riemannian.py create_riemannian_optimizer). spec/riemannian.md:

  RIEM-1 before each AdamW step, every trainable LoRA pair (A (r, in), B (out, r), both 2-d) has its
         gradients replaced by the scaled-gradient directions, both from the factors before the step:
             g_A <- (B^T B + reg I_r)^+ g_A        g_B <- g_B (A A^T + reg I_r)^+        reg = 1e-2
  RIEM-2 then torch.optim.AdamW steps every trainable parameter with the preconditioned gradients
         (weight decay on every parameter, 1-d ones too, as torch's AdamW without groups does).
Other trainable parameters (modules_to_save, biases, DoRA's magnitude) step unpreconditioned.
In model.train the clipping of TRAIN-1 comes before the preconditioning, as in a Trainer.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..adapters.registry import register
from ..autograd import no_grad
from ..errors import ConfigError
from ..hooks import TrainingHook
from ..nn.optim import AdamW
from .checks import number
from .pairs import lora_pairs


@dataclasses.dataclass
class RiemannianConfig:
    """PEFT's create_riemannian_optimizer `reg`: the damping added to the r x r matrices' diagonal."""
    reg: float = 1e-2

    def __post_init__(self):
        number("RiemannianConfig", "reg", self.reg, strict=False)


def damped_inverse(M, reg: float):
    """(M + reg I)^+ of a square r x r matrix."""
    xp = backend.xp_of(M)
    return xp.linalg.pinv(M + reg * xp.eye(M.shape[0], dtype=M.dtype))


def precondition(A, B, g_A, g_B, reg: float):
    """RIEM-1: ((B^T B + reg I)^+ g_A, g_B (A A^T + reg I)^+); a None gradient stays None."""
    xp = backend.xp_of(A)
    t = lambda M: xp.permute_dims(M, (1, 0))  # noqa: E731
    new_A = None if g_A is None else xp.matmul(damped_inverse(xp.matmul(t(B), B), reg), g_A)
    new_B = None if g_B is None else xp.matmul(g_B, damped_inverse(xp.matmul(A, t(A)), reg))
    return new_A, new_B


def trainable_pairs(model) -> list:
    pairs = [p for p in lora_pairs(model) if p.A.requires_grad and p.B.requires_grad]
    if not pairs:
        raise ConfigError("the Riemannian preconditioner needs trainable lora_A/lora_B pairs: apply a LoRA-style "
                          "adapter (apply_lora, apply_qlora, apply_dora) first")
    return pairs


class RiemannianAdamW(AdamW):
    """RIEM-2: AdamW (torch's rule, decay on every parameter) on preconditioned LoRA gradients."""

    def __init__(self, named_params: dict, pairs: list, reg: float = 1e-2, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, groups=None):
        super().__init__(named_params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         no_decay=lambda name, p: False, groups=groups)
        self.pairs, self.reg = pairs, reg

    def step(self):
        with no_grad():
            for p in self.pairs:
                p.A.grad, p.B.grad = precondition(p.A.data, p.B.data, p.A.grad, p.B.grad, self.reg)
        super().step()


def create_riemannian_optimizer(model, *, lr: float, reg: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8,
                                weight_decay: float = 0.0) -> RiemannianAdamW:
    """peft.optimizers.create_riemannian_optimizer with optimizer_cls=torch.optim.AdamW."""
    opts = RiemannianConfig(reg)
    pairs = trainable_pairs(model)
    named = model.net.named_trainable_parameters()
    return RiemannianAdamW(named, pairs, opts.reg, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class RiemannianHook(TrainingHook):
    """The Riemannian preconditioner in model.train, on the TrainingConfig's schedule and weight decay."""
    key = "riemannian"

    def __init__(self, model, opts: RiemannianConfig):
        self.pairs, self.reg = trainable_pairs(model), opts.reg

    def optimizer(self, named, groups, cfg):
        return RiemannianAdamW(named, self.pairs, self.reg, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                               groups=groups)


register("riemannian", RiemannianConfig, kind="optimiser", hook=RiemannianHook,
         paper="Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models, Zhang & Pilanci 2024, "
               "arXiv:2402.02347",
         summary="Riemannian preconditioned LoRA, AdamW on g_A (B^T B + reg I)^-1 and g_B (A A^T + reg I)^-1 "
                 "(spec/riemannian.md).")
