"""RoSA: Accurate Parameter-Efficient Fine-Tuning via Robust Adaptation (Nikdan, Tabesh, Crnčević, Alistarh,
ICML 2024, arXiv:2401.04679), spec/rosa.md.

Symbols: W0 (out, in) frozen, x (..., in); A (r, in), B (out, r) LoRA's factors, s = alpha / r (alpha / sqrt(r)
    with use_rslora, LORA-2); d the density, k = floor(d * out * in) entries of S per layer: values v (k,) at
    positions (i_j, c_j), indices (2, k) int32 in row-major order; w the warmup steps, m the mask batches.
Delta weight (ROSA-1): dW = s B A + S, S (out, in) = 0 except S[i_j, c_j] = v_j (SHiRA's EntriesToWeight, SHIRA-2).
Forward (ROSA-2): h = W0 x + b + s B A dropout(x) + S x   (S sees x itself, as in the authors' RoSALinearFunction).
Init (ROSA-3): A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, v = 0 and no mask yet (indices all -1): h = W0 x + b.
Schedule (ROSA-4): in model.train, optimizer steps 0..w-1 train A, B (S takes no part); steps w..w+m-1 train A, B
    and record each step's G_t = dL/dW0 (the step's loss, before clipping); after step w+m-1 the mask is chosen;
    from step w+m on A, B and v train (the authors' schedule "wl<w>" with spa_num_grads = m).
Mask (ROSA-5): F = (1/m) sum_t G_t^2 ("mean_squared", the empirical diagonal Fisher; the default) or (1/m) sum_t G_t
    ("mean"); the mask is the k positions of largest |F| (ties: the smaller row-major index first), sorted
    row-major; v = 0 at that point, so the selection leaves the output unchanged.
Gradients (ROSA-6): dL/dv_j = G[i_j, c_j] with G = dL/dW0 of the loss; A, B as LoRA (LORA-5); W0 gets none.
Merge (ROSA-7): W <- W0 + s B A + S; unmerge subtracts it (merged output = unmerged, fp32).
Serialization (ROSA-8): peft_type "MINIPEFT_ROSA" (PEFT has no RoSA); keys lora_A.weight, lora_B.weight,
    rosa_spa_values (k,) float32, rosa_spa_indices (2, k) int32, all -1 before the mask is chosen.
Resume (ROSA-9): a checkpoint holds the running sum of the recorded G_t, their count and the chosen masks.
Errors (ROSA-10): see spec/rosa.md.
Restart (ROSA-11): restart(model) after a run that chose the masks: A redrawn, B = 0, v = 0, masks kept (the
    authors' two-run recipe: warm up and choose, then train A, B and S afresh with the mask).
Deviations: G_t is the gradient of an optimizer step (all its micro-batches); the authors' hook records each
    backward call (micro-batch) apart. minipeft's AdamW shares one step count t, so v's first updates come with
    bias corrections of step w+m+1 (torch counts per parameter). fp32 throughout (the authors' default is bf16).
    restart draws A from minipeft's RNG (the authors' second run draws it from torch's).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend
from ..autograd import functional as F
from ..autograd.function import no_grad
from ..autograd.tensor import Tensor
from ..errors import CheckpointError, ConfigError
from ..hooks import TrainingHook
from .base import AdapterConfig, check, trainable
from .lora import LoRALinear, init_default, lora_scaling
from .registry import register
from .shira import check_positions, entries_weight

GRAD_MODES = ("mean_squared", "mean")  # the authors' grad_acc_mode values


def whole(v, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


@dataclasses.dataclass
class RoSAConfig(AdapterConfig):
    rank: int = 8  # the authors' r
    alpha: float = 8  # lora_alpha (their default 8)
    dropout: float = 0.0  # on LoRA's input only
    use_rslora: bool = False
    density: float = 0.003  # d: S holds floor(d * out * in) entries per layer (their default)
    warmup: int = 64  # w: LoRA-only steps before the mask-selection steps (their README's "wl64")
    mask_batches: int = 1  # m: steps whose dL/dW0 choose the mask (spa_num_grads)
    grad_acc_mode: str = "mean_squared"  # how the m gradients combine (ROSA-5)

    peft_type = "MINIPEFT_ROSA"
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "exclude_modules")
    PEFT_FIELDS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "use_rslora": "use_rslora",
                   "density": "d", "warmup": "lora_warmup", "mask_batches": "spa_num_grads",
                   "grad_acc_mode": "grad_acc_mode"}

    def validate(self):  # ROSA-10
        check(whole(self.rank, 1), "rank", self.rank, "must be a positive integer")
        check(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha", self.alpha, "must be > 0")
        check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, "dropout", self.dropout,
              "must be in [0, 1)")
        check(isinstance(self.density, (int, float)) and 0.0 < self.density < 1.0, "density", self.density,
              "must be in (0, 1): the share of each W0's entries S trains (the authors' d, 0.003 by default)")
        check(whole(self.warmup, 0), "warmup", self.warmup, "must be an integer >= 0 (LoRA-only steps before the "
              "mask-selection steps)")
        check(whole(self.mask_batches, 1), "mask_batches", self.mask_batches, "must be an integer >= 1 (the steps "
              "whose gradients choose the mask)")
        check(self.grad_acc_mode in GRAD_MODES, "grad_acc_mode", self.grad_acc_mode, f"use one of {GRAD_MODES}")

    def trainable_count(self, layers: dict, mc) -> int:
        """ROSA-6: r (in + out) + floor(d * out * in) per layer."""
        return sum(self.rank * (n + m) + spa_size(self.density, n, m) for n, m in layers.values())


def spa_size(density: float, n: int, m: int) -> int:
    """k = floor(d * out * in), as the authors' int(d * numel)."""
    return int(density * (m * n))


def top_k_mask(F_, k: int):
    """ROSA-5: (2, k) int32 rows and columns of the k largest |F| (ties: smaller row-major index), row-major."""
    xp = backend.xp_of(F_)
    n = F_.shape[1]
    order = backend.argsort_stable(-xp.reshape(xp.abs(F_), (-1,)))[:k]  # (k,) flat positions, largest first
    p = xp.sort(order)
    return xp.astype(xp.stack([p // n, p % n]), xp.int32)


class RoSAHook(TrainingHook):
    """One active RoSA adapter in model.train: the warmup, the recording of dL/dW0 and the mask selection
    (ROSA-4, ROSA-5), and their state in checkpoints (ROSA-9). A loaded adapter whose mask is chosen keeps it."""

    def __init__(self, name: str, deltas: dict, cfg: RoSAConfig):
        self.key, self.deltas, self.cfg = name, deltas, cfg
        chosen = {d.chosen for d in deltas.values()}
        if len(chosen) > 1:
            raise ConfigError(f"RoSA adapter {name!r}: some layers have a mask and some do not; load a file saved "
                              "whole, or apply_rosa afresh")
        self.done = chosen == {True}
        self.sums, self.count = {}, 0  # path -> sum of G_t (or G_t^2) so far, and how many steps

    def record(self, on: bool) -> None:
        for d in self.deltas.values():
            d.record(on)

    def attach(self, opt) -> None:
        self.record(not self.done and self.cfg.warmup == 0)

    def after_step(self, step: int) -> None:  # ROSA-4
        if self.done:
            return
        if step < self.cfg.warmup:
            self.record(step + 1 == self.cfg.warmup)
            return
        for path, d in self.deltas.items():
            G = d.recorded()  # (out, in): dL/dW0 of this step
            G = G * G if self.cfg.grad_acc_mode == "mean_squared" else G
            self.sums[path] = G if path not in self.sums else self.sums[path] + G
        self.count += 1
        if self.count == self.cfg.mask_batches:  # ROSA-5
            for path, d in self.deltas.items():
                d.choose(top_k_mask(self.sums[path] / self.count, d.rosa_spa_values.shape[0]))
            self.sums, self.done = {}, True
            self.record(False)

    def end(self) -> None:
        self.record(False)

    def state(self) -> tuple[dict, dict]:  # ROSA-9
        arrays = {f"sum.{p}": backend.to_host(g) for p, g in self.sums.items()}
        arrays.update({f"indices.{p}": backend.to_host(d.indices[0].data) for p, d in self.deltas.items()})
        recording = any(d.probe for d in self.deltas.values())
        return arrays, {"count": self.count, "done": self.done, "recording": recording}

    def load_state(self, arrays: dict, info: dict) -> None:
        self.count, self.done = info["count"], info["done"]
        self.sums = {p: backend.asarray(arrays[f"sum.{p}"]) for p in self.deltas if f"sum.{p}" in arrays}
        for p, d in self.deltas.items():
            d.set_positions(backend.asarray(arrays[f"indices.{p}"], "int32"))
        self.record(info["recording"])


class RoSALinear(LoRALinear):
    training_hook = RoSAHook  # model.train's hook of each active adapter (minipeft/hooks.py)

    def __init__(self, n: int, m: int, r: int, s: float, dropout: float, k: int, rng):
        super().__init__(n, m, r, s, dropout, False, rng)
        self.shape = (m, n)
        self.rosa_spa_values = trainable(backend.xp().zeros((k,), dtype=backend.dtype("float32")))  # v (k,)
        self.indices = (Tensor(backend.asarray(np.full((2, k), -1), "int32")),)  # (2, k); a tuple: not a parameter
        self.chosen = False  # whether the mask is chosen (ROSA-3)
        self.probe = ()  # (P,) while recording: P (out, in) = 0 in the forward, so P.grad = dL/dW0 (ROSA-4)

    @classmethod
    def create(cls, base, cfg: RoSAConfig, path: str, rng, init_weights: bool = True):
        n, m = base.in_features, base.out_features
        check(cfg.rank <= min(n, m), f"rank (for {path})", cfg.rank, f"must be <= min(in={n}, out={m})")
        k = spa_size(cfg.density, n, m)
        check(k >= 1, f"density (for {path})", cfg.density, f"gives floor(d * out * in) = 0 entries of S for this "
              f"{n} -> {m} layer; raise it to at least {1 / (n * m):.3g}")
        delta = cls(n, m, cfg.rank, lora_scaling(cfg.alpha, cfg.rank, cfg.use_rslora), cfg.dropout, k, rng)
        if init_weights:  # ROSA-3: LoRA's default init (the authors' init_lora_weights=True)
            init_default(delta, base, rng)
        return delta

    def S(self):  # ROSA-1: a Tensor (out, in)
        return entries_weight(self.rosa_spa_values, self.indices[0].data, self.shape)

    def adapt(self, x, y, base):  # ROSA-2
        y = super().adapt(x, y, base)
        if self.chosen:
            y = y + F.linear(x, self.S())
        if self.probe:
            y = y + F.linear(x, self.probe[0])
        return y

    def delta_weight(self):  # ROSA-1, ROSA-7
        dW = super().delta_weight()
        if self.chosen:
            with no_grad():
                dW = dW + self.S().data
        return dW

    def record(self, on: bool) -> None:
        xp = backend.xp_of(self.rosa_spa_values.data)
        self.probe = (Tensor(xp.zeros(self.shape, dtype=self.rosa_spa_values.data.dtype), requires_grad=True),) \
            if on else ()

    def recorded(self):
        """dL/dW0 (out, in) since the last call (zeros if no loss reached the layer), and the probe cleared."""
        P = self.probe[0]
        G = P.grad if P.grad is not None else backend.xp_of(P.data).zeros_like(P.data)
        P.grad = None
        return G

    def set_positions(self, indices) -> None:
        self.indices[0].data = indices
        self.chosen = bool(backend.to_host(indices).min(initial=0) >= 0)

    def choose(self, indices) -> None:  # ROSA-5: the mask, and v = 0
        self.set_positions(indices)
        self.rosa_spa_values.data = backend.xp_of(indices).zeros_like(self.rosa_spa_values.data)

    def saved_parameters(self):  # ROSA-8
        return list(self.named_parameters()) + [("rosa_spa_indices", self.indices[0])]

    def from_file(self, where: str):
        """A file's rosa_spa_indices: all -1 (no mask yet) or rows in [0, out), columns in [0, in)."""
        i = backend.to_host(self.indices[0].data)
        if not np.all(i == -1):
            check_positions(i, self.shape, where, "rosa_spa_indices")
        if len(set(map(tuple, i.T.tolist()))) < i.shape[1] and not np.all(i == -1):
            raise CheckpointError(f"{where}: rosa_spa_indices list a position twice; a RoSA mask holds k distinct "
                                  "positions")
        self.set_positions(self.indices[0].data)


def restart(model, name: str = "default", seed: int = 0) -> None:
    """ROSA-11, the authors' two-run recipe: after a run that chose the masks, A <- a fresh draw of LoRA's init
    from backend.RNG(seed) (layer by layer), B = 0, v = 0, the masks kept; the next model.train trains A, B and S
    from its step 0."""
    from .inject import adapted_layers
    found = [(p, layer.adapters[name]) for p, layer in adapted_layers(model.net) if name in layer.adapters]
    if not found or not all(isinstance(d, RoSALinear) for _, d in found):
        raise ConfigError(f"restart: adapter {name!r} is not a RoSA adapter of this model: apply_rosa first")
    for path, d in found:
        if not d.chosen:
            raise ConfigError(f"restart: {path} (adapter {name!r}) has no mask yet; train past warmup + "
                              "mask_batches steps first")
        if name in model.net.get_submodule(path).merged:
            raise ConfigError(f"restart: {path} (adapter {name!r}) is merged: unmerge it first")
    rng = backend.RNG(seed)
    with no_grad():
        for path, d in found:
            init_default(d, None, rng)  # A ~ U(-1/sqrt(in), 1/sqrt(in)) (LORA-1)
            for t in (d.lora_B.weight, d.rosa_spa_values):
                t.data = backend.xp_of(t.data).zeros_like(t.data)


register("rosa", RoSAConfig, RoSALinear, in_peft=False,
         paper="RoSA: Accurate Parameter-Efficient Fine-Tuning via Robust Adaptation, Nikdan et al. 2024, "
               "arXiv:2401.04679",
         summary="RoSA, dW = s B A + S: LoRA plus a sparse S at the top-k entries of dL/dW0 accumulated after a "
                 "LoRA warmup, then trained with it (spec/rosa.md).")
