"""BD-LoRA: Block-Diagonal LoRA for Eliminating Communication Overhead in Tensor Parallel LoRA Serving (Wang,
Kübler, Budhathoki, Wang, Kleindessner 2025, arXiv:2510.23346), as PEFT 0.21.2's LoraConfig(use_bdlora=...).

LoRA (lora.py) whose A or B, per layer, is block diagonal with n blocks, so that with n tensor-parallel shards each
shard holds its own blocks and no LoRA activation crosses shards. Symbols: W0 (out, in), A (r, in), B (out, r),
s = alpha / r (LORA-2), n = nblocks; blockdiag(M) for M (p, q / n) the (p, q) matrix whose block i (rows
i p/n .. (i+1) p/n, columns i q/n .. (i+1) q/n) is M's rows i p/n .. (i+1) p/n, zero elsewhere.
Which factor (BDLORA-1): a layer whose path contains a target_modules_bd_a pattern has A = blockdiag(A_b),
    A_b (r, in / n) (PEFT's lora_A.weight); one containing a target_modules_bd_b pattern has B = blockdiag(B_b),
    B_b (out, r / n) (lora_B.weight); both: an error; neither: an error with match_strict, else plain LoRA.
Init (BDLORA-2): A_b ~ U(-sqrt(6 n / in), sqrt(6 n / in)) (torch's kaiming_uniform, a = 0), B_b = 0; a B-block
    layer keeps LoRA's A init. B = 0 either way: h = W0 x + b at step 0.
Forward (BDLORA-3): h = W0 x + b + s B A dropout(x) with the block-diagonal factor applied block by block:
    (blockdiag(M) v)_i = M_i v_i, v_i the i-th of n equal slices of v, M_i (p / n, q / n) the i-th row block of M.
Delta weight / merge (BDLORA-4): dW = s B A (out, in) with blockdiag expanded; W <- W0 + dW; unmerge subtracts it.
Trainable (BDLORA-5): r in / n + out r (A blocks), r in + out r / n (B blocks), r (in + out) (neither) per layer.
Serialization (BDLORA-6): PEFT's LoraConfig with use_bdlora {target_modules_bd_a, target_modules_bd_b, nblocks,
    match_strict} (peft_type "LORA"); the block factor is saved in its block shape under LoRA's key.
PEFT parity: peft/tuners/lora/variants.py BlockDiagonalLinear (forward, weight_as_blockdiagonal_matrix) and
    BdLoraLinearVariant (init, forward, _get_bdlora_delta_weight).
Deviations: a block factor on GPT-2's Conv1D is refused (PEFT's variant init fails on it); a 4-bit base is refused (PEFT's bitsandbytes LoRA layers ignore use_bdlora and build plain LoRA);
    lora_bias on a B-block layer is refused (PEFT's block layer has no bias, so its merge fails).
"""
from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..nn.layers import Linear
from ..nn.module import Module
from ..autograd.tensor import Tensor
from .base import check
from .data_init import sub_config
from .lora import LoRAConfig, LoRALinear
from .registry import register

BDLORA_DEFAULTS = {"target_modules_bd_a": None, "target_modules_bd_b": None, "nblocks": 1, "match_strict": True}


@dataclasses.dataclass
class BDLoRAConfig(LoRAConfig):
    """LoRAConfig's fields, plus PEFT's use_bdlora {target_modules_bd_a, target_modules_bd_b, nblocks, match_strict}
    (PEFT's BdLoraConfig; missing keys take its defaults)."""

    use_bdlora: dict = dataclasses.field(default_factory=dict)

    PEFT_FLAGS = {"use_bdlora": True}
    PEFT_FIELDS = {**LoRAConfig.PEFT_FIELDS, "use_bdlora": "use_bdlora"}

    def validate(self):
        super().validate()
        self.use_bdlora = c = sub_config(self.use_bdlora, BDLORA_DEFAULTS, "use_bdlora", "BdLoraConfig")
        for key in ("target_modules_bd_a", "target_modules_bd_b"):
            v = c[key]
            check(v is None or isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v),
                  f"use_bdlora[{key!r}]", v, "must be a list of module-name patterns (matched as substrings), or None")
            c[key] = None if v is None else list(v)
        both = set(c["target_modules_bd_a"] or []) & set(c["target_modules_bd_b"] or [])
        check(not both, "use_bdlora", c, f"names {sorted(both)} in both target_modules_bd_a and target_modules_bd_b")
        check(isinstance(c["nblocks"], int) and not isinstance(c["nblocks"], bool) and c["nblocks"] > 0,
              "use_bdlora['nblocks']", c["nblocks"], "must be a positive integer (the serving shards)")
        check(isinstance(c["match_strict"], bool), "use_bdlora['match_strict']", c["match_strict"],
              "must be True or False")

    def block_factor(self, path: str) -> str | None:
        """BDLORA-1: "A" or "B", the factor of the layer at `path` that is block diagonal, or None (plain LoRA)."""
        c = self.use_bdlora
        a = any(p in path for p in c["target_modules_bd_a"] or [])
        b = any(p in path for p in c["target_modules_bd_b"] or [])
        check(not (a and b), f"use_bdlora (for {path})", c, "matches it in both target_modules_bd_a and _bd_b")
        check(a or b or not c["match_strict"], f"use_bdlora (for {path})", c,
              "matches it in neither target_modules_bd_a nor _bd_b; add a pattern for it, or set match_strict "
              "False to leave it plain LoRA")
        return "A" if a else "B" if b else None

    def trainable_count(self, layers: dict, mc) -> int:
        """BDLORA-5: LoRA's count, less the off-diagonal blocks of each block factor."""
        n, total = self.use_bdlora["nblocks"], super().trainable_count(layers, mc)
        for path, (i, o) in layers.items():
            r, which = self.rank_alpha_for(path)[0], self.block_factor(path)
            total -= 0 if which is None else (r * i if which == "A" else o * r) * (n - 1) // n
        return total

    def to_peft(self) -> dict:
        d = super().to_peft()
        d["use_bdlora"] = dict(self.use_bdlora)  # the flag's value is the sub-config itself
        return d


class BlockDiagonal(Module):
    """A (p, q) linear map blockdiag(weight), weight (p, q / n) (BDLORA-3); PEFT's BlockDiagonalLinear."""

    bias = None  # PEFT's block layer has none

    def __init__(self, weight, nblocks: int, q: int):
        self.weight, self.n, self.q = Tensor(weight, requires_grad=True), nblocks, q

    def forward(self, x):  # (..., q) -> (..., p)
        lead, (p, m), n = x.shape[:-1], self.weight.shape, self.n
        W = self.weight.reshape(n, p // n, m).transpose(1, 2)  # (n, q / n, p / n): block i is W_i^T
        return (x.reshape(*lead, n, 1, m) @ W).reshape(*lead, p)

    def matrix(self):
        """blockdiag(weight), (p, q)."""
        w = self.weight.data
        xp, (p, m), n = backend.xp_of(w), w.shape, self.n
        full = xp.zeros((p, self.q), dtype=w.dtype)
        for i in range(n):
            full[i * p // n:(i + 1) * p // n, i * m:(i + 1) * m] = w[i * p // n:(i + 1) * p // n, :]
        return full


class BDLoRALinear(LoRALinear):

    @classmethod
    def create(cls, base, cfg: BDLoRAConfig, path: str, rng, init_weights: bool = True):
        check(isinstance(base, Linear), f"target_modules (for {path})", type(base).__name__,
              "BD-LoRA needs a float Linear base (PEFT's 4-bit LoRA layers ignore use_bdlora)")
        which, n = cfg.block_factor(path), cfg.use_bdlora["nblocks"]
        r = cfg.rank_alpha_for(path)[0]
        i, o = base.in_features, base.out_features
        if which is not None:
            check(not base.fan_in_fan_out, f"target_modules (for {path})", "Conv1D",
                  "PEFT's block-diagonal factor needs torch.nn.Linear (its Conv1D has no in/out_features), so the "
                  "file could not be read there; leave this layer out of target_modules_bd_a/_bd_b")
            p, q = (r, i) if which == "A" else (o, r)
            check(p % n == 0 and q % n == 0, f"use_bdlora['nblocks'] (for {path})", n,
                  f"must divide both sides of its block-diagonal {which} ({p} x {q})")
            check(which == "A" or not cfg.lora_bias, f"lora_bias (for {path})", cfg.lora_bias,
                  "is not supported on a block-diagonal B (PEFT's block layer has no bias)")
        delta = super().create(base, cfg, path, rng, init_weights)
        if which == "A":  # BDLORA-2: kaiming_uniform (a = 0) on fan-in in / n
            bound = math.sqrt(6 * n / i)
            delta.lora_A = BlockDiagonal(rng.uniform((r, i // n), -bound, bound), n, i)
        elif which == "B":
            delta.lora_B = BlockDiagonal(backend.xp().zeros((o, r // n), dtype=backend.dtype("float32")), n, r)
        return delta

    def delta_weight(self):  # BDLORA-4: s B A, (out, in), blocks expanded
        A, B = (f.matrix() if isinstance(f, BlockDiagonal) else f.weight.data for f in (self.lora_A, self.lora_B))
        return backend.xp_of(A).matmul(B, A) * self.s


register("bdlora", BDLoRAConfig, BDLoRALinear,
         paper="Block-Diagonal LoRA for Eliminating Communication Overhead in Tensor Parallel LoRA Serving, "
               "Wang et al. 2025, arXiv:2510.23346",
         summary="LoRA whose A or B is block diagonal per layer (nblocks shards), dW = s B A (spec/bdlora.md).")
