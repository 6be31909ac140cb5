"""LoRA-GA: Low-Rank Adaptation with Gradient Approximation (Wang, Yu, Li 2024, arXiv:2407.05000);
PEFT's init_lora_weights="lora_ga" with lora_ga_config=LoraGAConfig(...) and preprocess_loraga(model, config,
train_step) (peft/tuners/lora/loraga.py, LoraLayer.lora_ga_init).

LoRA (lora.py) whose A and B come from the SVD of each layer's full-weight gradient on data (data_init.py,
METHOD-11), taken out of W0 so that the model is unchanged at step 0.
Gradient (LORA_GA-1): G = (1/N) sum_n dL_n/dW0 (out, in), L_n the causal LM loss (token mean) of batch n, labels the
    batch's or input_ids at attention_mask = 1 (-100 elsewhere); only the targeted W0 take a gradient.
Decomposition (LORA_GA-2): G = U S V^T (thin SVD, S descending, float64), each pair's sign fixed as PSOFT-1
    (the largest-|.| entry of U's column positive); keep the first 2r triplets (2r <= min(in, out)).
Directions (LORA_GA-3): index sets a, b of size r in 0..2r-1: ArB2r (default) a = 0..r-1, b = r..2r-1;
    A2rBr a = r..2r-1, b = 0..r-1; ArBr a = 1, 3, .., b = 0, 2, ..; random a = b = the first r of a permutation.
    A = V_a^T (r, in), B = U_b diag(S_b) (out, r).
Scale (LORA_GA-4): stable (default) B *= d^(1/4) / sqrt(stable_gamma) (the paper's stable scale, d = out; PEFT's
    weight.shape[0], so in for GPT-2's Conv1D, which minipeft follows);
    weight_svd B *= sigma_1(W0) / S_b[0] (when S_b[0] > 0); gd_scale A /= s, B /= s; unit: none.
Residual (LORA_GA-5): W0 <- W0 - s B A (A, B first cast to W0's dtype), so W0 + s B A is W0 at step 0.
Save (LORA_GA-6): PEFT's conversion (save_pretrained(path_initial_model_for_weight_conversion=...)): a plain LoRA
    of rank 2r for the unmodified W0, A' = [A; A0] (2r, in), B' = [B, -B0] (out, 2r), r' = 2r, alpha' = 2 alpha
    (sqrt(2) alpha with rslora), rank_pattern and alpha_pattern doubled, init_lora_weights = true; so
    W0 + s' B' A' = (W0 - s B0 A0) + s B A. It loads (here and in PEFT) as a LoRAConfig.
PEFT parity: peft/tuners/lora/loraga.py estimate_gradients; layer.py lora_ga_init; model.py subtract_mutated_init.
Deviations: PEFT takes torch.svd_lowrank(G, q = min(4r, min(in, out)), niter = 4), exact only where
    4r >= min(in, out), with signs set by its random basis; minipeft the exact SVD, signs fixed. weight_svd's
    sigma_1(W0) is exact here (PEFT: svd_lowrank(W0, q = r)). PEFT estimates in train mode (dropout on),
    minipeft in eval mode (METHOD-11); they agree without dropout. random draws from the model's rng.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import backend
from .base import check, orient
from .data_init import ConvertedInitConfig, ConvertedLoRALinear, sub_config, token_mask
from .lora import LoRAConfig
from .psoft import fixed_signs
from .registry import register

LORAGA_DEFAULTS = {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}  # PEFT's LoraGAConfig
DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "weight_svd", "gd_scale", "unit")


@dataclasses.dataclass
class LoRAGAConfig(ConvertedInitConfig):
    """LoRAConfig's fields, init "lora_ga", and PEFT's lora_ga_config (missing keys take LORAGA_DEFAULTS)."""

    init: str = "lora_ga"
    lora_ga_config: dict = dataclasses.field(default_factory=dict)

    PEFT_FLAGS = {"init_lora_weights": "lora_ga"}
    PEFT_FIELDS = {**LoRAConfig.PEFT_FIELDS, "lora_ga_config": "lora_ga_config"}
    RANK_RULE = "min(in, out) // 2"

    def validate(self):
        super().validate()
        self.lora_ga_config = c = sub_config(self.lora_ga_config, LORAGA_DEFAULTS, "lora_ga_config", "LoraGAConfig")
        check(c["direction"] in DIRECTIONS, "lora_ga_config['direction']", c["direction"],
              f"must be one of {', '.join(DIRECTIONS)}")
        check(c["scale"] in SCALES, "lora_ga_config['scale']", c["scale"], f"must be one of {', '.join(SCALES)}")
        check(isinstance(c["stable_gamma"], (int, float)) and c["stable_gamma"] > 0,
              "lora_ga_config['stable_gamma']", c["stable_gamma"], "must be > 0")

    def max_rank(self, n: int, m: int) -> int:
        return min(n, m) // 2  # LORA_GA-2: A and B take 2r singular triplets of G

    def from_data(self, model, bases: dict, batches: list):
        """LORA_GA-1: {path: G (out, in) float64}; every rank and layer type is checked before any gradient."""
        from ..train import _loss
        self.check_targets(bases, "LoRA-GA needs W0's full-precision gradient")
        params = list(model.net.parameters())
        was = [p.requires_grad for p in params]
        model.net.requires_grad_(False)
        for b in bases.values():
            b.weight.requires_grad, b.weight.grad = True, None
        try:
            for batch in batches:
                labels = batch.get("labels")
                if labels is None:
                    labels = batch["input_ids"].copy()
                    labels[~token_mask(batch)] = -100
                _loss(model, batch["input_ids"], batch["attention_mask"], labels).backward()
            xp = backend.xp_of(next(iter(bases.values())).weight.data)
            G = {p: xp.astype(orient(b.weight.grad, b), xp.float64) / len(batches) for p, b in bases.items()}
        finally:
            for p, flag in zip(params, was):
                p.requires_grad, p.grad = flag, None
        return self, G

    def _initialise_path(self, G, delta, base, rng):
        self.initialise_from(delta, base, G, rng)

    def initialise_from(self, delta, base, G, rng=None):  # LORA_GA-2..LORA_GA-5
        xp, c = backend.xp_of(G), self.lora_ga_config
        r = delta.lora_A.weight.shape[0]
        U, S, Vh = xp.linalg.svd(G, full_matrices=False)  # (out, k), (k,), (k, in)
        U, Vh, S = *fixed_signs(U[:, :2 * r], Vh[:2 * r, :]), S[:2 * r]  # (out, 2r), (2r, in), (2r,)
        a, b = (xp.asarray(i) for i in direction_indices(c["direction"], r, rng))
        S_b = xp.take(S, b, axis=0)  # (r,)
        A, B = xp.take(Vh, a, axis=0), xp.take(U, b, axis=1) * S_b[None, :]  # (r, in), (out, r)
        if c["scale"] == "stable":
            B = B * (base.weight.data.shape[0] ** 0.25 / math.sqrt(c["stable_gamma"]))  # PEFT's weight.shape[0]
        elif c["scale"] == "weight_svd" and float(S_b[0]) > 0:
            W0 = xp.astype(base.weight_out_in(), xp.float64)
            B = B * (xp.linalg.svd(W0, full_matrices=False)[1][0] / S_b[0])  # sigma_1(W0)
        elif c["scale"] == "gd_scale":
            A, B = A / delta.s, B / delta.s
        delta.start(A, B, base)  # LORA_GA-5: A0, B0 kept; W0 <- W0 - s B A


def direction_indices(direction: str, r: int, rng):
    """LORA_GA-3: (a, b), the triplets of A's rows and of B's columns among the first 2r."""
    if direction == "random":
        a = np.asarray(rng.permutation(2 * r))[:r]
        return a, a
    return {"ArB2r": (np.arange(r), np.arange(r, 2 * r)), "A2rBr": (np.arange(r, 2 * r), np.arange(r)),
            "ArBr": (np.arange(1, 2 * r, 2), np.arange(0, 2 * r, 2))}[direction]


register("lora_ga", LoRAGAConfig, ConvertedLoRALinear, kind="initialiser",
         paper="LoRA-GA: Low-Rank Adaptation with Gradient Approximation, Wang, Yu, Li 2024, arXiv:2407.05000",
         summary="LoRA-GA, LoRA with A, B from the SVD of each layer's weight gradient on data, taken out of W0 "
                 "(stable scale); apply with data=, saved as PEFT's rank-2r conversion (spec/lora_ga.md).")
