"""Prefix tuning: trainable keys and values before every layer's own (Li & Liang 2021, arXiv:2101.00190).

Symbols: T = num_virtual_tokens, L layers, Hkv key/value heads of size D, d_kv = Hkv D (PEFT's
    token_dim for prefixes), h = projection_dim; ids (B, n).
Table (PREFIX-1): without projection the trainable table is the prefix itself, Z (T, 2 L d_kv) ~ N(0, 1);
    with prefix_projection E (T, d_kv) ~ N(0, 1) and Z = tanh(E W1^T + b1) W2^T + b2, W1 (h, d_kv),
    W2 (2 L d_kv, h), torch.nn.Linear's init U(±1/sqrt(fan_in)) (PEFT's transform.0, transform.2).
Layout (PREFIX-2): Z reshaped (T, 2L, Hkv, D); layer i reads K_i = Z[:, 2i], V_i = Z[:, 2i + 1] as
    (Hkv, T, D), the same for every row of the batch; no rotary embedding is applied to them.
Forward (PREFIX-3): attention of layer i over [K_i; k(x)], [V_i; v(x)]; every query reads all T prefix
    slots (mask [1_T; m]); real tokens sit at positions T .. T + n - 1 (as transformers numbers them
    after a T-long past); logits (B, n, V) for the real tokens only.
Generate (PREFIX-4): every step reads the prefix before the cache; positions continue from T + n.
Trainable (PREFIX-5): Z, or E, W1, b1, W2, b2 with projection; every base weight is frozen.
Serialization (PREFIX-6): peft_type "PREFIX_TUNING", prompt_embeddings = Z (T, 2 L d_kv); with
    projection also prompt_encoder.embedding.weight, prompt_encoder.transform.{0,2}.{weight,bias}.
PEFT parity: peft/tuners/prefix_tuning/model.py PrefixEncoder; peft/peft_model.py get_prompt (view
    (B, T, 2L, Hkv, D), permute, split into per-layer pairs) and PeftModelForCausalLM.forward.
Deviations: PEFT drops the projection when it saves; minipeft keeps it too (PREFIX-6). Mistral's
    sliding window never hides the prefix here (transformers counts the prefix inside the window).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend
from .base import check
from .prompt_learning import PromptLearningConfig, Seq, VirtualTokens, batch_of, check_positions, tanh, torch_linear
from .registry import register


@dataclasses.dataclass
class PrefixTuningConfig(PromptLearningConfig):
    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # learn Z through the MLP tanh(E W1^T + b1) W2^T + b2
    projection_dim: int = 256  # h, PEFT's encoder_hidden_size

    peft_type = "PREFIX_TUNING"
    PEFT_FIELDS = {"prefix_projection": "prefix_projection", "projection_dim": "encoder_hidden_size"}

    def validate(self):
        super().validate()
        check(isinstance(self.prefix_projection, bool), "prefix_projection", self.prefix_projection, "must be a bool")
        h = self.projection_dim
        check(isinstance(h, int) and not isinstance(h, bool) and h > 0, "projection_dim", h, "must be an int > 0")

    def model_dims(self, mc) -> dict:
        """PEFT's GQA rule: a prefix is d_kv = Hkv D wide, in Hkv heads."""
        return {"token_dim": mc.num_key_value_heads * mc.head_dim, "num_attention_heads": mc.num_key_value_heads}

    def trainable_count(self, layers: dict, mc) -> int:
        """PREFIX-5: Z (T, 2 L d_kv); with the projection E (T, d_kv), W1 (h, d_kv), b1, W2 (2 L d_kv, h), b2."""
        T, d_kv, width, h = self.num_virtual_tokens, self.token_dim, 2 * self.num_layers * self.token_dim, \
            self.projection_dim
        return T * d_kv + h * d_kv + h + width * h + width if self.prefix_projection else T * width


class PrefixEncoder(VirtualTokens):
    ENCODER = ("transform",)

    @classmethod
    def create(cls, model, cfg, rng, init_weights=True):
        T, d_kv, L = cfg.num_virtual_tokens, cfg.token_dim, cfg.num_layers
        width = d_kv if cfg.prefix_projection else 2 * L * d_kv
        a = cls(cfg, backend.to_host(rng.normal((T, width))) if init_weights else np.zeros((T, width)))
        if cfg.prefix_projection:
            a.transform = Seq([torch_linear(d_kv, cfg.projection_dim, rng),
                               torch_linear(cfg.projection_dim, 2 * L * d_kv, rng)], tanh)
        return a

    def encode(self, e):
        return self.transform(e)  # (T, 2 L d_kv)

    def prefix_kv(self, B: int) -> list:
        """[(K_i, V_i)] per layer, each (B, Hkv, T, D) (PREFIX-2)."""
        cfg = self.cfg
        T, L, Hkv = cfg.num_virtual_tokens, cfg.num_layers, cfg.num_attention_heads
        z = self.output().reshape(T, 2 * L, Hkv, cfg.token_dim // Hkv).permute(1, 2, 0, 3)  # (2L, Hkv, T, D)
        return [(batch_of(z[2 * i], B), batch_of(z[2 * i + 1], B)) for i in range(L)]

    def prepare(self, net, input_ids, attention_mask, position_ids, cache, inputs_embeds, prefix_kv):
        first = input_ids if inputs_embeds is None else inputs_embeds.data
        B, n = first.shape[0], first.shape[1]
        xp, T = backend.xp_of(first), self.cfg.num_virtual_tokens
        if position_ids is None:
            P = cache.length if cache is not None else 0
            position_ids = xp.broadcast_to(xp.arange(P, P + n)[None, :], (B, n))
        position_ids = position_ids + T  # PEFT: position_ids + num_virtual_tokens
        check_positions(net, int(xp.max(position_ids)) + 1)
        return input_ids, attention_mask, position_ids, inputs_embeds, self.prefix_kv(B)


register("prefix_tuning", PrefixTuningConfig, PrefixEncoder, kind="prompt", mergeable=False,
         paper="Prefix-Tuning: Optimizing Continuous Prompts for Generation, Li & Liang 2021, arXiv:2101.00190",
         summary="T trainable keys and values before every layer's own (spec/prefix_tuning.md).")
