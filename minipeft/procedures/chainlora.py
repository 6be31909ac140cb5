"""Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning (Xia, Qin, Hazan 2024,
arXiv:2401.04151), as a training hook (spec/chainlora.md). Links of lengths L_1..L_n optimizer steps;
link j ends after step e_j - 1 (0-based), e_j = L_1 + ... + L_j; s the layer's LoRA scaling:

  CHAINLORA-1 at each link's end, "tie a knot": W <- W + s B A; A <- LoRA's default init (LORA-1); B <- 0.
  CHAINLORA-2 and reset the optimizer: every AdamW moment m, v is dropped and its step count t <- 0, so the
              next link starts as a fresh AdamW would.
  CHAINLORA-3 residual learning: after the chain W = W0 + sum over links of s B_j A_j (each link's factors at
              its knot); merge_and_unload adds the factors trained after the last knot (none if max_steps = sum L).
"""
from __future__ import annotations

import dataclasses
import itertools

from ..adapters.registry import register
from ..errors import ConfigError
from .merging import MergingHook
from .relora import positive_int


@dataclasses.dataclass
class ChainLoRAConfig:
    links: tuple  # each link's length in optimizer steps, in order
    seed: int = 0  # the re-initialisation of A draws from backend.RNG(seed)

    def __post_init__(self):
        if isinstance(self.links, (str, bytes)) or not hasattr(self.links, "__len__") or not len(self.links):
            raise ConfigError(f"ChainLoRAConfig.links={self.links!r} must be a non-empty list of link lengths "
                              f"(optimizer steps), e.g. (100, 100, 100)")
        for j, n in enumerate(self.links):
            positive_int("ChainLoRAConfig", f"links[{j}]", n)
        self.links = tuple(self.links)
        positive_int("ChainLoRAConfig", "seed", self.seed, 0)


class ChainLoRAHook(MergingHook):
    """Chain of LoRA in model.train: TrainingConfig(hooks=[ChainLoRAHook(model, ChainLoRAConfig(links=(...)))],
    max_steps=sum(links))."""
    key = "chainlora"
    procedure = "Chain of LoRA"

    def __init__(self, model, opts: ChainLoRAConfig):
        super().__init__(model, opts)
        self.ends = set(itertools.accumulate(opts.links))  # e_j: a knot after step e_j - 1

    def after_step(self, step):
        if step + 1 not in self.ends:
            return
        self.knot()  # CHAINLORA-1
        self.opt.m, self.opt.v, self.opt.t = {}, {}, 0  # CHAINLORA-2


register("chainlora", ChainLoRAConfig, kind="procedure", hook=ChainLoRAHook, in_peft=False,
         paper="Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning, Xia et al. 2024, "
               "arXiv:2401.04151",
         summary="Chain of LoRA, at each link's end W += s B A, A re-initialised, B = 0, optimizer reset "
                 "(spec/chainlora.md).")
