"""ReLoRA: High-Rank Training Through Low-Rank Updates (Lialin, Shivagunde, Muckatira, Rumshisky 2023,
arXiv:2307.05695), as a training hook (spec/relora.md). T = reset_every, s the layer's LoRA scaling:

  RELORA-1 after every T optimizer steps (steps k with (k + 1) mod T = 0):
               W <- W + s B A;   A <- U(-1/sqrt(in), 1/sqrt(in)) (LoRA's default, LORA-1);   B <- 0
  RELORA-2 at the same restart, each AdamW moment m, v of every lora_A and lora_B is magnitude-pruned:
               entries with |x| <= quantile(|x|, prune_ratio) become 0 (prune_ratio 0.99, the paper's 99%);
           AdamW's step count t (bias correction) goes on, as in the authors' code.
  RELORA-3 jagged schedule: step k's learning rate is the TrainingConfig schedule's times
               (k mod T) / restart_warmup   for k >= T and k mod T < restart_warmup,   else 1
           (TrainingConfig(schedule="cosine") gives the paper's jagged cosine).
  RELORA-4 a restart leaves the model's output unchanged; after n restarts W = W0 + the sum of the n
           folded s B A (to float rounding), and merge_and_unload gives W0 + that sum + the last s B A.

Deviations: the authors' scheduler ramps each restart towards the cosine's value at the end of the restart
warmup; here the ramp multiplies the schedule's current value (the smallest general mechanism, TRAIN-16).
"""
from __future__ import annotations

import dataclasses

from ..adapters.registry import register
from ..errors import ConfigError
from ..optimizers.checks import number
from .merging import MergingHook, magnitude_prune


def positive_int(owner: str, field: str, v, minimum: int = 1) -> None:
    """ConfigError unless v is an int (not a bool) >= minimum."""
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{owner}.{field}={v!r} must be an integer >= {minimum}")


@dataclasses.dataclass
class ReLoRAConfig:
    reset_every: int  # T: merge and restart after every T optimizer steps
    prune_ratio: float = 0.99  # the share of each LoRA moment's entries zeroed, smallest |x| first
    restart_warmup: int = 50  # steps of linear learning-rate warmup after each restart (0: none)
    seed: int = 0  # the re-initialisation of A draws from backend.RNG(seed)

    def __post_init__(self):
        positive_int("ReLoRAConfig", "reset_every", self.reset_every)
        number("ReLoRAConfig", "prune_ratio", self.prune_ratio, strict=False)
        if not self.prune_ratio <= 1:
            raise ConfigError(f"ReLoRAConfig.prune_ratio={self.prune_ratio!r} must be in [0, 1] (0.99: the paper's)")
        positive_int("ReLoRAConfig", "restart_warmup", self.restart_warmup, 0)
        if self.restart_warmup >= self.reset_every:
            raise ConfigError(f"ReLoRAConfig.restart_warmup={self.restart_warmup} must be < reset_every="
                              f"{self.reset_every}: the warmup would never reach the schedule's rate")
        positive_int("ReLoRAConfig", "seed", self.seed, 0)


class ReLoRAHook(MergingHook):
    """ReLoRA in model.train: TrainingConfig(hooks=[ReLoRAHook(model, ReLoRAConfig(reset_every=T))])."""
    key = "relora"
    procedure = "ReLoRA"

    def lr_scale(self, step):  # RELORA-3
        T, warm = self.opts.reset_every, self.opts.restart_warmup
        return (step % T) / warm if step >= T and step % T < warm else 1.0

    def after_step(self, step):
        if (step + 1) % self.opts.reset_every:
            return
        self.knot()  # RELORA-1
        for t in self.targets:  # RELORA-2
            for name in (t.pair.a_name, t.pair.b_name):
                for moments in (self.opt.m, self.opt.v):
                    if name in moments:
                        moments[name] = magnitude_prune(moments[name], self.opts.prune_ratio)


register("relora", ReLoRAConfig, kind="procedure", hook=ReLoRAHook, mergeable=True, in_peft=False,
         paper="ReLoRA: High-Rank Training Through Low-Rank Updates, Lialin et al. 2023, arXiv:2307.05695",
         summary="ReLoRA, every T steps W += s B A, A re-initialised, B = 0, LoRA moments 99% magnitude-pruned, "
                 "jagged learning rate (spec/relora.md).")
