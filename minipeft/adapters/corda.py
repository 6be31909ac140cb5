"""CorDA: Context-Oriented Decomposition Adaptation (Yang, Li, Zhou, Song, Wu, Nie, Ghanem 2024, "CorDA:
Context-Oriented Decomposition Adaptation of Large Language Models for Task-Aware Parameter-Efficient
Fine-tuning", arXiv:2406.05223); PEFT's init_lora_weights="corda" with preprocess_corda(model, config, run_model).

LoRA (lora.py) whose B A is the part of W0 that a covariance-weighted SVD picks, taken out of W0 (data_init.py).
Covariance (CORDA-1). Symbols: W0 (out, in), x_j (T_j, in) layer l's input on example j (its counted tokens), J examples,
    C = (1/J) sum_j x_j^T x_j / max(x_j)^2 (in, in) (max(x_j) the largest entry, not the largest |entry|),
    C' = C + d mean(diag C) I with d = 0.01 doubled until ||C' C'^-1 - I||_F < 0.05, r, s = alpha / r.
Decomposition (CORDA-2): W0 C' = U S Vh (thin SVD, S descending), V = (Vh C'^-1)^T (in, k), so W0 = U S V^T.
Init (CORDA-3): ipm takes the first r triplets, kpm the last r; A = diag(sqrt(S_r / s)) V_r^T (r, in),
    B = U_r diag(sqrt(S_r / s)) (out, r), W0 <- W0 - s B A, so W0 + s B A is W0 at step 0.
Save (CORDA-5): PEFT's conversion (save_pretrained(path_initial_model_for_weight_conversion=...)), as LoRA-GA's
    (LORA_GA-6, data_init.ConvertedInitConfig): a plain LoRA of rank 2r for the unmodified W0, A' = [A; A0],
    B' = [B, -B0], r' = 2r, alpha' = 2 alpha (sqrt(2) alpha with rslora), patterns doubled, init_lora_weights true.
PEFT parity: peft/tuners/lora/corda.py calib_cov_distribution, collect_eigens_for_layer, crop_corda_eigens;
    peft/tuners/lora/layer.py LoraLayer.corda_init.
Deviations: float64 throughout (PEFT: float32 covariance and SVD).
"""
from __future__ import annotations

import dataclasses

from .. import backend
from .base import check
from .data_init import ConvertedInitConfig, ConvertedLoRALinear, forward, layer_rows, recording, sub_config, token_mask
from .lora import LoRAConfig
from .registry import register

CORDA_DEFAULTS = {"cache_file": None, "covariance_file": None, "corda_method": "ipm", "verbose": False,
                  "use_float16_for_covariance": False, "prune_temporary_fields": True}  # PEFT's CordaConfig


@dataclasses.dataclass
class CorDAConfig(ConvertedInitConfig):
    """LoRAConfig's fields, init "corda", and PEFT's corda_config (missing keys take CORDA_DEFAULTS)."""

    init: str = "corda"
    corda_config: dict = dataclasses.field(default_factory=dict)

    PEFT_FLAGS = {"init_lora_weights": "corda"}
    PEFT_FIELDS = {**LoRAConfig.PEFT_FIELDS, "corda_config": "corda_config"}

    def validate(self):
        super().validate()
        self.corda_config = c = sub_config(self.corda_config, CORDA_DEFAULTS, "corda_config", "CordaConfig")
        check(c["corda_method"] in ("ipm", "kpm"), "corda_config['corda_method']", c["corda_method"],
              "must be 'ipm' (instruction-previewed) or 'kpm' (knowledge-preserved)")
        check(c["cache_file"] is None and c["covariance_file"] is None, "corda_config", c,
              "cache_file and covariance_file are not supported; leave them None")

    def from_data(self, model, bases: dict, batches: list):
        """CORDA-1: {path: C (in, in) float64}, each example of each batch one sample; ranks and layer types
        are checked first."""
        self.check_targets(bases, "CorDA rewrites W0, which a 4-bit layer cannot hold")
        paths, C, J = list(bases), {}, 0
        for batch in batches:
            mask = token_mask(batch)
            with recording(model.net, paths) as seen:
                forward(model, batch)
            for j in range(mask.shape[0]):
                for p in paths:
                    x = layer_rows(seen[p][0][j:j + 1, ...], mask[j:j + 1])  # (T_j, in)
                    x = x / backend.xp_of(x).abs(backend.xp_of(x).max(x))
                    C[p] = C.get(p, 0) + x.T @ x  # (in, in)
            J += mask.shape[0]
        return self, {p: C[p] / J for p in paths}

    def initialise_from(self, delta, base, C):  # CORDA-2, CORDA-3
        xp = backend.xp_of(C)
        W0 = xp.astype(base.weight_out_in(), C.dtype)  # (out, in)
        eye, d = xp.eye(C.shape[0], dtype=C.dtype), 0.01
        while True:
            Cd = C + eye * (xp.mean(xp.linalg.diagonal(C)) * d)  # (in, in)
            Cinv = xp.linalg.inv(Cd)
            if float(xp.linalg.matrix_norm(Cd @ Cinv - eye)) < 0.05:
                break
            d *= 2
        U, S, Vh = xp.linalg.svd(W0 @ Cd, full_matrices=False)  # (out, k), (k,), (k, in)
        Vt = Vh @ Cinv  # V^T, (k, in)
        r = delta.lora_A.weight.shape[0]
        take = slice(0, r) if self.corda_config["corda_method"] == "ipm" else slice(S.shape[0] - r, S.shape[0])
        root = xp.sqrt(S[take] / delta.s)  # (r,)
        delta.start(root[:, None] * Vt[take, :], U[:, take] * root[None, :], base)  # A (r, in), B (out, r); W0 -= s B A


register("corda", CorDAConfig, ConvertedLoRALinear, kind="initialiser",
         paper="CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for Task-Aware "
               "Parameter-Efficient Fine-tuning, Yang, Li, Zhou, Song, Wu, Nie, Ghanem 2024, arXiv:2406.05223",
         summary="CorDA, LoRA whose B A is the part of W0 that an SVD of W0 times its layer's input covariance on "
                 "data picks (ipm: the first r, kpm: the last r), taken out of W0; apply with data=, saved as "
                 "PEFT's rank-2r conversion (spec/corda.md).")
