"""AdamW and learning-rate schedules (spec/training.md TRAIN-1, TRAIN-2).

AdamW (Loshchilov & Hutter, arXiv:1711.05101), as torch.optim.AdamW computes it:
    p <- p - lr * wd * p                       (decoupled weight decay, before the moment update)
    m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
    p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
"""
from __future__ import annotations

import math

from .. import backend
from ..autograd import no_grad


class AdamW:
    def __init__(self, named_params: dict, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 no_decay=lambda name, p: p.ndim < 2, groups: dict | None = None):
        """named_params: {name: Tensor}; parameters for which no_decay(name, p) is true (biases,
        norm weights by default, as the HF Trainer does) get no weight decay. groups: {name:
        {"lr_scale": c, "weight_decay": wd}} for parameters that step with lr * c or decay by their own wd
        (torch's parameter groups: TRAIN-10)."""
        self.params = named_params
        self.lr, self.betas, self.eps = lr, betas, eps
        groups = groups or {}
        self.scale = {n: float(groups.get(n, {}).get("lr_scale", 1.0)) for n in named_params}
        self.wd = {n: 0.0 if no_decay(n, p) and "weight_decay" not in groups.get(n, {}) else
                   float(groups.get(n, {}).get("weight_decay", weight_decay)) for n, p in named_params.items()}
        self.m, self.v, self.t = {}, {}, 0

    def step(self):
        self.t += 1
        with no_grad():
            for name, p in self.params.items():
                if p.grad is None:
                    continue
                w, lr = p.data, self.lr * self.scale[name]
                if self.wd[name]:
                    w = w * (1.0 - lr * self.wd[name])
                p.data = w - lr * self.direction(name, p.grad)

    def direction(self, name: str, g):
        """The step of parameter `name` before the learning rate: (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)."""
        b1, b2 = self.betas
        m, v = self.moments(name, g)
        return (m / (1.0 - b1 ** self.t)) / (backend.xp_of(g).sqrt(v / (1.0 - b2 ** self.t)) + self.eps)

    def moments(self, name: str, g):
        """Update and return (m, v) of parameter `name` with its gradient g (zeros before the first step)."""
        b1, b2 = self.betas
        if name not in self.m:
            xp = backend.xp_of(g)
            self.m[name], self.v[name] = xp.zeros_like(g), xp.zeros_like(g)
        m = self.m[name] = b1 * self.m[name] + (1.0 - b1) * g
        v = self.v[name] = b2 * self.v[name] + (1.0 - b2) * (g * g)
        return m, v

    def zero_grad(self):
        for p in self.params.values():
            p.grad = None

    def state_dict(self) -> dict:
        """Arrays on the host keyed "m.<name>", "v.<name>", plus the step count."""
        out = {f"m.{n}": backend.to_host(a) for n, a in self.m.items()}
        out.update({f"v.{n}": backend.to_host(a) for n, a in self.v.items()})
        return out

    def load_state_dict(self, arrays: dict, t: int):
        self.t = t
        self.m = {k[2:]: backend.asarray(a) for k, a in arrays.items() if k.startswith("m.")}
        self.v = {k[2:]: backend.asarray(a) for k, a in arrays.items() if k.startswith("v.")}


def lr_at(step: int, base_lr: float, warmup: int, total: int, kind: str = "linear") -> float:
    """Linear warmup from 0 to base_lr over `warmup` steps, then linear or cosine decay to 0 at
    `total` (the HF get_linear/cosine_schedule_with_warmup rules; step counts from 0)."""
    if step < warmup:
        return base_lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return base_lr * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if kind == "constant":
        return base_lr
    return base_lr * max(0.0, 1.0 - progress)


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm before."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    xp = backend.xp_of(grads[0])
    total = math.sqrt(sum(float(backend.to_host(xp.sum(g * g))) for g in grads))
    if max_norm and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in params:
            if p.grad is not None:
                p.grad = p.grad * scale
    return total
