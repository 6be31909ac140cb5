"""TinyLoRA: Learning to Reason in 13 Parameters (Morris, Mireshghallah, Ibrahim, Mahloujifar 2026,
arXiv:2602.04118), as PEFT 0.21.2's TINYLORA tuner; spec/tinylora.md.

Symbols: W0 (out, in) = (m, n) frozen base weight (GPT-2's Conv1D: its stored weight transposed), x (..., n);
    W0 = U S V^T its thin SVD, r' = min(r, m, n); A = diag(sqrt S_r') V_r'^T (r', n), B = U_r' diag(sqrt S_r')
    (m, r') frozen (PEFT's tinylora_A, tinylora_B); P (u, r', r') fixed random (tinylora_P); v (u,) trained,
    one per tie group (base_model.tinylora_v.<g>); R = sum_i v_i P_i (r', r').
Subspace (TINYLORA-1): A, B from W0's SVD in float32, each pair's sign fixed as PSOFT-1 (psoft.principal_subspace
    with s = 1, "pissa_init"); saved, and a file's A, B are used as they are.
Groups (TINYLORA-2): the T targeted layers in module order, j = 0..T-1; G = max(1, round(T (1 - weight_tying))),
    g(j) = min(j // max(1, T // G), G - 1); the layers of a group share one v.
Projections (TINYLORA-3): P of layer j = torch.normal(0, 1/sqrt(r'), (u, r', r')) under
    torch.Generator().manual_seed(projection_seed + j), rebuilt without torch (backend.torch_normal).
Forward (TINYLORA-4): h = W0 x + b + B R A dropout(x) (PEFT: F.linear by A, then R, then B).
Delta weight / merge (TINYLORA-5): dW = B R A (out, in) (dW^T into Conv1D); W <- W0 + dW, unmerge subtracts it.
Init (TINYLORA-6): init_weights=True ("default"): v = 0, dW = 0; "uniform": v ~ U(-init_v_bound, init_v_bound);
    False ("empty", torch.empty in PEFT): v = 0 here.
Trainable (TINYLORA-7): u per group, G u in all; dL/dv_i = <B^T G A^T, P_i> with G = dL/d(dW); W0, A, B, P frozen.
Serialization (TINYLORA-8): peft_type "TINYLORA"; keys <layer>.tinylora_A (r', n), .tinylora_B (m, r'),
    .tinylora_P (u, r', r') (absent with save_projection=False: rebuilt by TINYLORA-3), base_model.tinylora_v.<g>
    (u,); fields r, u, weight_tying, projection_seed, save_projection, init_v_bound, tinylora_dropout, bias,
    init_weights, fan_in_fan_out.
PEFT parity: peft/tuners/tinylora/layer.py TinyLoraLayer._init_svd, _init_projection, _compute_R, get_delta_weight,
    Linear.forward; model.py _build_target_key_mapping, _create_and_replace (groups), _get_adapter_state_dict.
Deviations: SVD signs are minipeft's (TINYLORA-1) where PEFT's are its LAPACK's; they matter only for a fresh
    adapter, as files carry A and B. init_weights=False gives v = 0, not uninitialised memory. P's float32 values
    are within a few ulps of torch's (its AVX2 log / sincos). nn.Embedding targets are not adapted.
"""
from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..autograd import functional as F
from ..autograd.function import no_grad
from ..autograd.tensor import Tensor
from ..nn.layers import Linear
from .base import AdapterConfig, Delta, check, orient, trainable
from .psoft import principal_subspace
from .registry import register

INITS = ("default", "uniform", "empty")


@dataclasses.dataclass
class TinyLoRAConfig(AdapterConfig):
    rank: int = 2  # r of W0's truncated SVD (the paper's 2)
    u: int = 64  # length of each trained v
    weight_tying: float = 0.0  # 0: a v per layer; 1: one v for all (TINYLORA-2)
    projection_seed: int = 42  # P of layer j from seed projection_seed + j (TINYLORA-3)
    save_projection: bool = True  # False: the file omits P, rebuilt from the seed on load
    init_v_bound: float = 0.02
    dropout: float = 0.0
    init: str = "default"  # one of INITS (TINYLORA-6)
    fan_in_fan_out: bool = False  # accepted for PEFT's sake: each layer's own storage decides (PEFT resets it too)
    bias: str = "none"  # "none" | "all" | "tinylora_only"

    peft_type = "TINYLORA"
    PEFT_FIELDS = {"rank": "r", "u": "u", "weight_tying": "weight_tying", "projection_seed": "projection_seed",
                   "save_projection": "save_projection", "init_v_bound": "init_v_bound", "dropout": "tinylora_dropout",
                   "init": "init_weights", "bias": "bias"}
    PEFT_VALUES = {"init": {"default": True, "uniform": "uniform", "empty": False}}
    # PEFT's TinyLoraConfig has no exclude_modules
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "fan_in_fan_out")

    def validate(self):
        for field in ("rank", "u"):
            check(getattr(self, field) > 0, field, getattr(self, field), "must be a positive integer")
        check(0.0 <= self.weight_tying <= 1.0, "weight_tying", self.weight_tying,
              "must be in [0, 1] (0: a v per layer, 1: one v shared by all)")
        check(self.projection_seed >= 0, "projection_seed", self.projection_seed, "must be >= 0 (a torch seed)")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(self.init in INITS, "init", self.init, f"use one of {', '.join(INITS)} (PEFT: True, 'uniform', False)")
        check(self.bias in ("none", "all", "tinylora_only"), "bias", self.bias, "use 'none', 'all' or 'tinylora_only'")

    def groups(self, T: int) -> list:
        """TINYLORA-2: the tie group of each of T targeted layers, in module order."""
        G = max(1, round(T * (1.0 - self.weight_tying)))
        size = max(1, T // G)
        return [min(j // size, G - 1) for j in range(T)]

    def trainable_count(self, layers: dict, mc) -> int:
        """TINYLORA-7: u per tie group."""
        return self.u * len(set(self.groups(len(layers))))


def projections(u: int, r: int, seed: int):
    """TINYLORA-3: P (u, r, r) ~ N(0, 1/r) as torch draws it from manual_seed(seed)."""
    return backend.asarray(backend.torch_normal((u, r, r), 1.0 / math.sqrt(r), seed), "float32")


class TinyLoRALinear(Delta):
    def __init__(self, v, A, B, P, dropout: float, rng, save_projection: bool):
        self.tinylora_v = v  # (u,), shared by the layers of its tie group (TINYLORA-2)
        self.frozen = tuple(Tensor(t) for t in (A, B, P))  # A (r', n), B (m, r'), P (u, r', r'); a tuple: no
        self.p, self.rng, self.save_projection = dropout, rng, save_projection  # parameter walk finds them

    @classmethod
    def create_all(cls, bases: dict, cfg: TinyLoRAConfig, rng, init_weights: bool = True):
        """A v per tie group (saved once each, as base_model.tinylora_v.<g>), A, B, P per layer."""
        groups = cfg.groups(len(bases))
        f32 = backend.dtype("float32")
        vs = {}
        for g in sorted(set(groups)):
            v = backend.xp().zeros((cfg.u,), dtype=f32)
            if init_weights and cfg.init == "uniform":  # TINYLORA-6
                v = rng.uniform((cfg.u,), -cfg.init_v_bound, cfg.init_v_bound)
            vs[g] = trainable(v)
        deltas = {}
        for j, (path, base) in enumerate(bases.items()):
            check(isinstance(base, Linear), f"target_modules (for {path})", type(base).__name__,
                  "TinyLoRA needs a float Linear or GPT-2's Conv1D (the SVD needs W0); load the model unquantized")
            xp = backend.xp_of(base.weight.data)
            W0 = orient(xp.astype(base.weight.data, backend.dtype("float32", xp)), base)  # (m, n)
            r = min(cfg.rank, *W0.shape)
            A, B = principal_subspace(W0, r, 1.0, "pissa_init")  # TINYLORA-1
            deltas[path] = cls(vs[groups[j]], A, B, projections(cfg.u, r, cfg.projection_seed + j), cfg.dropout,
                               rng, cfg.save_projection)
        return deltas, {f"tinylora_v.{g}": v for g, v in vs.items()}

    def saved_parameters(self):  # TINYLORA-8: v is saved once per group, as a shared tensor
        names = ("tinylora_A", "tinylora_B", "tinylora_P")[:3 if self.save_projection else 2]
        return list(zip(names, self.frozen))

    def R(self):  # sum_i v_i P_i (r', r'), a Tensor
        P = self.frozen[2].data
        xp = backend.xp_of(P)
        u, r = P.shape[0], P.shape[1]
        return (self.tinylora_v.reshape(1, u) @ Tensor(xp.reshape(P, (u, r * r)))).reshape(r, r)

    def adapt(self, x, y, base):  # TINYLORA-4
        A, B, _ = self.frozen
        h = F.linear(F.dropout(x, self.p, self.rng, self.training), A)  # (..., r')
        return y + F.linear(F.linear(h, self.R()), B)

    def delta_weight(self):  # TINYLORA-5: B R A (out, in)
        with no_grad():
            A, B, _ = (t.data for t in self.frozen)
            xp = backend.xp_of(A)
            return xp.matmul(xp.matmul(B, self.R().data), A)


register("tinylora", TinyLoRAConfig, TinyLoRALinear,
         paper="Learning to Reason in 13 Parameters, Morris et al. 2026, arXiv:2602.04118",
         summary="TinyLoRA, dW = B (sum_i v_i P_i) A with A, B from W0's SVD and P fixed random; u numbers per tie "
                 "group of layers (spec/tinylora.md).")
