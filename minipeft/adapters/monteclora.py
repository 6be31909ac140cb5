"""MonteCLoRA: Robust and Efficient Fine-tuning of LLMs with Bayesian Reparameterization of Low-Rank Adaptation
(Seth, Pathak, Sengupta, Verma, Raman, Gopalakrishnan, Chatterjee, Chakraborty, TMLR 2025, arXiv:2411.04358), as
PEFT 0.21.2's LoraConfig(monteclora_config=...), spec/monteclora.md.

LoRA (lora.py) whose A, in training, is a Dirichlet-weighted mixture of N Gaussian samples around it, with a
Wishart-drawn diagonal covariance. Symbols: A (r, in), B (out, r), s = alpha / r (LORA-2), N = num_samples,
    sigma (r,) PEFT's std_prior, rho (N,) expert_weights_prior, lam = sample_scaler, kappa = kl_loss_weight,
    a0 = dirichlet_prior.
Init (MONTECLORA-1): A, B LoRA's (B = 0); sigma, rho ~ U(0, 1); the saved state gaussian_var_prior = I_r and
    expert_weights = 1 / N.
Eval (MONTECLORA-2): h = W0 x + b + s (B A x + b_B), LoRA's; dW = s B A, merge and unmerge LoRA's.
Training (MONTECLORA-3), one draw per forward of each layer: d_o ~ chi^2_r (the diagonal of a Wishart(r, I) draw),
    z (N, in, r), zeta (N,) ~ N(0, 1);
    g_o = max(e^{2 sigma_o} d_o, 1e-3), eps_n = lam z_n diag(sqrt(g)) (in, r);
    alpha = max(e^rho, 1e-6), mu = log alpha - mean(log alpha),
    t = max((1 / alpha) (1 - 2 / N) + (1 / N^2) sum(1 / alpha), 1e-6), w = softmax(mu + sqrt(t + 1e-6) zeta);
    A~^T = sum_n w_n (A^T + eps_n), h = W0 x + b + s (B A~ dropout(x) + b_B); g and w become the saved state.
Regulariser (MONTECLORA-4): per layer kappa (KL_D + KL_W + KL_G) + [use_entropy] sum w^2, averaged over the
    layers (PEFT's _get_monteclora_loss), with KL_D = lgG(sum alpha') - lgG(N a0) + sum (lgG(alpha') - lgG(a0))
    + sum (alpha' - a0)(psi(alpha') - psi(sum alpha')), alpha' = e^rho (PEFT's signs),
    KL_W = r / 2 (sum e^{2 sigma} - 2 sum sigma - r), KL_G = N / 2 (sum g - sum log g - r); model.train adds it.
Trainable (MONTECLORA-5): A, B, sigma, rho: r (in + out) + r + N per layer (+ out with lora_bias).
Serialization (MONTECLORA-6): PEFT's LoraConfig with monteclora_config (peft_type "LORA"); keys
    <layer>.lora_monteclora_sampler.{std_prior, expert_weights_prior, gaussian_var_prior, expert_weights}.
PEFT parity: peft/tuners/lora/monteclora.py MontecloraSampler (forward, *_reparameterization, *_kl,
    get_variational_loss); variants.py MontecloraLinearVariant.forward; LoraModel._get_monteclora_loss.
Deviations: draws come from the adapter's seeded generator, one per forward (PEFT pre-draws buffer_size of them
    with torch's; the sequence is i.i.d. alike), and only the Wishart draw's diagonal is drawn (all PEFT uses);
    a 4-bit base is refused (PEFT's bitsandbytes layers have no MonteCLoRA variant).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import backend
from ..autograd import functional as F
from ..autograd.function import Function
from ..autograd.tensor import Tensor
from ..hooks import TrainingHook
from ..nn.layers import Linear
from ..nn.module import Module
from .base import check, trainable
from .data_init import sub_config
from .lora import LoRAConfig, LoRALinear
from .registry import register

MONTECLORA_DEFAULTS = {"num_samples": 8, "use_entropy": False, "dirichlet_prior": 0.1, "sample_scaler": 1e-4,
                       "kl_loss_weight": 1e-5, "buffer_size": 150}  # PEFT's MontecloraConfig


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclasses.dataclass
class MonteCLoRAConfig(LoRAConfig):
    """LoRAConfig's fields, plus PEFT's monteclora_config (missing keys: PEFT's MontecloraConfig defaults)."""

    monteclora_config: dict = dataclasses.field(default_factory=dict)

    PEFT_FLAGS = {"monteclora_config": True}
    PEFT_FIELDS = {**LoRAConfig.PEFT_FIELDS, "monteclora_config": "monteclora_config"}

    def validate(self):
        super().validate()
        self.monteclora_config = c = sub_config(self.monteclora_config, MONTECLORA_DEFAULTS, "monteclora_config",
                                                "MontecloraConfig")
        for key in ("num_samples", "buffer_size"):
            check(isinstance(c[key], int) and not isinstance(c[key], bool) and c[key] > 0,
                  f"monteclora_config[{key!r}]", c[key], "must be a positive integer")
        check(_number(c["dirichlet_prior"]) and c["dirichlet_prior"] > 0, "monteclora_config['dirichlet_prior']",
              c["dirichlet_prior"], "must be a number > 0 (the Dirichlet prior's concentration)")
        for key in ("sample_scaler", "kl_loss_weight"):
            check(_number(c[key]) and c[key] >= 0, f"monteclora_config[{key!r}]", c[key], "must be a number >= 0")
        check(isinstance(c["use_entropy"], bool), "monteclora_config['use_entropy']", c["use_entropy"],
              "must be True or False")

    def trainable_count(self, layers: dict, mc) -> int:
        """MONTECLORA-5: LoRA's count plus r + N per layer."""
        N = self.monteclora_config["num_samples"]
        return super().trainable_count(layers, mc) + sum(self.rank_alpha_for(p)[0] + N for p in layers)

    def to_peft(self) -> dict:
        d = super().to_peft()
        d["monteclora_config"] = dict(self.monteclora_config)  # the flag's value is the sub-config itself
        return d


def floor(t, eps: float):
    """max(t, eps) elementwise, gradient 1 where t >= eps and 0 below (torch's clamp(min=))."""
    keep = backend.xp_of(t.data).astype(t.data >= eps, t.dtype)
    return t * Tensor(keep) + Tensor(eps * (1.0 - keep))


def _digamma(x, k: int = 0):
    """psi (k = 0) or psi' (k = 1) of a host float64 array: recurrence up to x >= 6, then the asymptotic series."""
    x, acc = np.array(x, dtype=np.float64), np.zeros(np.shape(x))
    while np.any(x < 6):
        small = x < 6
        acc = acc - np.where(small, 1 / x if k == 0 else -1 / x ** 2, 0)
        x = np.where(small, x + 1, x)
    i2 = 1 / (x * x)
    if k == 0:
        return acc + np.log(x) - 0.5 / x - i2 * (1 / 12 - i2 * (1 / 120 - i2 * (1 / 252 - i2 / 240)))
    return acc + 1 / x + 0.5 * i2 + (i2 / x) * (1 / 6 - i2 * (1 / 30 - i2 * (1 / 42 - i2 / 30)))


class LogGamma(Function):
    """log Gamma(a), elementwise; d/da = psi(a) (MONTECLORA-4)."""

    def forward(self, a):
        self.host = backend.to_host(a).astype(np.float64)
        return backend.asarray(np.vectorize(math.lgamma)(self.host), backend.dtype_name(a))

    def backward(self, g):
        return (g * backend.asarray(_digamma(self.host), backend.dtype_name(g)),)


class Digamma(Function):
    """psi(a), elementwise; d/da = psi'(a)."""

    def forward(self, a):
        self.host = backend.to_host(a).astype(np.float64)
        return backend.asarray(_digamma(self.host), backend.dtype_name(a))

    def backward(self, g):
        return (g * backend.asarray(_digamma(self.host, 1), backend.dtype_name(g)),)


class Sampler(Module):
    """PEFT's MontecloraSampler: the trained sigma (r,), rho (N,) and the last draw's g, w (saved, not trained)."""

    def __init__(self, r: int, N: int, rng):
        self.std_prior, self.expert_weights_prior = trainable(rng.uniform((r,), 0, 1)), trainable(rng.uniform((N,), 0, 1))
        xp = backend.xp()
        self.state = [Tensor(xp.eye(r, dtype=backend.dtype("float32"))),  # gaussian_var_prior (r, r)
                      Tensor(xp.full((N,), 1.0 / N, dtype=backend.dtype("float32")))]  # expert_weights (N,)
        self.last = None  # (g, w) Tensors of the last training forward, for the regulariser


class MonteCLoRAHook(TrainingHook):
    """One active MonteCLoRA adapter in model.train: its regulariser in the loss (MONTECLORA-4)."""

    def __init__(self, name: str, deltas: dict, cfg: MonteCLoRAConfig):
        self.key, self.deltas, self.cfg = name, deltas, cfg

    def regularization(self):
        terms = [d.regularization() for d in self.deltas.values()]
        return sum(terms[1:], terms[0]) * (1.0 / len(terms)) if terms else None


class MonteCLoRALinear(LoRALinear):
    training_hook = MonteCLoRAHook

    @classmethod
    def create(cls, base, cfg: MonteCLoRAConfig, path: str, rng, init_weights: bool = True):
        check(isinstance(base, Linear), f"target_modules (for {path})", type(base).__name__,
              "MonteCLoRA needs a float Linear base (PEFT's 4-bit LoRA layers have no MonteCLoRA variant)")
        delta = super().create(base, cfg, path, rng, init_weights)
        delta.c = cfg.monteclora_config
        delta.lora_monteclora_sampler = Sampler(delta.lora_A.weight.shape[0], delta.c["num_samples"], rng)
        return delta

    def saved_parameters(self):  # MONTECLORA-6: the sampler's state beside the trained leaves
        g, w = self.lora_monteclora_sampler.state
        return list(self.named_parameters()) + [("lora_monteclora_sampler.gaussian_var_prior", g),
                                                ("lora_monteclora_sampler.expert_weights", w)]

    def draw(self):
        """MONTECLORA-3's draws: d (r,) ~ chi^2_r, z (N, in, r), zeta (N,) ~ N(0, 1), host-seeded."""
        (r, n), N = self.lora_A.weight.shape, self.c["num_samples"]
        e = self.rng.normal((r, r))
        d = backend.xp_of(e).sum(e * e, axis=1)  # (r,): r squared normals each
        return d, self.rng.normal((N, n, r)), self.rng.normal((N,))

    def sampled_A(self):
        """A~ (r, in) for one training forward (MONTECLORA-3); keeps (g, w) for the regulariser and the file."""
        smp, (r, n), N, lam = self.lora_monteclora_sampler, self.lora_A.weight.shape, self.c["num_samples"], \
            self.c["sample_scaler"]
        d, z, zeta = (Tensor(a) for a in self.draw())
        g = floor((smp.std_prior * 2.0).exp() * d, 1e-3)  # (r,)
        eps = z * (g.sqrt() * lam).reshape(1, 1, r)  # (N, in, r)
        alpha = floor(smp.expert_weights_prior.exp(), 1e-6)  # (N,)
        mu = alpha.log() - alpha.log().mean()
        inv = 1.0 / alpha
        t = floor(inv * (1 - 2 / N) + inv.sum() * (1 / N ** 2), 1e-6)  # (N,)
        w = F.softmax(mu + (t + 1e-6).sqrt() * zeta)  # (N,)
        At = (w.reshape(N, 1, 1) * (self.lora_A.weight.T.reshape(1, n, r) + eps)).sum(axis=0)  # (in, r)
        xp = backend.xp_of(g.data)
        smp.state[0].data, smp.state[1].data = xp.eye(r, dtype=g.dtype) * g.data[None, :], w.data
        smp.last = (g, w)
        return At.T

    def adapt(self, x, y, base):  # MONTECLORA-2, MONTECLORA-3
        h = F.dropout(x, self.p, self.rng, self.training)
        z = F.linear(h, self.sampled_A()) if self.training else self.lora_A(h)
        return y + self.lora_B(z) * self.s

    def regularization(self):
        """MONTECLORA-4 of this layer, a scalar Tensor (0 before a training forward, as PEFT's in eval)."""
        smp, c = self.lora_monteclora_sampler, self.c
        if smp.last is None or not self.training:
            return Tensor(backend.xp().zeros((), dtype=backend.dtype("float32")))
        g, w = smp.last
        sigma, a2 = smp.std_prior, smp.expert_weights_prior.exp()
        N, r, a0 = c["num_samples"], sigma.shape[0], float(c["dirichlet_prior"])
        S2, lg = a2.sum(), lambda t: LogGamma.apply(t)
        kl_d = (lg(S2) - math.lgamma(N * a0) + (lg(a2) - math.lgamma(a0)).sum()
                + ((a2 - a0) * (Digamma.apply(a2) - Digamma.apply(S2))).sum())
        kl_w = ((sigma * 2.0).exp().sum() - sigma.sum() * 2.0 - r) * (r / 2)
        kl_g = (g.sum() - g.log().sum() - r) * (N / 2)
        loss = (kl_d + kl_w + kl_g) * c["kl_loss_weight"]
        return loss + (w * w).sum() if c["use_entropy"] else loss


register("monteclora", MonteCLoRAConfig, MonteCLoRALinear,
         paper="Robust and Efficient Fine-tuning of LLMs with Bayesian Reparameterization of Low-Rank Adaptation, "
               "Seth et al. 2025, arXiv:2411.04358",
         summary="MonteCLoRA, LoRA whose A trains as a Dirichlet-weighted mixture of Wishart-scaled Gaussian "
                 "samples around it; eval and merge are LoRA's (spec/monteclora.md).")
