"""Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank Matrices (Zi, Yi, Wang, Zhang,
Luo, Cheng 2023, arXiv:2309.02411), as a training hook (spec/deltalora.md). K = update_delta_start,
lambda = delta_lambda, s the layer's LoRA scaling, A_k, B_k the factors before optimizer step k (0-based):

  DELTALORA-1 after each step k >= K:  W <- W + lambda s (B_{k+1} A_{k+1} - B_k A_k); before K, W stays.
  DELTALORA-2 the forward stays LoRA's, h = W x + s B A x (LORA-3), with LoRA dropout 0: the delta of B A is
              the update of the undropped product only then (the paper removes dropout); dropout > 0 is refused.
  DELTALORA-3 the sum telescopes: after the run W = W0 + lambda s (B A - B_K A_K), B A the final factors.
"""
from __future__ import annotations

import dataclasses

from ..adapters.registry import register
from ..backend import asarray, to_host, xp_of
from ..errors import ConfigError
from ..optimizers.checks import number
from .merging import MergingHook, add_to_W
from .relora import positive_int


@dataclasses.dataclass
class DeltaLoRAConfig:
    update_delta_start: int = 0  # K: W follows the delta of B A from optimizer step K (0-based) on
    delta_lambda: float = 0.5  # lambda: the share of the delta of s B A added to W each step

    def __post_init__(self):
        positive_int("DeltaLoRAConfig", "update_delta_start", self.update_delta_start, 0)
        number("DeltaLoRAConfig", "delta_lambda", self.delta_lambda)


class DeltaLoRAHook(MergingHook):
    """Delta-LoRA in model.train: TrainingConfig(hooks=[DeltaLoRAHook(model, DeltaLoRAConfig(...))])."""
    key = "deltalora"
    procedure = "Delta-LoRA"

    def __init__(self, model, opts: DeltaLoRAConfig):
        super().__init__(model, opts)
        for name in {t.pair.adapter for t in self.targets}:  # DELTALORA-2
            p = getattr(model.peft_configs[name], "dropout", 0.0)
            if p:
                raise ConfigError(f"Delta-LoRA: adapter {name!r} has LoRA dropout {p}; Delta-LoRA needs dropout=0 "
                                  f"(the delta of B A is W's update only without it): apply_lora(LoRAConfig(dropout=0))")
        self.prev = {}

    def attach(self, opt):  # Delta-LoRA leaves the optimizer alone; the factors before step 0
        self.prev = {t.pair.a_name: (t.pair.A.data, t.pair.B.data) for t in self.targets}

    def after_step(self, step):  # DELTALORA-1
        for t in self.targets:
            A, B = t.pair.A.data, t.pair.B.data  # (r, in), (out, r): after the step
            if step >= self.opts.update_delta_start:
                A0, B0 = self.prev[t.pair.a_name]
                xp = xp_of(A)
                add_to_W(t, (self.opts.delta_lambda * t.pair.delta.s) * (xp.matmul(B, A) - xp.matmul(B0, A0)))
                self.changed = True
            self.prev[t.pair.a_name] = (A, B)

    def state(self):
        arrays, info = super().state()
        for name, (A, B) in self.prev.items():
            arrays[f"A.{name}"], arrays[f"B.{name}"] = to_host(A), to_host(B)
        return arrays, info

    def load_state(self, arrays, info):
        super().load_state(arrays, info)
        self.prev = {n: (asarray(arrays[f"A.{n}"]), asarray(arrays[f"B.{n}"])) for n in self.prev}


register("deltalora", DeltaLoRAConfig, kind="procedure", hook=DeltaLoRAHook, in_peft=False,
         paper="Delta-LoRA: Fine-Tuning High-Rank Parameters with the Delta of Low-Rank Matrices, Zi et al. 2023, "
               "arXiv:2309.02411",
         summary="Delta-LoRA, after K steps W += lambda s (B_{k+1} A_{k+1} - B_k A_k) each step, LoRA dropout 0 "
                 "(spec/deltalora.md).")
