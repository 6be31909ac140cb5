"""LoRA on an embedding table (spec/lora.md LORA-15..LORA-18; PEFT's lora.Embedding).

Symbols: E (V, d) the frozen table (V = num_embeddings = the layer's in_features, d = embedding_dim = its
out_features), ids (...) token ids, A (r, V), B (d, r), s the scaling of LORA-2.
Forward (LORA-15): y = E[ids] + s (A^T)[ids] B^T   ((...) -> (..., d)): row ids of A^T, then through B.
    lora_dropout is not applied (PEFT builds the dropout for an embedding but its forward never calls it:
    a dropout of token ids has no meaning), so the output is the same in train and eval mode.
Delta weight / merge (LORA-16): dE = s (B A)^T = s A^T B^T (V, d); merge E <- E + dE, unmerge E - dE.
    A tied output head (GPT-2's lm_head shares wte's table) then reads the merged table too, as in PEFT,
    whose merge writes the shared tensor in place.
Init (LORA-17): A = 0, B ~ N(0, 1) for "default" and "gaussian" (PEFT's reset_lora_parameters for
    embeddings, after loralib), so y = E[ids] at step 0 and the gradient reaches A first.
Keys (LORA-18): `lora_embedding_A` (r, V) and `lora_embedding_B` (d, r), bare parameters (no ".weight").
Refused (ConfigError naming the field): lora_bias (PEFT refuses it on embeddings), an init that rewrites W0
    (PiSSA, OLoRA: PEFT's Embedding does not run them), and trainable_token_indices on the same embedding
    (both would own its rows). Only LoRAConfig itself matches embeddings (AdapterConfig.adapts_embeddings):
    for LoRA's variants and initialisers an embedding in target_modules matches nothing, as before.
"""
from __future__ import annotations

from .. import backend
from ..autograd.ops import embedding
from ..nn.layers import Embedding
from .base import Delta, check, trainable


class LoRAEmbedding(Delta):
    MIXED_BATCH = True  # PEFT's lora.Embedding._mixed_batch_forward: rows of one adapter get its delta alone

    def __init__(self, num_embeddings, embedding_dim, r, s):
        self.s = s
        xp, f32 = backend.xp(), backend.dtype("float32")
        self.lora_embedding_A = trainable(xp.zeros((r, num_embeddings), dtype=f32))  # (r, V)
        self.lora_embedding_B = trainable(xp.zeros((embedding_dim, r), dtype=f32))  # (d, r)

    @classmethod
    def create(cls, base: Embedding, cfg, path: str, rng, init_weights: bool, r: int, s: float):
        check(not cfg.lora_bias, f"lora_bias (for {path})", cfg.lora_bias,
              "is not supported on an embedding (PEFT refuses it too); drop the embedding from target_modules")
        check(cfg.init in ("default", "gaussian"), f"init (for {path})", cfg.init,
              "is not run on an embedding (PEFT's lora.Embedding does not run it either); an embedding takes "
              "init 'default' or 'gaussian' (both A = 0, B ~ N(0, 1)): drop it from target_modules or change init")
        delta = cls(base.in_features, base.out_features, r, s)
        if init_weights:  # LORA-17
            delta.lora_embedding_B.data = rng.normal((base.out_features, r))
        return delta

    def adapt(self, ids, y, base):  # LORA-15
        after_A = embedding(self.lora_embedding_A.transpose(0, 1), ids)  # (..., r)
        return y + (after_A @ self.lora_embedding_B.transpose(0, 1)) * self.s  # (..., d)

    def delta_weight(self):  # LORA-16: s A^T B^T, (V, d): the table's own layout (Delta's merge adds it)
        xp = backend.xp_of(self.lora_embedding_A.data)
        return xp.matmul(xp.matrix_transpose(self.lora_embedding_A.data),
                         xp.matrix_transpose(self.lora_embedding_B.data)) * self.s
