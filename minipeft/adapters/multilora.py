"""MultiLoRA: Democratizing LoRA for Better Multi-Task Learning (Wang, Lin, Zeng, Zhang 2023, arXiv:2311.11501),
spec/multilora.md.

Symbols: W0 (out, in) frozen base weight, b its bias, x (..., in); n the number of parallel LoRA modules, r
    the rank of each; A_i (r, in), B_i (out, r) and the scalar s_i of module i, stacked as multilora_A
    (n, r, in), multilora_B (n, out, r), multilora_scaling (n,).
Forward (MULTILORA-1): h = W0 x + b + Σ_i s_i B_i A_i dropout(x), the n modules side by side (horizontal
    scaling); the learnable s_i take the place of LoRA's constant alpha / r.
Init (MULTILORA-2): A_i ~ U(+-1/sqrt(in)), B_i ~ U(+-1/sqrt(r)) (torch's kaiming_uniform(a=sqrt 5) for both),
    s_i = 0, so h = W0 x + b; at step 0 only s has a gradient (A's and B's carry the factor s_i = 0).
Limit (MULTILORA-3): n = 1 with s_1 = alpha / r is LoRA's forward with that A, B.
Merge (MULTILORA-4): dW = Σ_i s_i B_i A_i (out, in); W <- W0 + dW; unmerge subtracts it.
Trainable (MULTILORA-5): A, B and s: n (r (in + out) + 1) per layer; rank(dW) <= n r.
Serialization (MULTILORA-6): peft_type "MINIPEFT_MULTILORA"; keys <layer>.multilora_A, .multilora_B,
    .multilora_scaling; r and num_loras in the config.
PEFT parity: none (PEFT has no MultiLoRA: its several adapters on one layer are switched or added with
    fixed weights, none with learnable scales). No code of the authors was found; the init follows the
    paper's description (Kaiming-uniform A and B, zero scales) as read in the MultiLoRA baseline of MTL-LoRA
    (github.com/pUmpKin-Co/MTL-LoRA, src/adapter/multilora.py).
Deviations: s_i is one number per module; that baseline uses a vector (out,) per module and keeps a
    constant alpha / r besides (spec/multilora.md says why).
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd import functional as F
from ..autograd.tensor import Tensor
from .base import COMMON_FIELDS, AdapterConfig, Delta, check, fan_in_uniform, trainable
from .registry import register


@dataclasses.dataclass
class MultiLoRAConfig(AdapterConfig):
    rank: int = 8  # r of each module
    num_loras: int = 3  # n parallel modules
    dropout: float = 0.0

    peft_type = "MINIPEFT_MULTILORA"
    PEFT_FIELDS = {"rank": "r", "num_loras": "num_loras", "dropout": "lora_dropout"}
    PEFT_COMMON = COMMON_FIELDS  # no fan_in_fan_out: the file's layout is (n, r, in), (n, out, r) on every base

    def validate(self):
        check(self.rank > 0, "rank", self.rank, "must be a positive integer")
        check(self.num_loras > 0, "num_loras", self.num_loras, "must be a positive integer (1 is LoRA with a learnable scale)")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")

    def trainable_count(self, layers: dict, mc) -> int:
        """MULTILORA-5: n (r (in + out) + 1) per layer."""
        return sum(self.num_loras * (self.rank * (n + m) + 1) for n, m in layers.values())


class MultiLoRALinear(Delta):
    MIXED_BATCH = True  # y + Σ s_i B_i A_i x of the rows alone (METHOD-6)

    def __init__(self, n_in, m, r, num_loras, dropout, rng):
        self.r, self.num_loras, self.p, self.rng = r, num_loras, dropout, rng
        xp = backend.xp()
        f32 = backend.dtype("float32")
        self.multilora_A = trainable(xp.zeros((num_loras, r, n_in), dtype=f32))  # A_i (n, r, in)
        self.multilora_B = trainable(xp.zeros((num_loras, m, r), dtype=f32))  # B_i (n, out, r)
        self.multilora_scaling = trainable(xp.zeros((num_loras,), dtype=f32))  # s_i (n,), 0: MULTILORA-2

    @classmethod
    def create(cls, base, cfg: MultiLoRAConfig, path: str, rng, init_weights: bool = True):
        n_in, m, r = base.in_features, base.out_features, cfg.rank
        check(r <= min(n_in, m), f"rank (for {path})", r, f"must be <= min(in={n_in}, out={m})")
        delta = cls(n_in, m, r, cfg.num_loras, cfg.dropout, rng)
        if init_weights:  # MULTILORA-2; a load fills all three from the file
            delta.multilora_A.data = fan_in_uniform(rng, (cfg.num_loras, r, n_in), n_in)
            delta.multilora_B.data = fan_in_uniform(rng, (cfg.num_loras, m, r), r)
        return delta

    def stacked(self, A, B, s):
        """A_cat (n r, in), B_cat (out, n r) and s repeated r times (n r,): Σ_i s_i B_i A_i = B_cat diag(s_rep) A_cat."""
        n, m, r = B.shape
        ones = Tensor(backend.xp_of(s.data).ones((1, r), dtype=s.data.dtype))
        return (A.reshape(n * r, A.shape[-1]), B.permute(1, 0, 2).reshape(m, n * r),
                (s.reshape(n, 1) * ones).reshape(n * r))

    def adapt(self, x, y, base):  # MULTILORA-1
        A, B, s = self.stacked(self.multilora_A, self.multilora_B, self.multilora_scaling)
        h = F.dropout(x, self.p, self.rng, self.training)
        return y + F.linear(F.linear(h, A) * s, B)  # (..., out)

    def delta_weight(self):  # MULTILORA-4: Σ_i s_i B_i A_i, (out, in)
        A, B, s = (t.data for t in self.stacked(self.multilora_A, self.multilora_B, self.multilora_scaling))
        return backend.xp_of(A).matmul(B * s[None, :], A)


register("multilora", MultiLoRAConfig, MultiLoRALinear, in_peft=False,
         paper="MultiLoRA: Democratizing LoRA for Better Multi-Task Learning, Wang, Lin, Zeng, Zhang 2023, "
               "arXiv:2311.11501",
         summary="MultiLoRA, dW = Σ_i s_i B_i A_i over n parallel LoRA modules with learnable scales s_i, zero at "
                 "init, A_i and B_i Kaiming-uniform (spec/multilora.md).")
