"""HRA: Householder Reflection Adaptation, as PEFT 0.21.2 implements it. Yuan, Qiu, Weller, Xu, Xu 2024,
"Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection Adaptation",
arXiv:2405.17484; spec/hra.md.

Symbols: W0 (out, in) frozen base weight, b its bias, x (..., in); U (in, r) the trainable vectors (PEFT's
    hra_u), u_i its columns, q_i = u_i / ||u_i|| (HRA-1), or the Gram-Schmidt orthonormalisation of u_1..u_r
    with apply_GS (HRA-2); H_i = I - 2 q_i q_i^T; R = H_1 H_2 ... H_r (in, in).
Update (HRA-1): W = W0 R, an orthogonal R: h = W0 R x + b.
Forward (HRA-3): x (row) -> x R^T = x H_r ... H_1, one rank-1 step per vector, then the base layer.
Init (HRA-4): "default" (PEFT init_weights=True): r/2 columns ~ U(-1/sqrt(r/2), 1/sqrt(r/2)) (torch's
    kaiming-uniform on an (in, r/2) tensor), each repeated twice (u_{2k} = u_{2k+1}), so H_{2k} H_{2k+1} = I and
    R = I: the adapted model is the base. r must be even then (ConfigError; PEFT warns and draws at random).
    With apply_GS the pairs do not cancel: Gram-Schmidt turns the second of a pair into its rounding residual
    normalised, or 0/0 = NaN (PEFT gives either); minipeft refuses that pairing (ConfigError: use init="random").
    "random" (init_weights=False): U ~ U(-1/sqrt(r), 1/sqrt(r)), R != I.
Merge (HRA-5): W <- W0 R; unmerge W <- W R^T = W H_r ... H_1 (PEFT's reverse product; R is orthogonal).
Trainable (HRA-6): in r numbers per layer; bias "none" | "all" | "hra_only" as PEFT's.
Serialization (HRA-7): peft_type "HRA", key <layer>.hra_u (in, r), fields r, apply_GS, init_weights, bias.
PEFT parity: peft/tuners/hra/layer.py HRALinear.get_delta_weight, forward, merge, unmerge.
Targets: Linear layers; GPT-2's Conv1D is a ConfigError (PEFT's HRA takes nn.Linear and nn.Conv2d only).
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd.tensor import Tensor
from .base import COMMON_FIELDS, AdapterConfig, Delta, check, fan_in_uniform, orient, trainable
from .registry import register

INITS = ("default", "random")


@dataclasses.dataclass
class HRAConfig(AdapterConfig):
    rank: int = 8  # PEFT's default r
    apply_GS: bool = False
    init: str = "default"  # one of INITS (HRA-4)
    bias: str = "none"  # "none" | "all" | "hra_only"

    peft_type = "HRA"
    PEFT_FIELDS = {"rank": "r", "apply_GS": "apply_GS", "init": "init_weights", "bias": "bias"}
    PEFT_VALUES = {"init": {"default": True, "random": False}}
    PEFT_COMMON = COMMON_FIELDS  # PEFT's HRAConfig has no fan_in_fan_out

    def validate(self):
        check(isinstance(self.rank, int) and self.rank > 0, "rank", self.rank, "must be a positive integer")
        check(self.init in INITS, "init", self.init, f"use one of {', '.join(INITS)}")
        check(self.bias in ("none", "all", "hra_only"), "bias", self.bias, "use 'none', 'all' or 'hra_only'")

    def trainable_count(self, layers: dict, mc) -> int:
        """HRA-6: in r per layer."""
        return sum(self.rank * n for n, _ in layers.values())


def reflect(M, q: list, reverse: bool):
    """M H_1 ... H_r (or M H_r ... H_1 with reverse) for M (..., in), H_i = I - 2 q_i q_i^T, q_i (in, 1)."""
    for qi in (reversed(q) if reverse else q):
        M = M - ((M @ qi) @ qi.T) * 2.0
    return M


class HRALinear(Delta):
    def __init__(self, U, apply_GS: bool):
        self.hra_u = trainable(U)  # (in, r)
        self.apply_GS = apply_GS

    @classmethod
    def create(cls, base, cfg: HRAConfig, path: str, rng, init_weights: bool = True):
        check(not base.fan_in_fan_out, f"target_modules (for {path})", "Conv1D",
              "PEFT's HRA adapts torch.nn.Linear only (not GPT-2's Conv1D), so the file could not be read there")
        n, r = base.in_features, cfg.rank
        xp = backend.xp_of(base.weight.data)
        if not init_weights:  # a load fills it
            U = xp.zeros((n, r), dtype=backend.dtype("float32", xp))
        elif cfg.init == "default":  # HRA-4: pairs of equal columns, R = I
            check(not cfg.apply_GS, "apply_GS", True, "with init='default' Gram-Schmidt turns each repeated column "
                  "into its rounding residual (noise, or NaN in PEFT), not R = I; use init='random' with apply_GS")
            check(r % 2 == 0, "rank", r, "must be even for init='default' (pairs of equal reflections give R = I); "
                  "use an even rank, or init='random'")
            half = fan_in_uniform(rng, (n, r // 2), r // 2)
            U = xp.reshape(xp.stack([half, half], axis=2), (n, r))
        else:
            U = fan_in_uniform(rng, (n, r), r)
        return cls(U, cfg.apply_GS)

    def directions(self, U: Tensor) -> list:  # q_1..q_r, each (in, 1): HRA-1, or HRA-2 with apply_GS
        cols = [U[:, i:i + 1] for i in range(U.shape[1])]
        if not self.apply_GS:
            return [c / (c * c).sum().sqrt() for c in cols]
        q = []
        for c in cols:
            for qj in q:
                c = c - (qj.T @ c) * qj
            q.append(c / (c * c).sum().sqrt())
        return q

    def adapt_input(self, x):  # HRA-3: x R^T
        return reflect(x, self.directions(self.hra_u), reverse=True)

    def adapt(self, x, y, base):
        return y

    def transform(self, base, reverse: bool):
        W = reflect(Tensor(base.weight_out_in()), self.directions(Tensor(self.hra_u.data)), reverse)
        base.weight.data = orient(W.data, base)

    def merge_into(self, base):  # HRA-5: W0 R
        self.transform(base, reverse=False)

    def unmerge_from(self, base):  # W R^T
        self.transform(base, reverse=True)


register("hra", HRAConfig, HRALinear,
         paper="Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder Reflection Adaptation, "
               "Yuan, Qiu, Weller, Xu, Xu 2024, arXiv:2405.17484",
         summary="HRA, W = W0 H_1 ... H_r with Householder reflections H_i = I - 2 u_i u_i^T / |u_i|^2 (spec/hra.md).")
