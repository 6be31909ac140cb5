"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al. 2023, arXiv:2303.10512).

Symbols: W0 (out, in) frozen base weight, x (..., in); per layer P = lora_B (out, r), Λ = lora_E (r, 1),
    Q = lora_A (r, in), r = initial_rank (fewer after a pruned load); ranknum = initial_rank always.
Scaling (ADALORA-2): s = alpha / (ranknum + 1e-5)   (PEFT's scaling / (ranknum + 1e-5)).
Forward (ADALORA-3): h = W0 x + b + s B ((A ⊙ E) dropout(x)),   A ⊙ E scales row i of A by E_i.
Delta weight / merge (ADALORA-4): dW = s B (A ⊙ E), (out, in); W <- W0 + dW; unmerge subtracts it.
Init (ADALORA-1): E = 0, A ~ N(0, 0.02²), B ~ N(0, 0.02²) (A drawn first), so h = W0 x + b at step 0.
Trainable (ADALORA-5): A, B, E of the active adapter; W0 gets no gradient.
Penalty (ADALORA-6): R = orth_reg_weight * mean over the 2n matrices of ||A Aᵀ - I||_F and ||Bᵀ B - I||_F
    (the norm, not its square), added to the training loss.
Budget (ADALORA-7): b(t) = b0 for t <= tinit; b_T for t > total_step - tfinal; otherwise
    b(t) = floor((b0 - b_T) (1 - (t - tinit) / (total_step - tfinal - tinit))³ + b_T), b0 = Σ r,
    b_T = target_rank * n; masking happens at t with t % delta_t == 0 in the middle phase.
Sensitivity (ADALORA-8): for every entry w of A, B, E: I = |w ⊙ ∂L/∂w|, Ī <- β1 Ī + (1 - β1) I,
    U <- β2 U + (1 - β2) |I - Ī|, score s(w) = Ī U; triplet i: S_i = s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki)).
Masking (ADALORA-9): E_i <- 0 where S_i <= the (b0 - b)-th smallest S over all layers; rank_pattern[path.lora_E]
    = [S_i > threshold]; at t = total_step - tfinal the final mask, after it rank_pattern masks E each step.
Serialization (ADALORA-10): keys <layer>.lora_A (r, in), lora_B (out, r), lora_E (r, 1); a rank_pattern
    keeps only its True rows on save, and a load sizes each layer to sum(mask) (ranknum stays initial_rank).
PEFT parity: peft/tuners/adalora/layer.py SVDLinear.forward, get_delta_weight, RankAllocator; model.py
    AdaLoraModel.forward (penalty), update_and_allocate, resize_*_by_rank_pattern.
Deviations: initial_rank <= min(in, out) is required (PEFT accepts any); total_step may be None until the
    first allocation (PEFT refuses the config); a budget equal to b0 prunes nothing (PEFT's kthvalue fails).
"""
from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..autograd import functional as F
from ..autograd.tensor import Tensor
from ..hooks import TrainingHook
from .base import AdapterConfig, Delta, check, trainable
from .registry import register


@dataclasses.dataclass
class AdaLoRAConfig(AdapterConfig):
    initial_rank: int = 12
    target_rank: int = 8  # average rank per layer once the budget has shrunk
    alpha: float = 16
    beta_start: float = 0.85  # PEFT's beta1: EMA of the sensitivity
    beta_end: float = 0.95  # PEFT's beta2: EMA of the uncertainty
    tinit: int = 0  # steps before the budget starts to shrink
    tfinal: int = 0  # steps after it reached the target
    delta_t: int = 1  # steps between two maskings
    total_step: int | None = None  # needed by the rank allocation
    orth_reg_weight: float = 0.5
    dropout: float = 0.0
    rank_pattern: dict | None = None  # {"<layer path>.lora_E": [keep] * initial_rank}, set by the allocation

    peft_type = "ADALORA"
    PEFT_FIELDS = {"initial_rank": "init_r", "target_rank": "target_r", "alpha": "lora_alpha", "beta_start": "beta1",
                   "beta_end": "beta2", "tinit": "tinit", "tfinal": "tfinal", "delta_t": "deltaT",
                   "total_step": "total_step", "orth_reg_weight": "orth_reg_weight", "dropout": "lora_dropout",
                   "rank_pattern": "rank_pattern"}

    def validate(self):  # ADALORA-11
        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        check(integer(self.initial_rank) and self.initial_rank > 0, "initial_rank", self.initial_rank,
              "must be a positive integer")
        check(integer(self.target_rank) and 0 < self.target_rank <= self.initial_rank, "target_rank",
              self.target_rank, f"must be an integer in [1, initial_rank={self.initial_rank}]")
        check(number(self.alpha) and self.alpha > 0, "alpha", self.alpha, "must be > 0")
        for field in ("beta_start", "beta_end"):
            check(number(getattr(self, field)) and 0 < getattr(self, field) < 1, field, getattr(self, field),
                  "must lie in (0, 1) (an EMA coefficient)")
        for field in ("tinit", "tfinal"):
            check(integer(getattr(self, field)) and getattr(self, field) >= 0, field, getattr(self, field),
                  "must be an integer >= 0")
        check(integer(self.delta_t) and self.delta_t > 0, "delta_t", self.delta_t, "must be a positive integer")
        check(self.total_step is None or (integer(self.total_step) and self.total_step > self.tinit + self.tfinal),
              "total_step", self.total_step, f"must be an integer > tinit + tfinal = {self.tinit} + {self.tfinal}, "
              "so that the budget has steps to shrink in")
        check(number(self.orth_reg_weight) and self.orth_reg_weight >= 0, "orth_reg_weight", self.orth_reg_weight,
              "must be >= 0")
        check(number(self.dropout) and 0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        for k, v in (self.rank_pattern or {}).items():
            check(isinstance(v, list) and len(v) == self.initial_rank and all(isinstance(b, bool) for b in v),
                  f"rank_pattern[{k!r}]", v, f"must be a list of initial_rank={self.initial_rank} booleans")
        check(self.layers_pattern is None or self.layers_to_transform is not None, "layers_pattern",
              self.layers_pattern, "needs layers_to_transform (PEFT's rule)")


    def trainable_count(self, layers: dict, mc) -> int:
        """ADALORA-5: A (r, in), B (out, r), E (r, 1) per layer, r = initial_rank (a fresh adapter)."""
        return sum(self.initial_rank * (n + m + 1) for n, m in layers.values())


def budget_at(step: int, cfg: AdaLoRAConfig, b0: int, b_T: int) -> tuple[int, bool]:
    """ADALORA-7: (budget, whether to mask at this step), PEFT's RankAllocator.budget_schedule."""
    if step <= cfg.tinit:
        return b0, False
    if step > cfg.total_step - cfg.tfinal:
        return b_T, True
    left = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
    return int((b0 - b_T) * left ** 3 + b_T), step % cfg.delta_t == 0


class AdaLoRAHook(TrainingHook):
    """One active AdaLoRA adapter in model.train: the penalty in its loss (ADALORA-6), the rank allocation
    after each step (ADALORA-7..9) and the allocator's state in checkpoints (ADALORA-13)."""

    exclusive = "allocates its own ranks while training"  # ADALORA-12: PEFT trains one AdaLoRA adapter

    def __init__(self, name: str, deltas: dict, cfg: AdaLoRAConfig):
        self.key, self.deltas, self.cfg = name, deltas, cfg

    def regularization(self):
        return AdaLoRALinear.regularization(self.deltas, self.cfg)

    def after_step(self, step: int) -> None:
        AdaLoRALinear.after_step(self.deltas, self.cfg, step)

    def state(self) -> tuple[dict, dict]:
        return AdaLoRALinear.training_state(self.deltas, self.cfg)

    def load_state(self, arrays: dict, info: dict) -> None:
        AdaLoRALinear.load_training_state(self.deltas, self.cfg, arrays, info)


class AdaLoRALinear(Delta):
    LEAVES = ("lora_A", "lora_B", "lora_E")
    training_hook = AdaLoRAHook  # model.train's hook of each active adapter (minipeft/hooks.py)

    def __init__(self, in_features, out_features, r, ranknum, cfg: AdaLoRAConfig, key: str, rng):
        xp = backend.xp()
        f32 = backend.dtype("float32")
        self.lora_A = trainable(xp.zeros((r, in_features), dtype=f32))  # Q (r, in)
        self.lora_B = trainable(xp.zeros((out_features, r), dtype=f32))  # P (out, r)
        self.lora_E = trainable(xp.zeros((r, 1), dtype=f32))  # Λ (r, 1)
        self.s = cfg.alpha / (ranknum + 1e-5)  # ADALORA-2, the one place the scaling rule is written
        self.cfg, self.key, self.p, self.rng = cfg, key, cfg.dropout, rng
        self.ema: dict = {}  # leaf -> (Ī, U): the allocator's smoothed sensitivity and uncertainty

    @classmethod
    def create(cls, base, cfg: AdaLoRAConfig, path: str, rng, init_weights: bool = True):
        """A fresh delta has initial_rank rows; a loaded one as many as its rank_pattern mask keeps."""
        n, m = base.in_features, base.out_features
        check(cfg.initial_rank <= min(n, m), f"initial_rank (for {path})", cfg.initial_rank,
              f"must be <= min(in={n}, out={m})")
        key = f"{path}.lora_E"
        mask = (cfg.rank_pattern or {}).get(key)
        r = sum(mask) if mask is not None and not init_weights else cfg.initial_rank
        delta = cls(n, m, r, cfg.initial_rank, cfg, key, rng)
        if init_weights:  # ADALORA-1
            delta.lora_A.data = rng.normal((r, n), std=0.02)
            delta.lora_B.data = rng.normal((m, r), std=0.02)
        return delta

    def adapt(self, x, y, base):  # ADALORA-3
        if self.lora_E.shape[0] == 0:  # a layer a rank_pattern pruned to nothing
            return y
        h = F.dropout(x, self.p, self.rng, self.training)
        return y + F.linear(F.linear(h, self.lora_A * self.lora_E), self.lora_B) * self.s  # (..., out)

    def delta_weight(self):  # ADALORA-4: s B (A ⊙ E), (out, in)
        xp = backend.xp_of(self.lora_A.data)
        return xp.matmul(self.lora_B.data, self.lora_A.data * self.lora_E.data) * self.s

    def saved_parameters(self):
        """ADALORA-10: the leaves as saved, only rank_pattern's kept rows (columns of B) while the layer is full."""
        mask = (self.cfg.rank_pattern or {}).get(self.key)
        if mask is None or all(mask) or len(mask) != self.lora_E.shape[0]:
            return list(self.named_parameters())
        xp = backend.xp_of(self.lora_E.data)
        kept = backend.asarray([i for i, k in enumerate(mask) if k], "int64")  # (r',)
        return [("lora_A", Tensor(xp.take(self.lora_A.data, kept, axis=0))),
                ("lora_B", Tensor(xp.take(self.lora_B.data, kept, axis=1))),
                ("lora_E", Tensor(xp.take(self.lora_E.data, kept, axis=0)))]

    # ---- training: AdaLoRAHook (above) calls these (minipeft/hooks.py) ------------------------------
    @staticmethod
    def regularization(deltas: dict, cfg: AdaLoRAConfig):
        """ADALORA-6: orth_reg_weight * mean(||A Aᵀ - I||_F, ||Bᵀ B - I||_F over layers), a scalar Tensor."""
        total, count = None, 0
        for d in deltas.values():
            count += 2
            if d.lora_E.shape[0] == 0:  # an empty layer: both norms are 0 (PEFT counts it too)
                continue
            for cov in (d.lora_A @ d.lora_A.T, d.lora_B.T @ d.lora_B):  # (r, r)
                xp = backend.xp_of(cov.data)
                diff = cov - Tensor(xp.eye(cov.shape[0], dtype=cov.dtype))
                sq = (diff * diff).sum()
                term = sq.sqrt()  # its gradient is 0 where the norm is 0, as torch's (AG-5), with no host check
                total = term if total is None else total + term
        return (total if total is not None else Tensor(0.0)) * (cfg.orth_reg_weight / count)

    @staticmethod
    def after_step(deltas: dict, cfg: AdaLoRAConfig, step: int) -> None:
        """ADALORA-7..9 after optimizer step `step`, gradients still present (PEFT's update_and_allocate)."""
        check(cfg.total_step is not None, "total_step", cfg.total_step,
              "AdaLoRA's rank allocation needs the number of training steps; set AdaLoRAConfig(total_step=...)")
        end = cfg.total_step - cfg.tfinal
        if step > end:
            mask_with_pattern(deltas, cfg.rank_pattern)
            return
        if step < end:
            for d in deltas.values():
                d.update_sensitivity(cfg)
        b0 = sum(d.lora_E.shape[0] for d in deltas.values())
        b, now = budget_at(step, cfg, b0, cfg.target_rank * len(deltas))
        if now or step == end:
            cfg.rank_pattern = mask_to_budget(deltas, b0 - b)
        if step == end:
            for d in deltas.values():
                d.ema = {}

    @staticmethod
    def training_state(deltas: dict, cfg: AdaLoRAConfig) -> tuple[dict, dict]:
        """ADALORA-13: what a resumed run needs beyond the weights: every (Ī, U) and rank_pattern."""
        arrays = {f"{p}.{leaf}.{k}": backend.to_host(v) for p, d in deltas.items()
                  for leaf, pair in d.ema.items() for k, v in zip(("avg", "unc"), pair)}
        return arrays, {"rank_pattern": cfg.rank_pattern}

    @staticmethod
    def load_training_state(deltas: dict, cfg: AdaLoRAConfig, arrays: dict, info: dict) -> None:
        cfg.rank_pattern = info.get("rank_pattern")
        for p, d in deltas.items():
            d.ema = {leaf: (backend.asarray(arrays[f"{p}.{leaf}.avg"]), backend.asarray(arrays[f"{p}.{leaf}.unc"]))
                     for leaf in d.LEAVES if f"{p}.{leaf}.avg" in arrays}

    def update_sensitivity(self, cfg: AdaLoRAConfig) -> None:  # ADALORA-8
        for name in self.LEAVES:
            w = getattr(self, name)
            xp = backend.xp_of(w.data)
            ipt = xp.abs(w.data * w.grad)
            avg, unc = self.ema.get(name, (xp.zeros_like(ipt), xp.zeros_like(ipt)))
            avg = cfg.beta_start * avg + (1 - cfg.beta_start) * ipt
            unc = cfg.beta_end * unc + (1 - cfg.beta_end) * xp.abs(ipt - avg)
            self.ema[name] = (avg, unc)

    def triplet_scores(self):
        """S_i (r,): s(E_i) + (mean_j s(A_ij) + mean_k s(B_ki)) with s = Ī U."""
        s = {name: avg * unc for name, (avg, unc) in self.ema.items()}
        xp = backend.xp_of(s["lora_E"])
        return s["lora_E"][:, 0] + (xp.mean(s["lora_A"], axis=1) + xp.mean(s["lora_B"], axis=0))



def mask_to_budget(deltas: dict, k: int) -> dict:
    """ADALORA-9: zero E_i of the k lowest-scoring triplets over all layers (ties at the threshold too);
    returns rank_pattern {key: [kept]}."""
    scores = {p: d.triplet_scores() for p, d in deltas.items()}
    xp = backend.xp_of(*scores.values())
    threshold = xp.sort(xp.concat(list(scores.values())))[k - 1] if k > 0 else -math.inf
    pattern = {}
    for p, d in deltas.items():
        keep = scores[p] > threshold  # (r,)
        zero_pruned(d.lora_E, keep)
        pattern[d.key] = [bool(v) for v in backend.to_host(keep)]
    return pattern


def mask_with_pattern(deltas: dict, rank_pattern: dict) -> None:
    """After the final allocation: E_i <- 0 wherever rank_pattern says False (full-size layers only)."""
    for d in deltas.values():
        mask = (rank_pattern or {}).get(d.key)
        if mask is not None and len(mask) == d.lora_E.shape[0]:
            zero_pruned(d.lora_E, backend.asarray(mask, "bool"))


def zero_pruned(E: Tensor, keep) -> None:
    """E_i <- 0 where keep_i is False; E (r, 1), keep (r,) bool."""
    xp = backend.xp_of(E.data)
    E.data = xp.where(keep[:, None], E.data, xp.zeros_like(E.data))


register("adalora", AdaLoRAConfig, AdaLoRALinear,
         paper="AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning, Zhang et al. 2023, arXiv:2303.10512",
         summary="AdaLoRA, dW = s P Λ Q with ranks pruned to a budget while training (spec/adalora.md).")
