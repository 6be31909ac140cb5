"""PVeRA: Probabilistic Vector-Based Random Matrix Adaptation (Fillioux, Ferrante, Cournède, Vakalopoulou,
Christodoulidis 2025, arXiv:2512.07703).

Symbols: as VeRA (spec/vera.md): W0 (out, in), x (..., in); A (2r, max_in) and B (max_out, r) frozen, random,
    shared by every adapted layer; A_s = A[:, :in] (2r, in), B_s = B[:out, :] (out, r); lam_d (2r,) and
    lam_b (out,) trained (PEFT's pvera_lambda_d, pvera_lambda_b). [mu; logvar] = lam_d ⊙ (A_s x), split in halves
    of r: the first half is a mean, the second a log-variance.
Init (PVERA-1): lam_b = 0, lam_d = d_initial (both halves), so h = W0 x + b at step 0. A, B as VERA-1 (A has 2r
    rows), from backend.RNG(projection_prng_key), A drawn first.
Forward (PVERA-2): h = W0 x + b + lam_b ⊙ (B_s z), z = mu in eval mode,
    z = mu + eps ⊙ exp(logvar / 2), eps ~ N(0, 1) in training (and in eval with sample_at_inference).
Noise (PVERA-3): eps comes from the model's explicit RNG (backend.RNG(generator_seed) per layer when
    generator_seed is set); one draw of shape (..., r) per forward.
Delta weight / merge (PVERA-4): dW = diag(lam_b) B_s diag(lam_d[:r]) A_s[:r], (out, in): the mean path only;
    merged forward = eval forward; unmerge subtracts it.
Trainable (PVERA-5): lam_b and lam_d only: out + 2r numbers per layer; W0, A and B get no gradient.
Serialization (PVERA-6): peft_type "PVERA"; keys <layer>.pvera_lambda_b (out,), <layer>.pvera_lambda_d (2r,) and,
    with save_projection, base_model.pvera_A (2r, max_in) and base_model.pvera_B (max_out, r).
PEFT parity: peft/tuners/pvera/layer.py Linear.forward, _reparametrize, get_delta_weight;
    peft/tuners/pvera/model.py _init_pvera_A_pvera_B.
Deviations: sampled training noise cannot equal torch's (PEFT draws eps with torch.randn, minipeft from NumPy's
    PCG64): training-mode outputs agree with PEFT in distribution only; eval and merge agree exactly. A and B are
    drawn as VeRA's (VERA-1's deviation), so a file saved with save_projection=False is refused (PVERA-7).
    PEFT's init_weights=False (debug: lam_b = 1, lam_d ~ N(0, 1)) is not offered.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd import functional as F
from ..autograd.tensor import Tensor
from .base import check, trainable
from .registry import register
from .vera import VeRAConfig, VeRALinear


@dataclasses.dataclass
class PVeRAConfig(VeRAConfig):
    """VeRAConfig's fields (rank, projection_prng_key, save_projection, dropout, d_initial, ...) and:"""
    sample_at_inference: bool = False  # draw z in eval mode too (then eval is random and merge is not eval)
    generator_seed: int | None = None  # each layer's own noise stream, backend.RNG(generator_seed); None: the model's

    bias: str = "none"  # "none" | "all" | "pvera_only"

    peft_type = "PVERA"
    BIAS_MODES = ("none", "all", "pvera_only")
    PEFT_FIELDS = {**VeRAConfig.PEFT_FIELDS, "dropout": "pvera_dropout", "sample_at_inference": "sample_at_inference",
                   "generator_seed": "generator_seed"}

    def validate(self):
        super().validate()
        check(isinstance(self.sample_at_inference, bool), "sample_at_inference", self.sample_at_inference,
              "must be True or False")
        check(self.generator_seed is None or (isinstance(self.generator_seed, int)
                                              and not isinstance(self.generator_seed, bool)
                                              and self.generator_seed >= 0),
              "generator_seed", self.generator_seed, "must be None or an integer >= 0")

    def trainable_count(self, layers: dict, mc) -> int:
        """PVERA-5: lam_b (out,) and lam_d (2r,) per layer; the shared A, B are frozen."""
        return sum(m + 2 * self.rank for _, m in layers.values())


class PVeRALinear(VeRALinear):
    SHARED = ("pvera_A", "pvera_B")

    def __init__(self, in_features, out_features, projections: tuple, cfg: PVeRAConfig, rng):
        self.bind(in_features, out_features, projections, cfg, rng)
        self.r, self.sample_at_inference = cfg.rank, cfg.sample_at_inference
        self.noise = rng if cfg.generator_seed is None else backend.RNG(cfg.generator_seed)  # PVERA-3
        xp = backend.xp()
        self.pvera_lambda_b = trainable(xp.zeros((out_features,), dtype=backend.dtype("float32")))  # (out,)
        self.pvera_lambda_d = trainable(xp.full((2 * cfg.rank,), cfg.d_initial, dtype=backend.dtype("float32")))

    @staticmethod
    def a_rows(cfg) -> int:
        return 2 * cfg.rank

    def low_rank(self, h):  # PVERA-2: lam_b ⊙ (B_s z), (..., out)
        A_s, B_s = self.slices()
        u = self.pvera_lambda_d * F.linear(h, A_s)  # (..., 2r): [mu, logvar]
        mu, logvar = u[..., :self.r], u[..., self.r:]  # (..., r) each
        z = mu
        if self.training or self.sample_at_inference:  # reparameterisation: mu + eps ⊙ sigma
            eps = Tensor(self.noise.normal(mu.shape, dtype=backend.dtype_name(mu.data)))  # (..., r)
            z = mu + eps * (logvar * 0.5).exp()
        return self.pvera_lambda_b * F.linear(z, B_s)

    def delta_weight(self):  # PVERA-4: diag(lam_b) B_s diag(lam_d[:r]) A_s[:r], (out, in)
        A_s, B_s = (t.data for t in self.slices())
        xp = backend.xp_of(A_s)
        mean_d = self.pvera_lambda_d.data[:self.r, None]  # (r, 1): lam_d's mean half
        return xp.matmul(self.pvera_lambda_b.data[:, None] * B_s, mean_d * A_s[:self.r])


register("pvera", PVeRAConfig, PVeRALinear,
         paper="PVeRA: Probabilistic Vector-Based Random Matrix Adaptation, Fillioux et al. 2025, arXiv:2512.07703",
         summary="PVeRA, VeRA whose lam_d is a (mean, log-variance) pair: z = mu + eps exp(logvar/2) sampled in "
                 "training, the mean in eval and merge (spec/pvera.md).")
