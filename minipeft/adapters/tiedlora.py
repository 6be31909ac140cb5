"""Tied-LoRA: Enhancing parameter efficiency of LoRA with weight tying (Renduchintala, Konuk, Kuchaiev,
NAACL 2024, arXiv:2311.09578), spec/tiedlora.md.

Symbols: layer l of one module type (q_proj, ...) has W0_l (out, in); A (r, in) and B (out, r) are one pair
    per module type, shared by its L targeted layers; u_l (r,) and v_l (out,) are per layer
    (tied_lora_u, tied_lora_v); s = alpha / r; T ⊆ {A, B, u, v} the trained ones, named by configuration.
Delta weight (TIEDLORA-1): dW_l = s diag(v_l) B diag(u_l) A (out, in).
Forward (TIEDLORA-2): h = W0_l x + b + s v_l ⊙ (B (u_l ⊙ (A dropout(x)))).
Tying (TIEDLORA-3): one A, B per module name; layers of one name must share (in, out).
Configurations (TIEDLORA-4): TL1..TL6 choose T (spec/tiedlora.md's table); what is not in T is frozen.
Init (TIEDLORA-5): the first of B, v, A that trains starts at 0 (so dW = 0); A and B otherwise
    U(+-1/sqrt(fan_in)) (fan_in = in for A, r for B), u and v otherwise 1.
Merge (TIEDLORA-6): W_l <- W0_l + dW_l; unmerge subtracts it.
Trainable (TIEDLORA-7): per module type, r in [A in T] + out r [B in T] + L (r [u in T] + out [v in T]).
Serialization (TIEDLORA-8): peft_type "MINIPEFT_TIEDLORA"; <layer>.tied_lora_u (r,), <layer>.tied_lora_v (out,)
    per layer, and base_model.tied_lora_A.<name> (r, in), base_model.tied_lora_B.<name> (out, r) once.
PEFT parity: none (PEFT has no Tied-LoRA).
Deviations: see spec/tiedlora.md (the numbering of TL1..TL6 is minipeft's reading of the paper's table).
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd import functional as F
from .base import AdapterConfig, Delta, check, fan_in_uniform, trainable
from .lora import check_rank_alpha, lora_scaling
from .registry import register

# TIEDLORA-4: which of A, B, u, v train in each configuration (spec/tiedlora.md)
CONFIGURATIONS = {"TL1": "uv", "TL2": "Auv", "TL3": "Buv", "TL4": "A", "TL5": "B", "TL6": "ABuv"}


@dataclasses.dataclass
class TiedLoRAConfig(AdapterConfig):
    rank: int = 8
    alpha: float = 8  # s = alpha / r = 1
    dropout: float = 0.0
    configuration: str = "TL6"  # TIEDLORA-4
    rank_pattern: dict = dataclasses.field(default_factory=dict)  # read by check_rank_alpha (LoRA's rule)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)

    peft_type = "MINIPEFT_TIEDLORA"
    PEFT_FIELDS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "configuration": "configuration"}
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "exclude_modules")

    def validate(self):
        check_rank_alpha(self)
        check(not self.rank_pattern and not self.alpha_pattern, "rank_pattern", self.rank_pattern,
              "is not supported by Tied-LoRA; the tied A and B have one rank")
        check(self.configuration in CONFIGURATIONS, "configuration", self.configuration,
              f"must be one of {', '.join(f'{k} (trains {v})' for k, v in CONFIGURATIONS.items())}")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")

    @property
    def trains(self) -> str:
        return CONFIGURATIONS[self.configuration]

    def trainable_count(self, layers: dict, mc) -> int:
        """TIEDLORA-7: the tied A, B once per module type, u and v once per layer."""
        t, r = self.trains, self.rank
        tied = {path.rsplit(".", 1)[-1]: shape for path, shape in layers.items()}
        count = sum(r * n * ("A" in t) + m * r * ("B" in t) for n, m in tied.values())
        return count + sum(r * ("u" in t) + m * ("v" in t) for _, m in layers.values())


def first_zero(trains: str) -> str:
    """TIEDLORA-5: the factor that starts at 0, so that dW = 0 and that factor has a gradient."""
    return next(f for f in "BvA" if f in trains)


class TiedLoRALinear(Delta):
    MIXED_BATCH = True  # y + s v ⊙ B (u ⊙ A x) of the rows alone (METHOD-6)

    def __init__(self, tied_A, tied_B, cfg: TiedLoRAConfig, rng):
        self.tied_lora_A, self.tied_lora_B = tied_A, tied_B  # shared by the layers of one module type
        self.trains, self.p, self.rng = cfg.trains, cfg.dropout, rng
        self.s = lora_scaling(cfg.alpha, cfg.rank, False)
        xp, f32 = backend.xp(), backend.dtype("float32")
        m, zero = tied_B.shape[0], first_zero(cfg.trains)
        self.tied_lora_u = trainable(xp.ones((cfg.rank,), dtype=f32))  # (r,)
        self.tied_lora_v = trainable((xp.zeros if zero == "v" else xp.ones)((m,), dtype=f32))  # (out,)

    @classmethod
    def create_all(cls, bases: dict, cfg: TiedLoRAConfig, rng, init_weights: bool = True):
        """TIEDLORA-3: one A, B per module name, drawn in the order the names first appear."""
        shapes = {}
        for path, b in bases.items():
            name = path.rsplit(".", 1)[-1]
            shape = shapes.setdefault(name, (b.in_features, b.out_features))
            check(shape == (b.in_features, b.out_features), f"target_modules (for {path})", name,
                  f"layers named {name} have shapes {shape} and {(b.in_features, b.out_features)} (in, out); "
                  "Tied-LoRA ties one A, B per module name: target such layers with separate adapters")
        r, zero, xp = cfg.rank, first_zero(cfg.trains), backend.xp()
        tied = {}
        for name, (n, m) in shapes.items():
            A = xp.zeros((r, n), dtype=backend.dtype("float32")) if zero == "A" else fan_in_uniform(rng, (r, n), n)
            B = xp.zeros((m, r), dtype=backend.dtype("float32")) if zero == "B" else fan_in_uniform(rng, (m, r), r)
            tied[name] = (trainable(A), trainable(B))  # (r, in), (out, r)
        deltas = {p: cls(*tied[p.rsplit(".", 1)[-1]], cfg, rng) for p in bases}
        shared = {f"tied_lora_{f}.{name}": ab[i] for name, ab in tied.items() for i, f in enumerate("AB")}
        return deltas, shared

    def saved_parameters(self):
        """TIEDLORA-8: the per-layer vectors; the tied A, B are saved once, as base_model.tied_lora_*."""
        return [("tied_lora_u", self.tied_lora_u), ("tied_lora_v", self.tied_lora_v)]

    def requires_grad_(self, flag: bool = True):  # TIEDLORA-4: only the configuration's tensors train
        super().requires_grad_(flag)
        for f, t in zip("ABuv", (self.tied_lora_A, self.tied_lora_B, self.tied_lora_u, self.tied_lora_v)):
            t.requires_grad = flag and f in self.trains
        return self

    def adapt(self, x, y, base):  # TIEDLORA-2
        h = F.dropout(x, self.p, self.rng, self.training)
        hu = self.tied_lora_u * F.linear(h, self.tied_lora_A)  # (..., r)
        return y + self.tied_lora_v * F.linear(hu, self.tied_lora_B) * self.s  # (..., out)

    def delta_weight(self):  # TIEDLORA-1: s diag(v) B diag(u) A, (out, in)
        A, B, u, v = (t.data for t in (self.tied_lora_A, self.tied_lora_B, self.tied_lora_u, self.tied_lora_v))
        return backend.xp_of(A).matmul(v[:, None] * B, u[:, None] * A) * self.s


register("tiedlora", TiedLoRAConfig, TiedLoRALinear, in_peft=False,
         paper="Tied-LoRA: Enhancing parameter efficiency of LoRA with weight tying, Renduchintala et al. 2024 "
               "(NAACL), arXiv:2311.09578",
         summary="Tied-LoRA, dW_l = s diag(v_l) B diag(u_l) A with A, B tied across the layers of one module type "
                 "and TL1..TL6 choosing which of A, B, u, v train (spec/tiedlora.md).")
