"""Flora: Low-Rank Adapters Are Secretly Gradient Compressors (Hao, Cao, Mou 2024, ICML, arXiv:2402.03293):
an Adam whose first moment lives compressed by a random projection resampled every kappa steps, so the momentum
of a weight W (out, in) takes out x r numbers while the sum of the updates is not limited to rank r
(spec/flora.md). The paper's Algorithm 2 ("momentum with Flora") on AdamW; t counts steps from 1, G = dL/dW:

  FLORA-1 projection of the i-th trainable parameter: A_j ~ N(0, 1/r), (r, in), drawn from backend.RNG([seed, i, j])
          with j = floor(t / kappa): a new A at every step t that is a multiple of kappa.
  FLORA-2 v <- b2 v + (1 - b2) G^2 (AdamW's, full);  u = G / (sqrt(v / (1 - b2^t)) + eps);  M (out, r), 0 at first:
              M <- M A_{j-1} A_j^T    at a resample (t mod kappa = 0): the momentum moves to the new projection
              M <- b1 M + (1 - b1) u A_j^T
  FLORA-3 W <- W (1 - eta wd) - eta M A_j / (1 - b1^t)      (wd as TRAIN-1: 2-d parameters)
  FLORA-4 compressed are the 2-d parameters with r < in; every other parameter steps as AdamW (TRAIN-1).

Deviations: the paper runs Flora on Adafactor, whose momentum averages the preconditioned update (as here) but
with a factored second moment, update clipping and a relative step size; minipeft preconditions with AdamW's
full v, so only the first moment is compressed. The authors' code adds the current update uncompressed to the
decompressed old momentum; minipeft follows Algorithm 2 (the current update enters compressed). Algorithm 1
(gradient accumulation compressed by the same projection) is not implemented: micro-batch gradients are summed
in full (TRAIN-3).
"""
from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..adapters.registry import register
from ..errors import ConfigError
from ..hooks import TrainingHook
from ..nn.optim import AdamW


def _count(field: str, v, minimum: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"FloraConfig.{field}={v!r} must be an integer >= {minimum}")


@dataclasses.dataclass
class FloraConfig:
    rank: int = 8  # r: the compressed momentum of W (out, in) is (out, r)
    kappa: int = 1000  # resample the projection every kappa optimizer steps
    seed: int = 0  # the projections draw from backend.RNG([seed, parameter index, resample count])

    def __post_init__(self):
        _count("rank", self.rank, 1)
        _count("kappa", self.kappa, 1)
        _count("seed", self.seed, 0)


class FloraAdamW(AdamW):
    """AdamW with Flora's compressed first moment for the parameters FLORA-4 picks (`self.compressed`)."""

    def __init__(self, named_params: dict, opts: FloraConfig, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, groups=None):
        super().__init__(named_params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, groups=groups)
        self.opts = opts
        self.index = {n: i for i, n in enumerate(named_params)}
        self.compressed = {n for n, p in named_params.items() if p.ndim == 2 and opts.rank < p.shape[1]}  # FLORA-4
        self.latest = {}  # {name: (j, A_j)}: the projection last drawn, drawn again only when j changes

    def projection(self, name: str, j: int):
        """FLORA-1: A_j of parameter `name`, (r, in)."""
        if self.latest.get(name, (None,))[0] != j:
            r, n = self.opts.rank, self.params[name].shape[1]
            rng = backend.RNG([self.opts.seed, self.index[name], j])
            self.latest[name] = (j, rng.normal((r, n), std=1.0 / math.sqrt(r)))
        return self.latest[name][1]

    def direction(self, name: str, g):
        if name not in self.compressed:
            return super().direction(name, g)
        b1, b2 = self.betas
        xp = backend.xp_of(g)
        if name not in self.m:
            self.m[name], self.v[name] = xp.zeros((g.shape[0], self.opts.rank), dtype=g.dtype), xp.zeros_like(g)
        v = self.v[name] = b2 * self.v[name] + (1.0 - b2) * (g * g)  # (out, in)
        u = g / (xp.sqrt(v / (1.0 - b2 ** self.t)) + self.eps)  # FLORA-3: Adam's preconditioned gradient
        j, M = self.t // self.opts.kappa, self.m[name]  # M (out, r)
        if self.t % self.opts.kappa == 0:  # FLORA-2: the momentum moves to the new projection
            A_old = self.projection(name, j - 1)  # (r, in)
            M = xp.matmul(M, xp.matmul(A_old, xp.matrix_transpose(self.projection(name, j))))  # (out, r) (r, r)
        A = self.projection(name, j)  # (r, in)
        M = self.m[name] = b1 * M + (1.0 - b1) * xp.matmul(u, xp.matrix_transpose(A))  # (out, r)
        return xp.matmul(M, A) / (1.0 - b1 ** self.t)  # FLORA-3: decompressed, (out, in)


def flora_optimizer(named: dict, opts: FloraConfig, **kw) -> FloraAdamW:
    """FloraAdamW over `named`, refused where Flora would compress nothing."""
    opt = FloraAdamW(named, opts, **kw)
    if not opt.compressed:
        raise ConfigError(f"Flora compresses 2-d trainable parameters with more than rank={opts.rank} input "
                          f"columns, and this model has none: lower rank, or train full weights "
                          f"(model.net.requires_grad_(True))")
    return opt


def create_flora_optimizer(model, *, lr: float, rank: int = 8, kappa: int = 1000, seed: int = 0,
                           betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> FloraAdamW:
    """Flora over the model's trainable parameters, for a loop of your own."""
    named = model.net.named_trainable_parameters()
    return flora_optimizer(named, FloraConfig(rank, kappa, seed), lr=lr, betas=betas, eps=eps,
                           weight_decay=weight_decay)


class FloraHook(TrainingHook):
    """Flora in model.train, on the TrainingConfig's schedule and weight decay. Its checkpoint state names the
    projections (seed, rank, kappa); the compressed moments M are the optimizer's own state (m.<name>)."""
    key = "flora"

    def __init__(self, model, opts: FloraConfig):
        self.opts = opts

    def optimizer(self, named, groups, cfg):
        return flora_optimizer(named, self.opts, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, groups=groups)

    def state(self):
        return {}, dataclasses.asdict(self.opts)

    def load_state(self, arrays, info):
        for field, saved in info.items():
            if getattr(self.opts, field) != saved:
                raise ConfigError(f"Flora: the checkpoint's moments were compressed with {field}={saved}, "
                                  f"but FloraConfig has {field}={getattr(self.opts, field)}; resume with the same")


register("flora", FloraConfig, kind="optimiser", hook=FloraHook,
         paper="Flora: Low-Rank Adapters Are Secretly Gradient Compressors, Hao, Cao, Mou 2024, arXiv:2402.03293",
         summary="Flora, AdamW with its first moment compressed by a random projection A (r, in) resampled every "
                 "kappa steps, M <- M A_old A_new^T at each resample (spec/flora.md).")
