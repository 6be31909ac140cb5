"""Phi (phi-1, phi-1.5, phi-2): a pre-norm decoder whose attention and MLP read the same LayerNorm
output and add in parallel, with rotary embedding on part of each head (spec/transformer.md MODEL-5).

    n = LayerNorm(x)
    y = x + dense(attn(rope(q_proj(n)), rope(k_proj(n)), v_proj(n))) + fc2(gelu_tanh(fc1(n)))

Deltas from llama (MODEL-2):
- partial rotary: only the first rot = int(head_dim * partial_rotary_factor) features of each
  query/key head are rotated, the rest pass through (rope_tables builds (cos, sin) of width rot);
- parallel block with one LayerNorm (weight and bias), not two RMSNorms;
- every projection has a bias, the output projection is named `dense`, the lm_head has a bias;
- qk_layernorm (a config flag): a LayerNorm over each head's D features of q and k before rope;
- the final norm is `model.final_layernorm`.
Attribute paths equal the HF keys: model.layers.0.self_attn.dense.weight.
"""
from __future__ import annotations

from ..autograd import functional as F
from ..nn.layers import Embedding, LayerNorm, Linear
from ..nn.module import Module, ModuleList
from .blocks import attend
from .config import GELU_APPROXIMATE
from .llama import DecoderLM


def per_head(norm, x, head_dim):
    """A norm over each head's features of x (B, T, H*D): (B, T, H, D) -> norm -> (B, T, H*D)."""
    B, T, HD = x.shape
    return norm(x.reshape(B, T, HD // head_dim, head_dim)).reshape(B, T, HD)


class PhiAttention(Module):
    def __init__(self, cfg):
        H, Hkv, D, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.head_dim, self.qk_layernorm = D, cfg.qk_layernorm
        self.q_proj = Linear(d, H * D)
        self.k_proj = Linear(d, Hkv * D)
        self.v_proj = Linear(d, Hkv * D)
        self.dense = Linear(H * D, d)
        if cfg.qk_layernorm:
            self.q_layernorm = LayerNorm(D, cfg.norm_eps)
            self.k_layernorm = LayerNorm(D, cfg.norm_eps)

    def forward(self, x, ctx, layer_idx, rope):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, H*D), (B, T, Hkv*D) x2
        if self.qk_layernorm:
            q, k = per_head(self.q_layernorm, q, self.head_dim), per_head(self.k_layernorm, k, self.head_dim)
        return self.dense(attend(q, k, v, ctx, layer_idx, rope))


class PhiMLP(Module):
    def __init__(self, cfg):
        self.approximate = GELU_APPROXIMATE[cfg.hidden_act]
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), self.approximate))


class PhiDecoderLayer(Module):
    def __init__(self, cfg):
        self.self_attn = PhiAttention(cfg)
        self.mlp = PhiMLP(cfg)
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x, ctx, layer_idx, rope):
        n = self.input_layernorm(x)  # (B, T, d), read by both branches
        return self.self_attn(n, ctx, layer_idx, rope) + self.mlp(n) + x  # transformers' summation order


class PhiModel(Module):
    def __init__(self, cfg):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = ModuleList(PhiDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)


class PhiForCausalLM(DecoderLM):
    final_norm = "final_layernorm"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model = PhiModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
