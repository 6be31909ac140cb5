"""Llama, Mistral and Qwen2: pre-norm decoder, RoPE, grouped KV heads, SwiGLU MLP (spec/transformer.md MODEL-2).

    h = x + o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))   n1 = RMSNorm(x)
    y = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))                     n2 = RMSNorm(h)

Mistral adds a sliding window to the causal mask; Qwen2 puts a bias on q, k and v.
Attribute paths equal the HF keys: model.layers.0.self_attn.q_proj.weight.
"""
from __future__ import annotations

from .. import backend
from ..autograd import functional as F
from ..nn.layers import Embedding, Linear, RMSNorm
from ..nn.module import Module, ModuleList
from .blocks import AttnContext, attend, attention_mask_bias, n_prefix, rope_tables, run_layers


class LlamaAttention(Module):
    def __init__(self, cfg):
        H, Hkv, D, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        qkv_bias = cfg.attention_bias or cfg.model_type == "qwen2"
        self.q_proj = Linear(d, H * D, bias=qkv_bias)
        self.k_proj = Linear(d, Hkv * D, bias=qkv_bias)
        self.v_proj = Linear(d, Hkv * D, bias=qkv_bias)
        self.o_proj = Linear(H * D, d, bias=cfg.attention_bias)

    def forward(self, x, ctx, layer_idx, rope):
        return self.o_proj(attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), ctx, layer_idx, rope))


class LlamaMLP(Module):
    def __init__(self, cfg):
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, i, bias=cfg.mlp_bias)
        self.up_proj = Linear(d, i, bias=cfg.mlp_bias)
        self.down_proj = Linear(i, d, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu_mul(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(Module):
    def __init__(self, cfg):
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x, ctx, layer_idx, rope):
        h = x + self.self_attn(self.input_layernorm(x), ctx, layer_idx, rope)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(Module):
    def __init__(self, cfg):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)


class DecoderLM(Module):
    """The causal-LM forward shared by the decoders (llama family, phi, gpt2):
    embed -> layers -> final norm -> lm_head, with mask, rotary tables and KV cache built once.
    A family names its parts (base_name, layers_name, final_norm) and may override embed / rope."""

    base_name = "model"  # attribute holding the embeddings, the layers and the final norm
    layers_name = "layers"
    final_norm = "norm"
    learned_positions = False  # a position embedding table (GPT-2) bounds the sequence length
    gradient_checkpointing = False
    dropout_rng = None  # the RNG adapters' dropout draws from; rewound under checkpointing
    prompt_encoder = None  # prompt-learning adapters (adapters/prompt_learning.py PromptEncoders)
    attention_pattern = None  # attention in training instead of full attention (LongLoRA's S²-Attn)

    def __init__(self, cfg):
        self.config = cfg

    def window(self):
        cfg = self.config
        if cfg.model_type == "mistral" or (cfg.model_type == "qwen2" and cfg.use_sliding_window):
            return cfg.sliding_window
        return None

    def embed(self, input_ids, position_ids, inputs_embeds=None):
        """(B, T, d) token embeddings; inputs_embeds, when given, stand in for them (prompt tuning)."""
        return getattr(self, self.base_name).embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    def rope(self, position_ids):
        """(cos, sin) rotary tables, or None for absolute position embeddings."""
        return rope_tables(self.config, position_ids)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, prefix_kv=None):
        cfg, base = self.config, getattr(self, self.base_name)
        if self.prompt_encoder is not None:  # virtual tokens before the input, or prefix keys/values
            input_ids, attention_mask, position_ids, inputs_embeds, prefix_kv = self.prompt_encoder.prepare(
                self, input_ids, attention_mask, position_ids, cache, inputs_embeds, prefix_kv)
        first = input_ids if inputs_embeds is None else inputs_embeds.data
        B, T = first.shape[0], first.shape[1]
        xp = backend.xp_of(first)
        P = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = xp.broadcast_to(xp.arange(P, P + T)[None, :], (B, T))
        h = self.embed(input_ids, position_ids, inputs_embeds)  # (B, T, d)
        mask = attention_mask_bias(attention_mask, T, P, window=self.window(), n_prefix=n_prefix(prefix_kv), xp=xp)
        ctx = AttnContext(cfg.num_attention_heads, cfg.num_key_value_heads, mask, cache, prefix_kv,
                          pattern=self.attention_pattern if self.training else None,
                          attention_mask=attention_mask, window=self.window())
        h = run_layers(self, getattr(base, self.layers_name), h, ctx, self.rope(position_ids))
        if cache is not None:
            cache.length += T
        return self.lm_head(getattr(base, self.final_norm)(h))  # (B, T, V)


class LlamaForCausalLM(DecoderLM):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
