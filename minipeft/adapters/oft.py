"""OFT: Orthogonal Finetuning, as PEFT 0.21 implements it (OFTv2). Qiu et al. 2023, "Controlling Text-to-Image
Diffusion by Orthogonal Finetuning", arXiv:2306.07280; Qiu et al. 2025, "Orthogonal Finetuning Made Scalable",
arXiv:2506.19847.

Symbols: W0 (out, in) frozen base weight, x (..., in); b the block size, D = in / b the number of blocks;
    q (D', b(b-1)/2) the trainable vectors (PEFT's oft_R.weight), D' = D, or 1 with block_share;
    Q_i = skew(q_i) (b, b): q_i fills the strict upper triangle row by row, Q_i = U - U^T;
    R_i = Cayley(Q_i); R = blockdiag(R_1..R_D) (in, in).
Block size (OFT-1): exactly one of r / oft_block_size is non-zero; the other is in / it. It must divide
    every targeted layer's width (ConfigError otherwise; PEFT rounds it to a divisor with a warning).
Cayley (OFT-2): exact: R_i = (I - Q_i)(I + Q_i)^-1; Cayley-Neumann with k terms (the default, k = 5):
    R_i = I + 2 Q + 2 Q^2 + ... + 2 Q^(k-2) + Q^(k-1) (k >= 4), I + 2Q + 2Q^2 + Q^3 (k = 3), I + 2Q (k = 2), I (k = 1).
Forward (OFT-3): h = W0 (R^T x) + b0: each block x_i (row) becomes x_i R_i, then the base layer.
Init (OFT-4): q = 0, so R = I and h = base.
coft (OFT-5): before each use, q_i is projected in place (no gradient) onto ||Q_i||_F <= eps / sqrt(D').
module_dropout (OFT-6): in training, int(p D) randomly chosen blocks use R_i = I (not with block_share).
Merge (OFT-7): W <- W0 R^T (PEFT's W^T <- R W^T), so W x = W0 (R^T x); unmerge multiplies by R^-1 the
    same way (PEFT's rule: the Neumann R is only near-orthogonal).
Trainable (OFT-8): D' b(b-1)/2 numbers per layer.
Serialization (OFT-9): peft_type "OFT"; key <layer>.oft_R.weight (D', b(b-1)/2).
PEFT parity: peft/tuners/oft/layer.py OFTRotationModule (_cayley_batch, _project_batch, forward,
    get_weight), OFTLayer.update_layer, Linear.merge / unmerge.
Targets (OFT-10): Linear layers only; GPT-2's Conv1D is a ConfigError (PEFT's OFT refuses it too).
Deviations: a block size that does not divide the width is a ConfigError (PEFT adjusts it); PEFT's
    init_weights=False (q ~ N(0, 0.1)) is not offered.
"""
from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..autograd.function import Function
from ..autograd.tensor import Tensor
from ..nn.module import Module
from .base import AdapterConfig, Delta, check, orient, trainable
from .registry import register


PEFT_VERSION = "0.21.2"  # the PEFT whose OFT this module reproduces


@dataclasses.dataclass
class OFTConfig(AdapterConfig):
    rank: int = 0  # r: the number of blocks (0: derived from oft_block_size)
    oft_block_size: int = 32  # b (0: derived from r)
    module_dropout: float = 0.0
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    fan_in_fan_out: bool = False
    bias: str = "none"  # "none" | "all" | "oft_only"

    peft_type = "OFT"
    PEFT_FIELDS = {"rank": "r", "oft_block_size": "oft_block_size", "module_dropout": "module_dropout",
                   "coft": "coft", "eps": "eps", "block_share": "block_share",
                   "use_cayley_neumann": "use_cayley_neumann",
                   "num_cayley_neumann_terms": "num_cayley_neumann_terms", "bias": "bias"}

    def validate(self):
        for field in ("rank", "oft_block_size"):
            check(getattr(self, field) >= 0, field, getattr(self, field), "must be an integer >= 0")
        check((self.rank != 0) != (self.oft_block_size != 0), "rank / oft_block_size",
              (self.rank, self.oft_block_size), "set exactly one of them (r x oft_block_size = in_features)")
        check(0.0 <= self.module_dropout < 1.0, "module_dropout", self.module_dropout, "must be in [0, 1)")
        check(self.eps > 0, "eps", self.eps, "must be > 0")
        check(self.num_cayley_neumann_terms >= 1, "num_cayley_neumann_terms", self.num_cayley_neumann_terms,
              "must be >= 1")
        check(self.bias in ("none", "all", "oft_only"), "bias", self.bias, "use 'none', 'all' or 'oft_only'")

    def to_peft(self) -> dict:
        """OFT-9: also peft_version, without which PEFT >= 0.18 warns that a Cayley-Neumann file predates its
        present series (OFT-2 is that series)."""
        return {**super().to_peft(), "peft_version": PEFT_VERSION}

    @classmethod
    def from_peft(cls, d: dict):
        """PEFT's check_kwargs: a file without oft_block_size predates PEFT 0.14's OFT and is refused."""
        check("oft_block_size" in d, "peft_type", d.get("peft_type"), "this adapter_config.json has no "
              "oft_block_size: it is an OFT adapter of PEFT < 0.14 (or not an OFT adapter), whose weights PEFT "
              "0.14+ and minipeft cannot read; retrain it")
        return super().from_peft(d)

    def block_size_for(self, n: int, path: str = "") -> int:  # OFT-1
        given = self.oft_block_size or self.rank
        field = "oft_block_size" if self.oft_block_size else "rank"
        check(given <= n and n % given == 0, f"{field} (for {path or 'a layer'})", given,
              f"must divide the layer's in_features = {n}")
        return self.oft_block_size or n // self.rank

    def trainable_count(self, layers: dict, mc) -> int:
        """OFT-8: D' b(b-1)/2 per layer, D' = in / b (1 with block_share)."""
        total = 0
        for p, (n, _) in layers.items():
            b = self.block_size_for(n, p)
            total += (1 if self.block_share else n // b) * (b * (b - 1) // 2)
        return total


class Inverse(Function):
    """inv(A) for a batch of square matrices; d A = -inv(A)^T g inv(A)^T."""

    def forward(self, a):
        self.inv = backend.xp_of(a).linalg.inv(a)
        return self.inv

    def backward(self, g):
        xp = backend.xp_of(g)
        t = xp.matrix_transpose(self.inv)
        return (-xp.matmul(xp.matmul(t, g), t),)


def skew_map(b: int):
    """S (b(b-1)/2, b*b): q @ S is U - U^T flattened, U the strict upper triangle filled row by row."""
    xp = backend.xp()
    e = b * (b - 1) // 2
    S = [[0.0] * (b * b) for _ in range(e)]
    k = 0
    for i in range(b):
        for j in range(i + 1, b):
            S[k][i * b + j], S[k][j * b + i] = 1.0, -1.0
            k += 1
    return xp.asarray(S, dtype=backend.dtype("float32"))  # (e, b*b)


def cayley(Q: Tensor, exact: bool, terms: int) -> Tensor:  # OFT-2, Q (D', b, b)
    xp = backend.xp_of(Q.data)
    I = Tensor(xp.eye(Q.shape[-1], dtype=Q.data.dtype))
    if exact:
        return (I - Q) @ Inverse.apply(I + Q)
    if terms == 1:
        return I + 0.0 * Q
    R, P = I + 2.0 * Q, Q
    if terms == 2:
        return R
    last = max(terms - 1, 3)
    for j in range(2, last):
        P = P @ Q
        R = R + 2.0 * P
    return R + P @ Q


def to_identity(R: Tensor, chosen: set) -> Tensor:
    """R (K, b, b) with the blocks whose index is in `chosen` replaced by I (OFT's module_dropout, BOFT's
    multiplicative dropout)."""
    xp = backend.xp_of(R.data)
    K, b = R.shape[0], R.shape[-1]
    mask = xp.reshape(xp.asarray([float(i in chosen) for i in range(K)], dtype=R.data.dtype), (K, 1, 1))
    return R * Tensor(1.0 - mask) + Tensor(mask * xp.eye(b, dtype=R.data.dtype))


class OFTRotation(Module):
    def __init__(self, rows: int, b: int):
        self.weight = trainable(backend.xp().zeros((rows, b * (b - 1) // 2), dtype=backend.dtype("float32")))


class OFTLinear(Delta):
    def __init__(self, n: int, b: int, cfg: OFTConfig, rng):
        self.n, self.b, self.D = n, b, n // b
        self.cfg, self.rng = cfg, rng
        self.oft_R = OFTRotation(1 if cfg.block_share else self.D, b)  # OFT-4: q = 0
        self.S = skew_map(b)

    @classmethod
    def create(cls, base, cfg: OFTConfig, path: str, rng, init_weights: bool = True):
        check(not base.fan_in_fan_out, f"target_modules (for {path})", "Conv1D",
              "PEFT's OFT adapts torch.nn.Linear only (not GPT-2's Conv1D), so the file could not be read there")
        return cls(base.in_features, cfg.block_size_for(base.in_features, path), cfg, rng)

    def project(self):  # OFT-5, in place, no gradient
        q = self.oft_R.weight.data
        xp = backend.xp_of(q)
        eps = self.cfg.eps / math.sqrt(q.shape[0])
        norm = xp.sqrt(2.0 * xp.sum(q * q, axis=1, keepdims=True))  # ||Q_i||_F
        self.oft_R.weight.data = xp.where(norm <= eps, q, eps * q / xp.where(norm == 0, 1.0, norm))

    def rotation(self) -> Tensor:  # R_i, (D', b, b)
        if self.cfg.coft:
            self.project()
        q = self.oft_R.weight
        Q = (q @ Tensor(self.S)).reshape(q.shape[0], self.b, self.b)
        R = cayley(Q, not self.cfg.use_cayley_neumann, self.cfg.num_cayley_neumann_terms)
        p = self.cfg.module_dropout
        if self.training and p > 0 and R.shape[0] > 1:  # OFT-6
            R = to_identity(R, {int(i) for i in self.rng.permutation(R.shape[0])[: int(p * R.shape[0])]})
        return R

    def adapt_input(self, x):  # OFT-3: block i of x (row) -> x_i R_i
        lead = x.shape[:-1]
        xb = x.reshape(*lead, self.D, 1, self.b) @ self.rotation()
        return xb.reshape(*lead, self.n)

    def adapt(self, x, y, base):
        return y

    def block_diagonal(self):  # R (in, in)
        R = self.rotation().data
        xp = backend.xp_of(R)
        full = xp.zeros((self.n, self.n), dtype=R.dtype)
        for i in range(self.D):
            s = slice(i * self.b, (i + 1) * self.b)
            full[s, s] = R[0 if R.shape[0] == 1 else i, :, :]
        return full

    def transform(self, base, M):
        """W <- W M^T for the (out, in) weight: PEFT's W^T <- M W^T."""
        xp = backend.xp_of(M)
        base.weight.data = orient(xp.matmul(base.weight_out_in(), xp.matrix_transpose(M)), base)

    def merge_into(self, base):  # OFT-7
        self.transform(base, self.block_diagonal())

    def unmerge_from(self, base):
        M = self.block_diagonal()
        self.transform(base, backend.xp_of(M).linalg.inv(M))


register("oft", OFTConfig, OFTLinear,
         paper="Controlling Text-to-Image Diffusion by Orthogonal Finetuning, Qiu et al. 2023, arXiv:2306.07280; "
               "Orthogonal Finetuning Made Scalable, Qiu et al. 2025, arXiv:2506.19847",
         summary="OFT (OFTv2), x -> blockdiag(Cayley(Q_i))^T x before W0, Q_i skew-symmetric (spec/oft.md).")
