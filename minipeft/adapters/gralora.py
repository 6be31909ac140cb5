"""GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning (Jung, Ahn, Kim, Kim, Park 2025,
arXiv:2505.20355),
as PEFT 0.21.2's GRALORA tuner; spec/gralora.md.

Symbols: W0 (out, in) = (m, n) frozen base weight, b its bias, x (..., n); k = gralora_k divides n and m and r;
    s = r / k the rank of each block; x_c = x[c n/k:(c+1) n/k] the c-th input slice; A (k, n/k, r), B (k, r, m/k)
    (PEFT's gralora_A, gralora_B); A_c[:, j] = A[c][:, j s:(j+1) s] (n/k, s), B_j[c] = B[j][c s:(c+1) s, :] (s, m/k).
Blocks (GRALORA-1): W0 is cut into k x k blocks W_jc (m/k, n/k) (output block j, input block c); each has its own
    rank-s LoRA: dW_jc = sc * B_j[c]^T A_c[:, j]^T, so rank(dW) <= k r (LoRA of rank r: <= r) for the same r (n + m).
Forward (GRALORA-2): h = W0 x + b + sc * y, y_j = sum_c (dropout(x)_c A_c[:, j]) B_j[c] (m/k) stacked over j
    (PEFT's einsum and (N, N, s) permute); hybrid_r = h_r > 0 adds a plain LoRA sc * B_g (A_g dropout'(x)),
    A_g (h_r, n), B_g (m, h_r) (PEFT's gralora_A_general / gralora_B_general Linear weights), dropout drawn apart.
Scaling (GRALORA-3): sc = alpha / (r + h_r), one factor for both parts.
Init (GRALORA-4): init_weights=True: each A_c (r, n/k) ~ U(-1/sqrt(n/k), 1/sqrt(n/k)), B = 0; A_g ~ U(+-1/sqrt(n)),
    B_g = 0: dW = 0. init_weights=False ("random"): B_j (m/k, r) ~ U(+-1/sqrt(r)), B_g ~ U(+-1/sqrt(h_r)) too.
Merge (GRALORA-5): W <- W0 + dW (dW^T for GPT-2's Conv1D, as PEFT's fan_in_fan_out), unmerge subtracts it.
Trainable (GRALORA-6): (r + h_r)(n + m) per layer, whatever k.
Serialization (GRALORA-7): peft_type "GRALORA", keys <layer>.gralora_A (k, n/k, r), .gralora_B (k, r, m/k) and with
    h_r > 0 .gralora_A_general.weight (h_r, n), .gralora_B_general.weight (m, h_r); fields r, hybrid_r, alpha,
    gralora_dropout, gralora_k, init_weights, bias, fan_in_fan_out.
PEFT parity: peft/tuners/gralora/layer.py GraloraLayer.update_layer, Linear.forward, get_delta_weight; config.py.
Deviations: none in the math; hybrid_r < 0, r or k <= 0, k not dividing r, n or m are ConfigErrors naming the layer.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd import functional as F
from ..nn.layers import Linear
from .base import AdapterConfig, Delta, check, fan_in_uniform, trainable
from .registry import register

INITS = ("default", "random")


@dataclasses.dataclass
class GraLoRAConfig(AdapterConfig):
    rank: int = 32  # PEFT's default r
    alpha: float = 64  # PEFT's default; sc = alpha / (r + hybrid_r) (GRALORA-3)
    gralora_k: int = 2  # k: W0 in k x k blocks, each of rank r / k
    hybrid_r: int = 0  # rank of the extra plain LoRA part (0: none)
    dropout: float = 0.0
    init: str = "default"  # one of INITS (GRALORA-4)
    fan_in_fan_out: bool = False  # accepted for PEFT's sake: each layer's own storage decides (PEFT resets it too)
    bias: str = "none"  # "none" | "all" | "gralora_only"

    peft_type = "GRALORA"
    PEFT_FIELDS = {"rank": "r", "alpha": "alpha", "gralora_k": "gralora_k", "hybrid_r": "hybrid_r",
                   "dropout": "gralora_dropout", "init": "init_weights", "bias": "bias"}
    PEFT_VALUES = {"init": {"default": True, "random": False}}
    # PEFT's GraloraConfig has no exclude_modules
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "fan_in_fan_out")

    def validate(self):
        for field in ("rank", "gralora_k"):
            check(getattr(self, field) > 0, field, getattr(self, field), "must be a positive integer")
        check(self.hybrid_r >= 0, "hybrid_r", self.hybrid_r, "must be an integer >= 0 (0: no plain LoRA part)")
        check(self.rank % self.gralora_k == 0, "rank", self.rank,
              f"must be divisible by gralora_k={self.gralora_k}: each of the k x k blocks gets rank r / k")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(self.init in INITS, "init", self.init, f"use one of {', '.join(INITS)} (PEFT: True, False)")
        check(self.bias in ("none", "all", "gralora_only"), "bias", self.bias, "use 'none', 'all' or 'gralora_only'")

    def trainable_count(self, layers: dict, mc) -> int:
        """GRALORA-6: (r + hybrid_r)(in + out) per layer."""
        return sum((self.rank + self.hybrid_r) * (n + m) for n, m in layers.values())


def general_factor(rows: int, cols: int, data):
    """The hybrid part's factor as a bias-free Linear (cols -> rows), so its key is PEFT's <name>.weight."""
    f = Linear(cols, rows, bias=False)
    f.weight = trainable(data)
    return f


class GraLoRALinear(Delta):
    def __init__(self, A, B, A_g, B_g, scaling: float, dropout: float, rng):
        self.k, self.s = A.shape[0], A.shape[2] // A.shape[0]
        self.sc, self.p, self.rng = scaling, dropout, rng
        self.gralora_A = trainable(A)  # (k, n/k, r)
        self.gralora_B = trainable(B)  # (k, r, m/k)
        if A_g is not None:  # GRALORA-2's hybrid LoRA: keys gralora_A_general.weight, gralora_B_general.weight
            self.gralora_A_general = general_factor(*A_g.shape, A_g)  # (h_r, n)
            self.gralora_B_general = general_factor(*B_g.shape, B_g)  # (m, h_r)

    @classmethod
    def create(cls, base, cfg: GraLoRAConfig, path: str, rng, init_weights: bool = True):
        n, m, k, r, h = base.in_features, base.out_features, cfg.gralora_k, cfg.rank, cfg.hybrid_r
        for side, width in (("in_features", n), ("out_features", m)):
            check(width % k == 0, f"gralora_k (for {path})", k,
                  f"must divide the layer's {side} {width} (W0 is cut into k x k blocks); pick a k dividing "
                  f"in={n} and out={m}, or leave this layer out of target_modules")
        xp = backend.xp_of(base.weight.data)
        f32 = backend.dtype("float32", xp)
        A, B = xp.zeros((k, n // k, r), dtype=f32), xp.zeros((k, r, m // k), dtype=f32)
        A_g, B_g = (xp.zeros((h, n), dtype=f32), xp.zeros((m, h), dtype=f32)) if h else (None, None)
        if init_weights:  # GRALORA-4, per block as PEFT draws them: A_c (r, n/k), B_j (m/k, r); a load fills them
            A = xp.stack([xp.matrix_transpose(fan_in_uniform(rng, (r, n // k), n // k)) for _ in range(k)])
            if cfg.init == "random":
                B = xp.stack([xp.matrix_transpose(fan_in_uniform(rng, (m // k, r), r)) for _ in range(k)])
            if h:
                A_g = fan_in_uniform(rng, (h, n), n)
                if cfg.init == "random":
                    B_g = fan_in_uniform(rng, (m, h), h)
        return cls(A, B, A_g, B_g, cfg.alpha / (r + h), cfg.dropout, rng)

    def blocks(self, x, A, B):
        """GRALORA-2's y (..., m) for x (..., n): slice c meets A[c]; the (c, j) rank-s parts are regrouped by
        output block j and meet B[j]."""
        k, s, lead = self.k, self.s, x.shape[:-1]
        t = x.reshape(*lead, k, 1, x.shape[-1] // k) @ A  # (..., k_c, 1, r): x_c A_c
        t = t.reshape(*lead, k, k, s).transpose(-3, -2)  # (..., k_j, k_c, s): x_c A_c[:, j]
        return (t.reshape(*lead, k, 1, k * s) @ B).reshape(*lead, B.shape[-1] * k)  # (..., m)

    def adapt(self, x, y, base):
        out = self.blocks(F.dropout(x, self.p, self.rng, self.training), self.gralora_A, self.gralora_B)
        if hasattr(self, "gralora_A_general"):  # PEFT draws the hybrid part's dropout apart
            h = F.dropout(x, self.p, self.rng, self.training)
            out = out + self.gralora_B_general(self.gralora_A_general(h))
        return y + out * self.sc

    def delta_weight(self):  # GRALORA-1: dW (out, in), block (j, c) = B_j[c]^T A_c[:, j]^T (out/k, in/k)
        A, B = self.gralora_A.data, self.gralora_B.data  # (k, n/k, r), (k, r, m/k)
        xp = backend.xp_of(A)
        k, s, nk, mk = self.k, self.s, A.shape[1], B.shape[2]
        At = xp.permute_dims(xp.reshape(A, (k, nk, k, s)), (2, 0, 3, 1))  # (j, c, s, n/k): A_c[:, j]^T
        Bt = xp.permute_dims(xp.reshape(B, (k, k, s, mk)), (0, 1, 3, 2))  # (j, c, m/k, s): B_j[c]^T
        dW = xp.reshape(xp.permute_dims(xp.matmul(Bt, At), (0, 2, 1, 3)), (k * mk, k * nk))  # (j, m/k, c, n/k)
        if hasattr(self, "gralora_A_general"):
            dW = dW + xp.matmul(self.gralora_B_general.weight.data, self.gralora_A_general.weight.data)
        return dW * self.sc


register("gralora", GraLoRAConfig, GraLoRALinear,
         paper="GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning, Jung et al. 2025, "
               "arXiv:2505.20355",
         summary="GraLoRA, W0 cut into k x k blocks, each with its own LoRA of rank r / k (same r (in + out) as "
                 "LoRA, rank up to k r), optional hybrid plain LoRA (spec/gralora.md).")
