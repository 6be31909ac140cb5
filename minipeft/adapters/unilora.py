"""Uni-LoRA: One Vector is All You Need (Li, Han, Su, Li, Cai, Ji, NeurIPS 2025, arXiv:2506.00799), as PEFT 0.21.2's
UNILORA tuner; spec/unilora.md.

Symbols: theta (d,) the one trained vector (PEFT's unilora_theta_d), d = theta_d_length, shared by every adapted layer;
    per layer W0 (out, in) = (m, n), A (r, n), B (m, r); D = sum over the adapted layers of r (n + m).
Index map (UNILORA-1): the layers' A and B entries, layer by layer in the model's module order, A then B, each
    row-major, form one flat list of D slots; slot t reads theta[idx[t]]. idx holds every j in 0..d-1 floor(D / d)
    times, then D mod d distinct extras g.choice(d, D mod d, replace=False), all shuffled by g.shuffle, where
    g = numpy.random.default_rng(proj_seed) (PEFT's UniLoraModel.generate_index: NumPy's generator, so the map is
    rebuilt here from the seed, bit for bit).
Scales (UNILORA-2): c_j = the number of slots reading theta[j]; slot t's scale is 1 / sqrt(c_idx[t]) (float32), so
    A[i, k] = theta[idx_A[i, k]] / sqrt(c_idx_A[i, k]), and B the same.
Forward (UNILORA-3): h = W0 x + b + B (A dropout(x)); dW = B A (out, in); no other scaling factor.
Init (UNILORA-4): init_weights=True: theta ~ U(-init_theta_d_bound, init_theta_d_bound), "random": N(0, 1); both give
    dW != 0 at step 0, as PEFT (theta = 0 would give no gradient to anything).
Merge (UNILORA-5): W <- W0 + dW (dW^T into GPT-2's Conv1D), unmerge subtracts it.
Trainable (UNILORA-6): d numbers per adapter, whatever the model; bias "none" | "all" | "unilora_only".
Serialization (UNILORA-7): peft_type "UNILORA"; theta once, as base_model.unilora_theta_d (d,); save_indices=True
    adds <layer>.unilora_indices_A (r, n), .unilora_indices_B (m, r) (int64) and .unilora_scales_A / _B (float32),
    which a load then takes from the file instead of the seed; fields r, theta_d_length, proj_seed,
    unilora_dropout, init_theta_d_bound, init_weights, save_indices, bias, fan_in_fan_out (no exclude_modules).
PEFT parity: peft/tuners/unilora/model.py generate_index, _assign_unilora_indices_and_scales, _init_unilora_theta_d;
    layer.py Linear._get_lora_matrices, forward, get_delta_weight.
Targets: float Linear layers and GPT-2's Conv1D (as PEFT); a 4-bit base is a ConfigError.
Deviations: theta is drawn from NumPy's generator, not torch's (the index map is NumPy's in PEFT too). PEFT takes
    unilora_dropout = 1.0; minipeft refuses it, as every method's dropout.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend
from ..autograd import embedding
from ..autograd import functional as F
from ..autograd.tensor import Tensor
from ..errors import CheckpointError
from ..nn.layers import Linear
from .base import AdapterConfig, Delta, check, trainable
from .registry import register

INITS = ("default", "random")
LEAVES = ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B")


@dataclasses.dataclass
class UniLoRAConfig(AdapterConfig):
    rank: int = 4  # PEFT's default r
    theta_d_length: int = 256  # d
    proj_seed: int = 42
    dropout: float = 0.0
    init_theta_d_bound: float = 0.02
    init: str = "default"  # one of INITS (UNILORA-4)
    save_indices: bool = False  # UNILORA-7: write the index map and scales beside theta
    fan_in_fan_out: bool = False  # accepted for PEFT's sake: each layer's own storage decides (PEFT resets it too)
    bias: str = "none"  # "none" | "all" | "unilora_only"

    peft_type = "UNILORA"
    INIT_MOVES_OUTPUT = "PEFT's init draws theta from U(-0.02, 0.02), and every A and B entry reads it: dW != 0 " \
                        "(UNILORA-4)"
    PEFT_FIELDS = {"rank": "r", "theta_d_length": "theta_d_length", "proj_seed": "proj_seed",
                   "dropout": "unilora_dropout", "init_theta_d_bound": "init_theta_d_bound", "init": "init_weights",
                   "save_indices": "save_indices", "bias": "bias"}
    PEFT_VALUES = {"init": {"default": True, "random": False}}
    FILE_ROWS, FILE_WIDTHS = ("theta_d_length",), ("rank",)  # IO-7: the file holds theta (d,), whatever r is
    # PEFT's UniLoraConfig has no exclude_modules
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "fan_in_fan_out")

    def validate(self):
        for field in ("rank", "theta_d_length"):
            check(getattr(self, field) > 0, field, getattr(self, field), "must be a positive integer")
        check(self.proj_seed >= 0, "proj_seed", self.proj_seed, "must be an integer >= 0 (NumPy's default_rng seed)")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(self.init_theta_d_bound > 0, "init_theta_d_bound", self.init_theta_d_bound,
              "must be > 0 (theta ~ U(-bound, bound); theta = 0 would give no gradient)")
        check(self.init in INITS, "init", self.init, f"use one of {', '.join(INITS)} (PEFT: True, False)")
        check(self.bias in ("none", "all", "unilora_only"), "bias", self.bias,
              "use 'none', 'all' or 'unilora_only'")

    def trainable_count(self, layers: dict, mc) -> int:
        """UNILORA-6: theta's d numbers, once for the whole model."""
        return self.theta_d_length


def index_map(D: int, d: int, seed: int) -> np.ndarray:
    """UNILORA-1: the flat slot -> theta index map (D,) int64, PEFT's generate_index with NumPy's generator."""
    g = np.random.default_rng(seed)
    idx = np.repeat(np.arange(d, dtype=np.int64), D // d)
    if D % d:
        idx = np.concatenate([idx, g.choice(d, size=D % d, replace=False).astype(np.int64)])
    g.shuffle(idx)
    return idx


def slot_scales(idx: np.ndarray, d: int) -> np.ndarray:
    """UNILORA-2: 1 / sqrt(c_j) per theta entry j (0 where no slot reads it), float32 as torch's rsqrt."""
    c = np.bincount(idx, minlength=d).astype(np.float32)
    return np.where(c > 0, np.float32(1) / np.sqrt(np.maximum(c, 1)), 0).astype(np.float32)


class UniLoRALinear(Delta):
    MIXED_BATCH = True  # y + B (A x) of the rows alone (METHOD-6)

    def __init__(self, theta, idx_A, idx_B, inv, cfg: UniLoRAConfig, rng):
        self.unilora_theta_d = theta  # (d,), shared by every layer of the adapter
        self.p, self.rng, self.save_indices = cfg.dropout, rng, cfg.save_indices
        self.indices = {"A": Tensor(backend.asarray(idx_A, "int64")), "B": Tensor(backend.asarray(idx_B, "int64"))}
        self.scales = {k: Tensor(backend.asarray(inv[i])) for k, i in (("A", idx_A), ("B", idx_B))}

    @classmethod
    def create_all(cls, bases: dict, cfg: UniLoRAConfig, rng, init_weights: bool = True):
        """theta once for every target; the index map over all their slots in module order (UNILORA-1)."""
        for path, b in bases.items():
            check(isinstance(b, Linear), f"target_modules (for {path})", type(b).__name__,
                  "UniLoRA needs a float Linear (or GPT-2 Conv1D) base; load the model unquantized")
        d, r = cfg.theta_d_length, cfg.rank
        shapes = {p: ((r, b.in_features), (b.out_features, r)) for p, b in bases.items()}
        idx = index_map(sum(r * (b.in_features + b.out_features) for b in bases.values()), d, cfg.proj_seed)
        inv = slot_scales(idx, d)
        if not init_weights:  # a load fills theta
            theta = np.zeros(d, dtype=np.float32)
        elif cfg.init == "default":
            theta = rng.uniform((d,), -cfg.init_theta_d_bound, cfg.init_theta_d_bound)
        else:
            theta = rng.normal((d,))
        theta = trainable(backend.asarray(theta))
        deltas, t = {}, 0
        for p, (sa, sb) in shapes.items():
            nA, nB = sa[0] * sa[1], sb[0] * sb[1]
            iA, iB = idx[t:t + nA].reshape(sa), idx[t + nA:t + nA + nB].reshape(sb)
            deltas[p], t = cls(theta, iA, iB, inv, cfg, rng), t + nA + nB
        return deltas, {"unilora_theta_d": theta}

    def saved_parameters(self):
        """UNILORA-7: theta is saved once (base_model.unilora_theta_d); the map and scales only with save_indices."""
        if not self.save_indices:
            return []
        return [("unilora_indices_A", self.indices["A"]), ("unilora_indices_B", self.indices["B"]),
                ("unilora_scales_A", self.scales["A"]), ("unilora_scales_B", self.scales["B"])]

    def from_file(self, where: str):
        """A file's index map must point into theta (UNILORA-7)."""
        d = self.unilora_theta_d.shape[0]
        for side, t in self.indices.items():
            i = backend.to_host(t.data)
            if i.size and (i.min() < 0 or i.max() >= d):
                raise CheckpointError(f"{where}: unilora_indices_{side} holds indices outside theta's {d} entries "
                                      f"(range {int(i.min())}..{int(i.max())}); the file does not fit its config")

    def factors(self):
        """UNILORA-2: A (r, in), B (out, r), each entry theta[idx] * scale."""
        col = self.unilora_theta_d.reshape(-1, 1)  # (d, 1): each slot gathers one row
        A, B = (embedding(col, self.indices[k].data).reshape(*self.indices[k].shape) * self.scales[k]
                for k in ("A", "B"))
        return A, B

    def adapt(self, x, y, base):  # UNILORA-3
        A, B = self.factors()
        return y + F.linear(F.linear(F.dropout(x, self.p, self.rng, self.training), A), B)

    def delta_weight(self):  # UNILORA-3: B A, (out, in)
        A, B = (t.data for t in self.factors())
        return backend.xp_of(A).matmul(B, A)


register("unilora", UniLoRAConfig, UniLoRALinear,
         paper="Uni-LoRA: One Vector is All You Need, Li, Han, Su, Li, Cai, Ji, NeurIPS 2025, arXiv:2506.00799",
         summary="Uni-LoRA, dW = B A with every entry of every layer's A and B one entry of a single trained vector "
                 "theta (d,), through a fixed seeded index map scaled by 1 / sqrt(its count) (spec/unilora.md).")
