"""Super-Tuning: sparse fine-tuning of the largest-magnitude weights (arXiv:2607.09287), as PEFT 0.21.2's
SUPERTUNING tuner; spec/supertuning.md.

Symbols: W0 (out, in) = (m, n) frozen base weight, b its bias, x (..., n); p = sparsity in [0, 1);
    N = int(n m (1 - p)) trained entries v (N,) (PEFT's supertuning_values) at flat positions q (N,) int32 of
    W0.reshape(-1) (PEFT's supertuning_indices); Supra mode (r set): A (r, n), B (m, r) (PEFT's
    supertuning_lora_A.weight / supertuning_lora_B.weight), s = alpha / r, alpha = 2 r unless given.
Support (SUPERTUNING-1): q = the N flat positions of the largest |W0| (select_top=False: the smallest), in
    torch.topk's sorted order: |W0| descending (ascending); equal |W0| go to the lower flat index here
    (torch leaves that order unspecified). The file's q is used when it has one.
Delta weight (SUPERTUNING-2): dW = scatter(v at q) + s B A, scatter(v at q).reshape(-1)[q_j] = v_j (repeats add).
Forward (SUPERTUNING-3): h = (W0 + scatter(v at q)) x + b + s B A dropout(x).
Init (SUPERTUNING-4): init_weights=True: v = 0, A ~ U(+-1/sqrt(n)), B = 0: the base model.
    init_weights=False: v ~ N(0, 1), B ~ U(+-1/sqrt(r)) too.
Merge (SUPERTUNING-5): W <- W0 + dW; unmerge subtracts it.
Trainable (SUPERTUNING-6): N (+ r (n + m) in Supra mode) per layer; dL/dv_j = G.reshape(-1)[q_j], G = dL/d(dW).
Serialization (SUPERTUNING-7): peft_type "SUPERTUNING"; keys <layer>.supertuning_values (N,) float32,
    .supertuning_indices (N,) int32 (absent with save_precomputed_indices=False), and in Supra mode
    .supertuning_lora_A.weight (r, n), .supertuning_lora_B.weight (m, r); fields sparsity, select_top, r,
    lora_alpha, lora_dropout, init_weights, save_precomputed_indices.
PEFT parity: peft/tuners/supertuning/layer.py SupertuningLayer.update_layer, Linear.forward, get_delta_weight,
    merge; config.py SupertuningConfig.__post_init__.
Deviations: without saved indices and with equal |W0| that decide the support or its order, the positions are
    not pinned down (torch.topk's tie order is its sort's): refused (SUPERTUNING-8). v ~ N(0, 1) and A, B are
    drawn from minipeft's RNG, not torch's.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend
from ..autograd import functional as F
from ..autograd.function import no_grad
from ..autograd.tensor import Tensor
from ..errors import CheckpointError
from .base import AdapterConfig, Delta, check, check_peft_linear, fan_in_uniform, trainable
from .gralora import general_factor
from .registry import register
from .shira import EntriesToWeight


@dataclasses.dataclass
class SuperTuningConfig(AdapterConfig):
    sparsity: float = 0.99  # p: int(n m (1 - p)) entries of each W0 are trained
    select_top: bool = True  # True: the largest |W0| (Super / Supra); False: the smallest ("-bottom")
    rank: int | None = None  # r of the Supra LoRA part; None: the sparse part alone (Super)
    alpha: float | None = None  # s = alpha / r; None with r set: 2 r (PEFT's default)
    dropout: float = 0.0  # on the LoRA part's input
    init_weights: bool = True  # True: v = 0, B = 0 (the base model); False: v ~ N(0, 1), B kaiming
    save_precomputed_indices: bool = True  # False: the file omits q, rebuilt from |W0| on load

    peft_type = "SUPERTUNING"
    PEFT_FIELDS = {"sparsity": "sparsity", "select_top": "select_top", "rank": "r", "alpha": "lora_alpha",
                   "dropout": "lora_dropout", "init_weights": "init_weights",
                   "save_precomputed_indices": "save_precomputed_indices"}
    PEFT_COMMON = ("target_modules", "modules_to_save")  # PEFT's SupertuningConfig has no other common field

    def validate(self):
        check(0.0 <= self.sparsity < 1.0, "sparsity", self.sparsity, "must be in [0, 1) (0.99: 1% of W0 trained)")
        check(self.rank is None or self.rank > 0, "rank", self.rank, "must be a positive integer, or None (no LoRA)")
        check(self.rank is not None or self.alpha is None, "alpha", self.alpha,
              "is the Supra LoRA part's scaling; set rank (PEFT's r) too, or leave alpha unset")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        if self.rank is not None and self.alpha is None:
            self.alpha = 2 * self.rank  # PEFT's default, saved as such

    def entries(self, n: int, m: int) -> int:
        """N = int(n m (1 - p)), PEFT's float expression (SUPERTUNING-6)."""
        return int(n * m * (1 - self.sparsity))

    def trainable_count(self, layers: dict, mc) -> int:
        """SUPERTUNING-6: N (+ r (n + m)) per layer."""
        return sum(self.entries(n, m) + (self.rank or 0) * (n + m) for n, m in layers.values())


def support(W0, N: int, top: bool):
    """SUPERTUNING-1: the N flat positions (N,) of the largest |W0| (smallest if not top), in that order,
    equal |W0| to the lower index."""
    xp = backend.xp_of(W0)
    score = xp.reshape(xp.abs(W0), (-1,))  # (m n,)
    return backend.argsort_stable(-score if top else score)[:N]


def ties_decide(W0, q) -> bool:
    """Whether equal |W0| decide which positions q holds or their order: two of q's scores equal, or the last
    chosen one equals a left-out one (then torch.topk's order, unspecified, would settle it)."""
    score = np.abs(np.asarray(backend.to_host(W0), np.float64)).reshape(-1)
    chosen = score[np.asarray(backend.to_host(q), np.int64)]
    left = np.delete(score, np.asarray(backend.to_host(q), np.int64))
    return len(np.unique(chosen)) < len(chosen) or bool(np.isin(chosen[-1:], left).any())


class SuperTuningLinear(Delta):
    def __init__(self, q, N: int, shape, A=None, B=None, scaling: float = 0.0, dropout: float = 0.0, rng=None,
                 save_indices: bool = True):
        self.shape, self.sc, self.p, self.rng, self.save_indices = shape, scaling, dropout, rng, save_indices
        self.indices = (Tensor(backend.asarray(q, "int32")),)  # (N,); a tuple: no parameter walk finds it
        self.supertuning_values = trainable(backend.xp().zeros((N,), dtype=backend.dtype("float32")))
        if A is not None:  # Supra: keys supertuning_lora_A.weight (r, n), supertuning_lora_B.weight (m, r)
            self.supertuning_lora_A = general_factor(*A.shape, A)
            self.supertuning_lora_B = general_factor(*B.shape, B)

    @classmethod
    def create(cls, base, cfg: SuperTuningConfig, path: str, rng, init_weights: bool = True):
        check_peft_linear(base, path, "SUPERTUNING", "SuperTuning")
        n, m, N, r = base.in_features, base.out_features, cfg.entries(base.in_features, base.out_features), cfg.rank
        check(N >= 1, "sparsity", cfg.sparsity, f"leaves int({n} * {m} * (1 - p)) = 0 trainable entries of {path}; "
              "lower it")
        q = support(base.weight.data, N, cfg.select_top)
        check(cfg.save_precomputed_indices or not ties_decide(base.weight.data, q), "save_precomputed_indices",
              False, f"equal |W0| entries of {path} decide its support or their order, which torch.topk leaves "
              "unspecified, so a file without supertuning_indices would not pin the positions down; keep it True")
        xp = backend.xp_of(base.weight.data)
        f32 = backend.dtype("float32", xp)
        A = B = None
        if r is not None:
            A, B = xp.zeros((r, n), dtype=f32), xp.zeros((m, r), dtype=f32)
            if init_weights:  # SUPERTUNING-4; a load fills them
                A = fan_in_uniform(rng, (r, n), n)
                if not cfg.init_weights:
                    B = fan_in_uniform(rng, (m, r), r)
        delta = cls(q, N, (m, n), A, B, cfg.alpha / r if r else 0.0, cfg.dropout, rng, cfg.save_precomputed_indices)
        if init_weights and not cfg.init_weights:
            delta.supertuning_values.data = rng.normal((N,))
        return delta

    def saved_parameters(self):  # SUPERTUNING-7: the positions beside the values, unless left out
        out = [("supertuning_values", self.supertuning_values)]
        out += [("supertuning_indices", self.indices[0])] if self.save_indices else []
        return out + [(k, p) for k, p in self.named_parameters() if k != "supertuning_values"]

    def from_file(self, where: str):
        """A loaded supertuning_indices must hold flat positions in [0, out * in)."""
        q = backend.to_host(self.indices[0].data).astype(np.int64)
        if not np.all((0 <= q) & (q < self.shape[0] * self.shape[1])):
            raise CheckpointError(f"{where}: supertuning_indices fall outside this layer's out * in = "
                                  f"{self.shape[0] * self.shape[1]} entries {self.shape}; was this adapter trained "
                                  "on another base model?")

    def sparse(self):  # scatter(v at q) (out, in), a Tensor
        xp = backend.xp_of(self.supertuning_values.data)
        q = xp.astype(self.indices[0].data, xp.int64)
        return EntriesToWeight.apply(self.supertuning_values, flat=q, shape=self.shape, s=1.0)

    def adapt(self, x, y, base):  # SUPERTUNING-3
        y = y + F.linear(x, self.sparse())
        if hasattr(self, "supertuning_lora_A"):
            h = F.dropout(x, self.p, self.rng, self.training)
            y = y + self.supertuning_lora_B(self.supertuning_lora_A(h)) * self.sc
        return y

    def delta_weight(self):  # SUPERTUNING-2
        with no_grad():
            dW = self.sparse().data
            if hasattr(self, "supertuning_lora_A"):
                xp = backend.xp_of(dW)
                dW = dW + xp.matmul(self.supertuning_lora_B.weight.data, self.supertuning_lora_A.weight.data) * self.sc
            return dW


register("supertuning", SuperTuningConfig, SuperTuningLinear,
         paper="Super-Tuning, arXiv:2607.09287",
         summary="SuperTuning, dW sparse: the int(n m (1 - sparsity)) largest-|W0| entries trained, optional Supra "
                 "LoRA part (spec/supertuning.md).")
