"""VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks (Li, Han, Ji, 2024, arXiv:2405.15179),
spec/vblora.md.

Symbols: a vector bank V (N, L), one per adapter, shared by every adapted layer (PEFT's vblora_vector_bank);
    W0 (out, in), L divides in and out; per layer logits z_A (r, in/L, N) and z_B (out/L, r, N)
    (vblora_logits_A, vblora_logits_B); k = topk.
Mix (VBLORA-1): a row-segment with logits z (N,) is mix(z) = sum_{j in topk(z)} softmax(z[topk(z)])_j V_j (L,),
    topk(z) the k largest entries of z, ties broken by the lower index.
Factors (VBLORA-2): A[i, t L + l] = mix(z_A[i, t])[l] (r, in); B[t L + l, i] = mix(z_B[t, i])[l] (out, r).
Forward (VBLORA-3): h = W0 x + b + B (A dropout(x)); no scaling factor.
Delta weight / merge (VBLORA-4): dW = B A (out, in); W <- W0 + dW (dW^T for GPT-2's Conv1D); unmerge subtracts it.
Init (VBLORA-5): V ~ U(-init_vector_bank_bound, init_vector_bank_bound), z_A, z_B ~ N(0, init_logits_std²): dW != 0
    at step 0, as PEFT.
Trainable (VBLORA-6): V once, N L numbers, plus r N (in + out) / L per layer; W0 gets no gradient.
Serialization (VBLORA-7): peft_type "VBLORA"; <layer>.vblora_logits_A, <layer>.vblora_logits_B per layer and the bank
    once, as base_model.vblora_vector_bank (N, L).
Top-k files (VBLORA-8): save_only_topk_weights writes <layer>.vblora_logits_X_topk_indices (..., k) (uint8 / int16 /
    int32 / int64 by N) and _topk_weights (..., k - 1) (softmax of the top-k logits, the last one dropped); a load
    rebuilds z = log w at the indices, -inf elsewhere, and refuses training.
PEFT parity: peft/tuners/vblora/layer.py Linear._get_low_rank_matrix, _get_lora_matrices, forward; model.py
    _init_vblora_vector_bank, _get_adapter_state_dict, _remap_adapter_state_dict_for_load.
Deviations: torch.topk breaks exact ties in an unspecified order (lower index first here); the output differs only
    where logits tie at the k-th place. V and z are drawn from NumPy's generator, not torch's. Each adapter name
    has its own bank (as PEFT's ParameterDict keyed by adapter name).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import backend
from ..autograd import functional as F
from ..autograd.function import Function
from ..autograd.tensor import Tensor
from ..errors import CheckpointError, TrainingError
from .base import AdapterConfig, Delta, check, trainable
from .registry import register


@dataclasses.dataclass
class VBLoRAConfig(AdapterConfig):
    rank: int = 4  # PEFT's default r
    num_vectors: int = 256  # N, the bank's rows
    vector_length: int = 256  # L, divides every targeted in and out
    topk: int = 2
    dropout: float = 0.0
    save_only_topk_weights: bool = False  # VBLORA-8: smaller files, for inference and merging only
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    fan_in_fan_out: bool = False  # accepted for PEFT's sake: each layer's own storage decides (PEFT resets it too)
    bias: str = "none"  # "none" | "all" | "vblora_only"

    peft_type = "VBLORA"
    INIT_MOVES_OUTPUT = "PEFT's init draws the bank and the logits at random, so dW = B A != 0 (VBLORA-5)"
    PEFT_FIELDS = {"rank": "r", "num_vectors": "num_vectors", "vector_length": "vector_length", "topk": "topk",
                   "dropout": "vblora_dropout", "save_only_topk_weights": "save_only_topk_weights",
                   "init_vector_bank_bound": "init_vector_bank_bound", "init_logits_std": "init_logits_std",
                   "bias": "bias"}

    def validate(self):
        for field in ("rank", "num_vectors", "vector_length", "topk"):
            check(getattr(self, field) > 0, field, getattr(self, field), "must be a positive integer")
        check(self.topk <= self.num_vectors, "topk", self.topk,
              f"must be at most num_vectors={self.num_vectors}: each segment mixes topk of the bank's vectors")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        for field in ("init_vector_bank_bound", "init_logits_std"):
            check(getattr(self, field) >= 0, field, getattr(self, field), "must be a finite number >= 0")
        check(self.bias in ("none", "all", "vblora_only"), "bias", self.bias, "use 'none', 'all' or 'vblora_only'")
        check(self.layers_pattern is None or self.layers_to_transform is not None, "layers_pattern",
              self.layers_pattern, "needs layers_to_transform (PEFT's rule)")

    def trainable_count(self, layers: dict, mc) -> int:
        """VBLORA-6: the bank once, r N (in + out) / L logits per layer."""
        N, L = self.num_vectors, self.vector_length
        return N * L + sum(self.rank * N * (n + m) // L for n, m in layers.values())


def topk_indices(z, k: int):
    """VBLORA-1: the k largest entries of z (M, N) per row, largest first, ties to the lower index (M, k)."""
    return backend.argsort_stable(-z, axis=-1)[:, :k]


def softmax_last(a):
    """softmax over the last axis of an array (the weights of VBLORA-1)."""
    xp = backend.xp_of(a)
    e = xp.exp(a - xp.max(a, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def one_hot(idx, N: int, dtype):
    """(M, k) indices -> (M, k, N), 1 where the index is."""
    xp = backend.xp_of(idx)
    return xp.astype(idx[..., None] == xp.arange(N)[None, None, :], dtype)


class TopKMix(Function):
    """VBLORA-1: out[m] = sum_j w[m, j] V[idx[m, j]], w = softmax(z[m, idx[m]]), for z (M, N), V (N, L).
    Backward: dV = sum over (m, j) of w[m, j] g[m] at row idx[m, j]; dz at idx = softmax's VJP of g V[idx]^T, 0 elsewhere.
    The scatters are one-hot products (each logit position is picked once), the same operations on every backend."""

    def forward(self, z, V, k):
        xp = backend.xp_of(z)
        M, N = z.shape
        idx = topk_indices(z, k)  # (M, k)
        flat = xp.reshape(xp.arange(M)[:, None] * N + idx, (-1,))  # (M k,) positions in z
        w = softmax_last(xp.reshape(xp.take(xp.reshape(z, (-1,)), flat), (M, k)))  # (M, k)
        Vk = xp.reshape(xp.take(V, xp.reshape(idx, (-1,)), axis=0), (M, k, V.shape[1]))  # (M, k, L)
        self.save_for_backward(w, Vk, one_hot(idx, N, z.dtype))
        return xp.sum(w[..., None] * Vk, axis=-2)  # (M, L)

    def backward(self, g):  # g (M, L)
        xp = backend.xp_of(g)
        w, Vk, O = self.saved  # (M, k), (M, k, L), (M, k, N)
        dw = xp.sum(g[:, None, :] * Vk, axis=-1)  # (M, k)
        dzk = w * (dw - xp.sum(dw * w, axis=-1, keepdims=True))  # (M, k)
        dz = xp.sum(dzk[..., None] * O, axis=1)  # (M, N)
        M, k, N = O.shape
        dV = xp.matrix_transpose(xp.reshape(O, (M * k, N))) @ xp.reshape(w[..., None] * g[:, None, :], (M * k, -1))
        return dz, dV, None


def mix(z, V, k: int):
    """VBLORA-1 over the last axis of z (..., N): (..., L)."""
    lead = z.shape[:-1]
    return TopKMix.apply(z.reshape(-1, z.shape[-1]), V, k=k).reshape(*lead, V.shape[1])


def index_dtype(N: int) -> str:
    """VBLORA-8: the smallest integer type PEFT stores top-k indices in."""
    return "uint8" if N < 2 ** 8 else "int16" if N < 2 ** 15 else "int32" if N < 2 ** 31 else "int64"


class VBLoRALinear(Delta):
    MIXED_BATCH = True  # y + B (A x) of the rows alone (METHOD-6)

    def __init__(self, bank, n, m, cfg: VBLoRAConfig, rng):
        self.vblora_vector_bank = bank  # (N, L), shared by every layer of the adapter (VBLORA-7)
        self.k, self.p, self.rng, self.topk_only = cfg.topk, cfg.dropout, rng, cfg.save_only_topk_weights
        N, L, r = cfg.num_vectors, cfg.vector_length, cfg.rank
        self.vblora_logits_A = trainable(rng.normal((r, n // L, N), cfg.init_logits_std))  # (r, in/L, N)
        self.vblora_logits_B = trainable(rng.normal((m // L, r, N), cfg.init_logits_std))  # (out/L, r, N)
        self.file_form = {}  # leaf -> Tensor of a top-k file (VBLORA-8)

    @classmethod
    def create_all(cls, bases: dict, cfg: VBLoRAConfig, rng, init_weights: bool = True):
        """One bank for every target (VBLORA-7); L must divide each layer's in and out."""
        for path, b in bases.items():
            for side, width in (("in_features", b.in_features), ("out_features", b.out_features)):
                check(width % cfg.vector_length == 0, "vector_length", cfg.vector_length,
                      f"must divide every targeted layer's widths; {path} has {side}={width}: pick a divisor of it")
        bound = cfg.init_vector_bank_bound
        bank = trainable(rng.uniform((cfg.num_vectors, cfg.vector_length), -bound, bound))  # (N, L)
        deltas = {p: cls(bank, b.in_features, b.out_features, cfg, rng) for p, b in bases.items()}
        return deltas, {"vblora_vector_bank": bank}

    def saved_parameters(self):
        """VBLORA-7/8: the logits (or their top-k form); the bank is saved once, as base_model.vblora_vector_bank."""
        if not self.topk_only:
            return [("vblora_logits_A", self.vblora_logits_A), ("vblora_logits_B", self.vblora_logits_B)]
        xp, N = backend.xp_of(self.vblora_logits_A.data), self.vblora_vector_bank.shape[0]
        for leaf in ("vblora_logits_A", "vblora_logits_B"):
            z = getattr(self, leaf).data
            zf = xp.reshape(z, (-1, N))
            idx = topk_indices(zf, self.k)  # (M, k)
            zk = xp.take(xp.reshape(zf, (-1,)), xp.reshape(xp.arange(zf.shape[0])[:, None] * N + idx, (-1,)))
            w = xp.reshape(softmax_last(xp.reshape(zk, idx.shape)), z.shape[:-1] + (self.k,))[..., :-1]
            idx = xp.astype(xp.reshape(idx, z.shape[:-1] + (self.k,)), backend.dtype(index_dtype(N), xp))
            self.file_form[leaf + "_topk_indices"], self.file_form[leaf + "_topk_weights"] = Tensor(idx), Tensor(w)
        return list(self.file_form.items())

    def from_file(self, where: str):
        """VBLORA-8: logits from a top-k file: log w at the saved indices (the last w = 1 - the others), -inf elsewhere."""
        if not self.topk_only:
            return
        N = self.vblora_vector_bank.shape[0]
        for leaf in ("vblora_logits_A", "vblora_logits_B"):
            idx = backend.to_host(self.file_form[leaf + "_topk_indices"].data).astype(np.int64)
            w = backend.to_host(self.file_form[leaf + "_topk_weights"].data).astype(np.float32)
            if idx.size and (idx.min() < 0 or idx.max() >= N):
                raise CheckpointError(f"{where}: {leaf}_topk_indices fall outside the bank's {N} vectors")
            w = np.concatenate([w, 1 - w.sum(-1, keepdims=True)], axis=-1)
            if np.any(w < 0):
                raise CheckpointError(f"{where}: {leaf}_topk_weights has negative weights or sums above 1")
            z = np.full(idx.shape[:-1] + (N,), -np.inf, dtype=np.float32)
            with np.errstate(divide="ignore"):
                np.put_along_axis(z, idx, np.log(w), axis=-1)
            getattr(self, leaf).data = backend.asarray(z)

    def factors(self):
        """VBLORA-2: A (r, in), B (out, r) from the bank and the logits."""
        zA, zB, V = self.vblora_logits_A, self.vblora_logits_B, self.vblora_vector_bank
        A = mix(zA, V, self.k).reshape(zA.shape[0], -1)  # (r, in/L, L) -> (r, in)
        B = mix(zB, V, self.k).permute(0, 2, 1).reshape(-1, zB.shape[1])  # (out/L, L, r) -> (out, r)
        return A, B

    def adapt(self, x, y, base):  # VBLORA-3
        if self.training and bool(backend.xp_of(self.vblora_logits_A.data).any(self.vblora_logits_A.data == -math.inf)):
            raise TrainingError("this VB-LoRA adapter was loaded from a save_only_topk_weights file, which keeps "
                                "only the top-k weights: it serves inference and merging, not training (as PEFT)")
        A, B = self.factors()
        return y + F.linear(F.linear(F.dropout(x, self.p, self.rng, self.training), A), B)

    def delta_weight(self):  # VBLORA-4: B A, (out, in)
        A, B = (t.data for t in self.factors())
        return backend.xp_of(A).matmul(B, A)


register("vblora", VBLoRAConfig, VBLoRALinear,
         paper="VB-LoRA: Extreme Parameter Efficient Fine-Tuning with Vector Banks, Li, Han, Ji 2024, arXiv:2405.15179",
         summary="VB-LoRA, dW = B A with each row-segment of A and B a top-k softmax mix of a vector bank shared by "
                 "all layers (spec/vblora.md).")
