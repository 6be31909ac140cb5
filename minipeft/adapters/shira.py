"""SHiRA: Sparse High Rank Adapters (Bhardwaj et al. 2024, arXiv:2406.13175), spec/shira.md.

Symbols: W0 (out, in) frozen base weight, x (..., in); r the rank that sizes the adapter like LoRA's;
    N = r (in + out) trained entries (PEFT's shira_weight, w (N,)) at fixed positions (PEFT's
    shira_indices, (2, N): rows i_j and columns k_j); s = 1 the scaling.
Mask (SHIRA-1): PEFT's random mask: p = the first N entries of torch.randperm(out * in) with
    torch.Generator().manual_seed(random_seed) (backend.torch_randperm_prefix; random_seed None is a fresh
    torch.Generator's seed 67280421310721), then sorted: the mask's nonzeros in row-major order
    (torch.where), i_j = p_j // in, k_j = p_j % in. Saved in the file; a load takes the file's.
Delta weight (SHIRA-2): dW (out, in) = 0 except dW[i_j, k_j] = s w_j (entries at one position add);
    rank(dW) is not bounded by r.
Forward (SHIRA-3): h = (W0 + dW) x + b.
Init (SHIRA-4): init_weights=True (PEFT's default): w = 0, h = W0 x + b; False: w ~ N(0, 1).
Merge (SHIRA-5): W <- W0 + dW; unmerge subtracts it.
Gradients (SHIRA-6): with G = dL/d(dW), dL/dw_j = s G[i_j, k_j] (the op EntriesToWeight). N numbers per layer.
Serialization (SHIRA-7): peft_type "SHIRA"; keys <layer>.shira_weight (N,) float32 and
    <layer>.shira_indices (2, N) int32; config r, mask_type "random", random_seed, init_weights.
Errors (SHIRA-8): r (in + out) > in * out, r <= 0, mask_type other than "random", a Conv1D target.
PEFT parity: peft/tuners/shira/mask_functions.py random_mask; peft/tuners/shira/layer.py update_layer,
    get_delta_weight (sparse_coo_tensor), Linear.forward; model.py _get_adapter_state_dict (indices saved).
Deviations: w ~ N(0, 1) (init_weights=False) is drawn from minipeft's RNG, not torch's (a file carries w).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend
from ..autograd import functional as F
from ..autograd.function import Function, no_grad
from ..autograd.tensor import Tensor
from ..errors import CheckpointError
from ..nn.layers import Conv1D, Linear
from .base import AdapterConfig, Delta, check, trainable
from .registry import register

TORCH_DEFAULT_SEED = 67280421310721  # torch.Generator().initial_seed(): PEFT's mask when random_seed is None


@dataclasses.dataclass
class SHiRAConfig(AdapterConfig):
    rank: int = 32  # N = r (in + out) entries per layer, LoRA's count at rank r
    mask_type: str = "random"  # PEFT's one built-in mask
    random_seed: int | None = None  # None: a fresh torch.Generator's seed, as PEFT
    init_weights: bool = True  # True: w = 0 (PEFT's default); False: w ~ N(0, 1)

    peft_type = "SHIRA"
    PEFT_COMMON = ("target_modules", "modules_to_save", "fan_in_fan_out")
    PEFT_FIELDS = {"rank": "r", "mask_type": "mask_type", "random_seed": "random_seed", "init_weights": "init_weights"}

    def validate(self):
        check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0, "rank", self.rank,
              "must be a positive integer")
        check(self.mask_type == "random", "mask_type", self.mask_type,
              "use 'random' (PEFT's built-in mask; a custom mask_fn cannot be saved in a file)")
        check(self.random_seed is None or (isinstance(self.random_seed, int) and not isinstance(self.random_seed, bool)
                                           and 0 <= self.random_seed < 2**64), "random_seed", self.random_seed,
              "must be None or an integer in [0, 2**64) (torch.Generator.manual_seed's range)")

    def trainable_count(self, layers: dict, mc) -> int:
        """SHIRA-6: r (in + out) entries per layer."""
        return sum(self.rank * (n + m) for n, m in layers.values())


def random_mask(n: int, m: int, N: int, seed) -> np.ndarray:
    """SHIRA-1: (2, N) int32 rows and columns of PEFT's random mask, in row-major order."""
    p = np.sort(backend.torch_randperm_prefix(m * n, N, TORCH_DEFAULT_SEED if seed is None else seed))
    return np.stack([p // n, p % n]).astype(np.int32)


class EntriesToWeight(Function):
    """dW (out, in) = 0 except dW.flat[flat] += s w (SHIRA-2); backward dw = s G.flat[flat] (SHIRA-6)."""

    def forward(self, w, flat, shape, s):
        xp = backend.xp_of(w)
        self.flat, self.s = flat, s
        dW = backend.scatter_add(xp.zeros((shape[0] * shape[1],), dtype=w.dtype), flat, w * s)  # (out * in,)
        return xp.reshape(dW, shape)

    def backward(self, g):
        xp = backend.xp_of(g)
        return (xp.take(xp.reshape(g, (-1,)), self.flat) * self.s,)  # (N,)


def entries_weight(w, indices, shape, s: float = 1.0):
    """SHIRA-2: the Tensor dW (out, in) = 0 except dW[i_j, k_j] += s w_j, at `indices` (2, N): rows, columns."""
    xp = backend.xp_of(indices)
    i = xp.astype(indices, xp.int64)
    return EntriesToWeight.apply(w, flat=i[0, :] * shape[1] + i[1, :], shape=shape, s=s)


def check_positions(indices, shape, where: str, key: str) -> None:
    """A file's positions (2, N) must be rows in [0, out) and columns in [0, in) of `shape` (out, in)."""
    i = backend.to_host(indices).astype(np.int64)
    if not (np.all((0 <= i[0]) & (i[0] < shape[0])) and np.all((0 <= i[1]) & (i[1] < shape[1]))):
        raise CheckpointError(f"{where}: {key} fall outside this layer's (out, in) = {tuple(shape)}; "
                              "was this adapter trained on another base model?")


class SHiRALinear(Delta):
    def __init__(self, n: int, m: int, indices, s: float = 1.0):
        self.shape, self.s = (m, n), s
        self.indices = (Tensor(backend.asarray(indices, "int32")),)  # (2, N); a tuple: no parameter walk finds it
        self.shira_weight = trainable(backend.xp().zeros((indices.shape[1],), dtype=backend.dtype("float32")))

    @classmethod
    def create(cls, base, cfg: SHiRAConfig, path: str, rng, init_weights: bool = True):
        check(isinstance(base, Linear) and not isinstance(base, Conv1D), f"target_modules (for {path})",
              type(base).__name__, "SHiRA needs a float torch-style Linear: PEFT's SHiRA supports only nn.Linear")
        n, m, N = base.in_features, base.out_features, cfg.rank * (base.in_features + base.out_features)
        check(N <= n * m, "rank", cfg.rank, f"gives r (in + out) = {N} entries, more than in * out = {n * m} of {path} "
              f"({n} -> {m}); lower it")
        check(n * m < backend.TORCH_RANDPERM_SMALL, f"target_modules (for {path})", (n, m),
              f"in * out must be < {backend.TORCH_RANDPERM_SMALL}: torch.randperm shuffles larger ranges another way")
        delta = cls(n, m, random_mask(n, m, N, cfg.random_seed))
        if init_weights and not cfg.init_weights:  # SHIRA-4
            delta.shira_weight.data = rng.normal((N,))
        return delta

    def saved_parameters(self):  # SHIRA-7: PEFT saves the positions beside the entries
        return [("shira_weight", self.shira_weight), ("shira_indices", self.indices[0])]

    def from_file(self, where: str):
        check_positions(self.indices[0].data, self.shape, where, "shira_indices")

    def weight(self):  # SHIRA-2: a Tensor (out, in)
        return entries_weight(self.shira_weight, self.indices[0].data, self.shape, self.s)

    def adapt(self, x, y, base):  # SHIRA-3
        return y + F.linear(x, self.weight())

    def delta_weight(self):
        with no_grad():
            return self.weight().data


register("shira", SHiRAConfig, SHiRALinear,
         paper="Sparse High Rank Adapters, Bhardwaj et al. 2024, arXiv:2406.13175",
         summary="SHiRA, dW sparse: r (in + out) trained entries at PEFT's seeded random mask (spec/shira.md).")
