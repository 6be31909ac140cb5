"""QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models (Xu, Xie, Gu, Chen, Chang, Zhang,
Chen, Zhang, Tian 2024, ICLR, arXiv:2309.14717), spec/qalora.md.

Symbols: W0 (out, in) the float base weight, b its bias, N = bits, L = group_size (divides in), G = in / L;
    W~ = alpha q + beta its group-wise INT-N quantization (quant/intgroup.py, QALORA-1): codes q (out, in),
    scale alpha and zero beta (out, G); pool(x) (..., G) the mean of x over each group of L inputs;
    A (r, G), B (out, r), s = alpha_lora / r.
Base (QALORA-2): W0 <- W~ when the adapter is applied (and when one is loaded: W~ is a function of W0);
    the layer keeps q, alpha, beta as `group_quant`, which a second QA-LoRA adapter on it shares.
Forward (QALORA-3): h = W~ x + b + s B A dropout(pool(x)).
Init (QALORA-3): A ~ U(-sqrt(6 / (G + r)), +) (the authors' xavier_uniform), B = 0: h = W~ x + b at step 0.
Delta (QALORA-4): dW = (s / L) (B A) ⊗ 1_L: constant over each group's L inputs; rank(dW) <= min(r, G, out).
Merge (QALORA-5): beta <- beta + s B A / L, W <- alpha q + beta: the same codes and scales, so the merged
    model is still the INT-N model; unmerge restores beta and W~ bit for bit.
Trainable (QALORA-6): A and B, r (in / L + out) per layer.
Files (QALORA-7): peft_type "MINIPEFT_QALORA", keys lora_A.weight (r, G), lora_B.weight (out, r).
PEFT parity: none. PEFT 0.21's use_qalora is LoRA on GPTQ layers only (auto-gptq / gptqmodel) with no merge,
    and it multiplies the mean by G (pooled_features); the authors' code (yuhuixu1993/qa-lora, peft_utils.py
    and merge.py) takes the plain mean (AvgPool1d) and subtracts s B A / L / alpha from GPTQ's zeros, as here.
Deviations: W~ is round-to-nearest min-max, not GPTQ; the zero is a float (the paper's beta), not an integer.
"""
from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..autograd import functional as F
from ..errors import ConfigError
from ..nn.layers import Linear
from ..quant.intgroup import BITS, group_dequantize, group_quantize
from .base import COMMON_FIELDS, AdapterConfig, Delta, check, orient
from .lora import lora_scaling
from .registry import register


@dataclasses.dataclass
class QALoRAConfig(AdapterConfig):
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    bits: int = 4  # N of INT-N
    group_size: int = 32  # L, the authors' default

    peft_type = "MINIPEFT_QALORA"
    PEFT_FIELDS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "bits": "bits",
                   "group_size": "qalora_group_size"}
    PEFT_COMMON = COMMON_FIELDS
    STEP0_RTOL = 0.3  # METHOD-5: at init the model is the INT-N model W~ (QALORA-2): 0.21 on test_every_method's llama

    def validate(self):  # QALORA-6
        check(self.rank > 0, "rank", self.rank, "must be a positive integer")
        check(self.alpha > 0, "alpha", self.alpha, "must be > 0")
        check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "must be in [0, 1)")
        check(self.bits in BITS, "bits", self.bits, f"use one of {', '.join(map(str, BITS))}")
        check(self.group_size > 0, "group_size", self.group_size, "must be a positive integer dividing in_features")

    def trainable_count(self, layers: dict, mc) -> int:
        """QALORA-6: r (in / L + out) per layer."""
        return sum(self.rank * (n // self.group_size + m) for n, m in layers.values())


class QALoRALinear(Delta):
    MIXED_BATCH = True  # y_rows + s B A pool(x_rows) (METHOD-6)
    REWRITES_BASE = True  # create_all puts W~ in each base layer and shares nothing (the audit builds it per layer)

    def __init__(self, quant, out_features, r, s, dropout, rng):
        groups = quant.scale.shape[1]
        self.quant = quant  # codes, alpha, beta of W0: no Tensor, so neither trained nor saved
        self.zero = quant.zero  # beta in use: beta + s B A / L while merged (QALORA-5)
        self.s, self.L, self.p, self.rng = s, quant.group_size, dropout, rng
        self.lora_A = Linear(groups, r, bias=False)  # (r, G)
        self.lora_B = Linear(r, out_features, bias=False)  # (out, r), 0 at init

    @classmethod
    def create(cls, base, cfg: QALoRAConfig, path: str, rng, init_weights: bool = True):
        n, m = base.in_features, base.out_features
        check(isinstance(base, Linear), f"target (for {path})", type(base).__name__,
              "QA-LoRA quantizes a float layer itself; load the model without quantization=")
        check(n % cfg.group_size == 0, f"group_size (for {path})", cfg.group_size, f"must divide in_features={n}")
        quant = getattr(base, "group_quant", None)  # an earlier QA-LoRA adapter's: the layer is W~ already
        if quant is None:
            quant = group_quantize(base.weight_out_in(), cfg.bits, cfg.group_size)
        check((quant.bits, quant.group_size) == (cfg.bits, cfg.group_size), f"bits, group_size (for {path})",
              (cfg.bits, cfg.group_size), f"differ from ({quant.bits}, {quant.group_size}), which an earlier QA-LoRA "
              f"adapter quantized this layer with; use those, or a fresh model")
        delta = cls(quant, m, cfg.rank, lora_scaling(cfg.alpha, cfg.rank, False), cfg.dropout, rng)
        if init_weights:  # QALORA-3: the authors' xavier_uniform A; a load fills A and B from the file
            G = n // cfg.group_size
            bound = math.sqrt(6.0 / (G + cfg.rank))
            delta.lora_A.weight.data = rng.uniform((cfg.rank, G), -bound, bound)
        return delta

    @classmethod
    def create_all(cls, bases: dict, cfg, rng, init_weights: bool = True):
        """Every layer checked first, then W0 <- W~ on each (QALORA-2): a refused layer leaves the model as it was."""
        deltas, shared = super().create_all(bases, cfg, rng, init_weights)
        for path, delta in deltas.items():
            if getattr(bases[path], "group_quant", None) is None:  # (a later QA-LoRA adapter shares it)
                bases[path].weight.data, bases[path].group_quant = delta.weight_for(bases[path], delta.zero), delta.quant
        return deltas, shared

    def weight_for(self, base, zero):
        """alpha q + zero in base's storage layout and dtype."""
        W = group_dequantize(self.quant, zero)  # (out, in)
        return backend.xp_of(W).astype(orient(W, base), base.weight.data.dtype)

    def pooled(self, x):
        """pool(x): the mean of each group of L inputs, (..., G)."""
        return x.reshape(*x.shape[:-1], x.shape[-1] // self.L, self.L).mean(axis=-1)

    def adapt(self, x, y, base):  # QALORA-3
        h = F.dropout(self.pooled(x), self.p, self.rng, self.training)
        return y + self.lora_B(self.lora_A(h)) * self.s

    def zero_shift(self):
        """s B A / L (out, G): what the merge adds to each group's zero (QALORA-5)."""
        xp = backend.xp_of(self.lora_A.weight.data)
        return xp.matmul(self.lora_B.weight.data, self.lora_A.weight.data) * (self.s / self.L)

    def delta_weight(self):  # QALORA-4: (s / L) (B A) ⊗ 1_L, (out, in)
        xp = backend.xp_of(self.lora_A.weight.data)
        shift = self.zero_shift()  # (out, G)
        out, G = shift.shape
        return xp.reshape(xp.broadcast_to(shift[..., None], (out, G, self.L)), (out, G * self.L))

    def _check_alone(self, base, doing: str):
        if not bool(backend.xp_of(base.weight.data).all(base.weight.data == self.weight_for(base, self.zero))):
            raise ConfigError(f"QA-LoRA {doing}s by rewriting the layer's zeros, but the layer's weight holds another "
                              f"merged adapter; unmerge the others first (merge QA-LoRA alone)")

    def merge_into(self, base):  # QALORA-5: beta <- beta + s B A / L
        self._check_alone(base, "merge")
        self.zero = self.quant.zero + self.zero_shift()
        base.weight.data = self.weight_for(base, self.zero)

    def unmerge_from(self, base):  # QALORA-5: W~ again, bit for bit
        self._check_alone(base, "unmerge")
        self.zero = self.quant.zero
        base.weight.data = self.weight_for(base, self.zero)


register("qalora", QALoRAConfig, QALoRALinear, in_peft=False,
         paper="QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models, Xu, Xie, Gu, Chen, Chang, "
               "Zhang, Chen, Zhang, Tian 2024, arXiv:2309.14717",
         summary="QA-LoRA, W0 quantized to INT-N in groups of L inputs (a scale and a zero each) and LoRA on the "
                 "group means of x, A (r, in / L), so that the merge folds into the zeros (spec/qalora.md).")
