"""LoKr: Low-rank Kronecker product (KronA, Edalati et al. 2022, arXiv:2212.10650; LyCORIS, arXiv:2309.14859).

Symbols: W0 (out, in) frozen base weight; out = a b and in = c d by factorization (LOKR-1);
    W1 (a, c), W2 (b, d), each a full leaf or a product of rank-r leaves; s scaling; x (..., in).
Factorisation (LOKR-1): (a, b) = factorization(out, f), (c, d) = factorization(in, f), f = factor.
Scaling (LOKR-2): s = alpha / r, also when neither factor uses r (PEFT's rule).
Leaves (LOKR-3): W2 = W2a W2b ((b, r), (r, d)) when r < max(b, d) / 2, else one leaf W2 (b, d);
    W1 = W1a W1b ((a, r), (r, c)) when decompose_both and r < max(a, c) / 2, else one leaf W1 (a, c).
Delta weight (LOKR-4): dW = s kron(W1, W2), (out, in): dW[i b + k, j d + l] = s W1[i, j] W2[k, l].
Forward (LOKR-7): h = W0 x + b + s vec_r(W1 X W2^T), X = x reshaped to (c, d) row-major and vec_r
    the row-major flattening: kron(W1, W2) x without materialising the (out, in) kron.
Dropouts (LOKR-5): as LoHa's (adapters/lycoris.py), the rank-dropout mask divided by its mean only
    with rank_dropout_scale.
Merge (LOKR-6): W <- W0 + dW (dW^T for the gpt2 Conv1D layout); unmerge subtracts it.
Init (LOKR-9): init_weights=True: W1 (or W1a) = 0, the other leaves kaiming-uniform; "lycoris":
    W2 (or W2b) = 0, the others kaiming-uniform; both give dW = 0 at step 0. False: all kaiming-uniform.
Trainable (LOKR-8): the leaves only: (a c or r (a + c)) + (b d or r (b + d)) numbers per layer.
PEFT parity: peft/tuners/lokr/layer.py (factorization, LoKrLayer.update_layer, reset_adapter_parameters*,
    get_delta_weight, make_kron); keys lokr_w1 / lokr_w1_a, lokr_w1_b and lokr_w2 / lokr_w2_a, lokr_w2_b.
Deviations: PEFT refuses the gpt2 Conv1D layer; minipeft adapts it (LOKR-6). PEFT's forward multiplies
    by the materialised kron; ours uses the identity (LOKR-7), equal to rounding. See lycoris.py.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd.function import no_grad
from .base import check
from .lycoris import LycorisConfig, LycorisDelta
from .registry import register


@dataclasses.dataclass
class LoKrConfig(LycorisConfig):
    factor: int = -1  # -1: near-square factors; f > 0: f and dim / f when f divides dim, else the nearest below
    decompose_both: bool = False  # W1 low-rank too
    rank_dropout_scale: bool = False  # divide the rank-dropout mask by its mean

    peft_type = "LOKR"
    PEFT_FIELDS = {**LycorisConfig.PEFT_FIELDS, "factor": "decompose_factor", "decompose_both": "decompose_both",
                   "rank_dropout_scale": "rank_dropout_scale"}
    ZEROED = {True: ("lokr_w1", "lokr_w1_a"), False: (), "lycoris": ("lokr_w2", "lokr_w2_b")}  # LOKR-9

    def validate(self):
        super().validate()
        check(isinstance(self.factor, int) and not isinstance(self.factor, bool), "factor", self.factor,
              "must be an integer (-1: factors near the square root)")
        for field in ("decompose_both", "rank_dropout_scale"):
            check(isinstance(getattr(self, field), bool), field, getattr(self, field), "must be true or false")

    def leaf_count(self, r: int, n: int, m: int) -> int:
        """LOKR-8: (a c or r (a + c)) + (b d or r (b + d)) with (a, b), (c, d) the factorizations of out, in."""
        (a, b), (c, d) = factorization(m, self.factor), factorization(n, self.factor)
        w1 = r * (a + c) if self.decompose_both and r < max(a, c) / 2 else a * c
        return w1 + (r * (b + d) if r < max(b, d) / 2 else b * d)


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """LOKR-1: (f, dim / f) when f > 0 divides dim; otherwise walk the divisors of dim upwards from 1,
    taking each one that is <= f (any, for f = -1) while the last taken is below its cofactor;
    the last taken and its cofactor, smaller first."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    cap = dim if factor == -1 else factor
    m = 1
    for d in range(2, dim + 1):
        if dim % d:
            continue
        if m >= dim // m or d > cap:
            break
        m = d
    return min(m, dim // m), max(m, dim // m)


class LoKrLinear(LycorisDelta):
    def __init__(self, in_features, out_features, r, s, cfg: LoKrConfig, rng):
        super().__init__(s, cfg, rng)
        self.rescale_rank_dropout = cfg.rank_dropout_scale
        (a, b), (c, d) = factorization(out_features, cfg.factor), factorization(in_features, cfg.factor)
        self.ab, self.cd = (a, b), (c, d)
        if cfg.decompose_both and r < max(a, c) / 2:  # LOKR-3
            self.leaf("lokr_w1_a", (a, r)), self.leaf("lokr_w1_b", (r, c))
        else:
            self.leaf("lokr_w1", (a, c))
        if r < max(b, d) / 2:
            self.leaf("lokr_w2_a", (b, r)), self.leaf("lokr_w2_b", (r, d))
        else:
            self.leaf("lokr_w2", (b, d))

    def kron_factor(self, i):  # W1 (a, c) or W2 (b, d), a Tensor
        full = getattr(self, f"lokr_w{i}", None)
        return full if full is not None else getattr(self, f"lokr_w{i}_a") @ getattr(self, f"lokr_w{i}_b")

    def term(self, x):  # LOKR-7: s vec_r(W1 X W2^T), never forming kron(W1, W2)
        (a, b), (c, d) = self.ab, self.cd
        lead = tuple(x.shape[:-1])
        X = x.reshape(*lead, c, d)  # (..., c, d)
        Y = self.kron_factor(1) @ X @ self.kron_factor(2).T  # (a, c) @ (..., c, d) @ (d, b) -> (..., a, b)
        return Y.reshape(*lead, a * b) * self.s  # (..., out)

    def delta_weight(self):  # LOKR-4: s kron(W1, W2), (out, in)
        with no_grad():
            W1, W2 = self.kron_factor(1).data, self.kron_factor(2).data  # (a, c), (b, d)
        (a, b), (c, d) = self.ab, self.cd
        K = W1[:, None, :, None] * W2[None, :, None, :]  # (a, b, c, d): W1[i, j] W2[k, l]
        return backend.xp_of(K).reshape(K, (a * b, c * d)) * self.s


register("lokr", LoKrConfig, LoKrLinear, paper="KronA (LoKr), Edalati et al. 2022, arXiv:2212.10650; LyCORIS, arXiv:2309.14859",
         summary="LoKr, dW = s kron(W1, W2) (spec/lokr.md).")
