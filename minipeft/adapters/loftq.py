"""LoftQ: LoRA-Fine-Tuning-aware Quantization for Large Language Models (Li, Yu, Liang, He, Karampatziakis,
Chen, Zhao 2023, arXiv:2310.08659); PEFT's init_lora_weights="loftq".

LoRA (lora.py, spec/lora.md) whose W0 becomes an NF4-representable Q and whose B A approximates what Q loses.
Symbols: W (out, in) the float base weight, r the rank, T = loftq_iter, q(M) = dequant(NF4(M)) blockwise over the
    row-major W with block 64 and no double quantization (quant/nf4.py, byte-equal to bitsandbytes),
    svd_r(M) = (U_r sqrt(S_r), sqrt(S_r) V_r^T) the rank-r truncated SVD split evenly, A (r, in), B (out, r).
Init (LOFTQ-1): R_0 = W; for t = 1..T: Q_t = q(R_{t-1}), (B_t, A_t) = svd_r(W - Q_t), R_t = W - B_t A_t;
    W0 <- Q_T, A = A_T, B = B_T. Deterministic: no random draw; loading recomputes Q_T, as PEFT does.
Quantized base (LOFTQ-2): q(Q_T) = Q_T bit for bit, so quantizing the adapted model's base to NF4 loses nothing.
Approximation (LOFTQ-3): B A is the best rank-r approximation of W - Q_T; |W - Q_T - B A|_F <= |W - Q_T|_F.
Scaling (LOFTQ-4): A and B are not divided by s: h = Q_T x + b + s B A x at step 0, LoftQ's W x only for
    s = 1 (the defaults rank 8, alpha 8).
Refused (LOFTQ-5): loftq_bits other than 4, loftq_iter < 1, a 4-bit or a GPT-2 Conv1D base.
Forward, merge, gradients: LoRA's (LORA-3..LORA-5) over W0 = Q_T.
PEFT parity: peft/utils/loftq_utils.py loftq_init, peft/tuners/lora/layer.py LoraLayer.loftq_init.
Deviations: PEFT also has 8-bit (bitsandbytes int8) LoftQ; minipeft refuses loftq_bits=8.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..quant.nf4 import nf4_dequantize, nf4_quantize
from .base import check
from .lora import LoRAConfig, LoRAInitConfig
from .registry import register

LOFTQ_KEYS = ("loftq_bits", "loftq_iter")  # PEFT's LoftQConfig fields


@dataclasses.dataclass
class LoftQConfig(LoRAInitConfig):
    """LoRAConfig's fields (alpha 8: s = 1 at rank 8, LOFTQ-4), init "loftq", and PEFT's loftq_config."""

    alpha: float = 8
    init: str = "loftq"
    loftq_config: dict = dataclasses.field(default_factory=lambda: {"loftq_bits": 4, "loftq_iter": 1})

    PEFT_FLAGS = {"init_lora_weights": "loftq"}
    PEFT_FIELDS = {**LoRAConfig.PEFT_FIELDS, "loftq_config": "loftq_config"}
    REWRITES_W0 = True
    STEP0_RTOL = 0.25  # METHOD-5: Q_T + B A is not W (LOFTQ-3); 0.154 measured on test_every_method's tiny llama

    def validate(self):  # LOFTQ-5
        super().validate()
        c = self.loftq_config
        check(isinstance(c, dict) and sorted(c) == sorted(LOFTQ_KEYS), "loftq_config", c,
              f"must be a dict with exactly the keys {', '.join(LOFTQ_KEYS)} (PEFT's LoftQConfig)")
        check(c["loftq_bits"] == 4, "loftq_config['loftq_bits']", c["loftq_bits"],
              "must be 4 (NF4); PEFT's 8-bit LoftQ (bitsandbytes int8) is not implemented in minipeft")
        check(isinstance(c["loftq_iter"], int) and not isinstance(c["loftq_iter"], bool) and c["loftq_iter"] >= 1,
              "loftq_config['loftq_iter']", c["loftq_iter"], "must be an integer >= 1")

    def initialise(self, delta, base, rng):  # LOFTQ-1
        check(not base.fan_in_fan_out, "init", self.init, "is not supported on GPT-2's Conv1D layers (PEFT 0.21 "
              "decomposes the stored (in, out) weight there, which gives lora_A the wrong shape); target Linear layers")
        xp = backend.xp_of(base.weight.data)
        r = delta.lora_A.weight.shape[0]
        W = xp.astype(base.weight.data, xp.float32)  # (out, in)
        R = W
        for _ in range(self.loftq_config["loftq_iter"]):
            Q = nf4_dequantize(nf4_quantize(R, block_size=64, double_quantization=False))  # (out, in)
            U, S, Vh = xp.linalg.svd(W - Q, full_matrices=False)  # (out, k), (k,), (k, in)
            root = xp.sqrt(S[:r])  # (r,)
            B, A = U[:, :r] * root[None, :], root[:, None] * Vh[:r, :]  # (out, r), (r, in)
            R = W - xp.matmul(B, A)
        delta.lora_A.weight.data, delta.lora_B.weight.data = A, B
        base.weight.data = xp.astype(Q, base.weight.data.dtype)  # W0 <- Q_T


register("loftq", LoftQConfig, kind="initialiser",
         paper="LoftQ: LoRA-Fine-Tuning-aware Quantization for Large Language Models, Li, Yu, Liang, He, "
               "Karampatziakis, Chen, Zhao 2023, arXiv:2310.08659",
         summary="LoftQ, LoRA whose W0 becomes its NF4 quantization Q and whose B A starts at the best rank-r "
                 "fit of W - Q, alternating (spec/loftq.md).")
