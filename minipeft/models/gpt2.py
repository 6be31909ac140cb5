"""GPT-2: a pre-norm decoder with learned absolute positions and a tanh-GELU MLP (spec/transformer.md MODEL-5).

    x0 = wte(ids) + wpe(position_ids)
    h  = x + c_proj(attn(split3(c_attn(ln_1(x)))))      split3: the fused output cut into q | k | v
    y  = h + mlp.c_proj(gelu_tanh(mlp.c_fc(ln_2(h))))
    logits = ln_f(x_L) wte^T                            (lm_head tied to wte: one Tensor)

No rotary embedding (rope is None); positions enter once, through wpe. The causal forward, the
mask and the KV cache are DecoderLM's, so generate() works unchanged.
Attribute paths equal the HF keys: transformer.h.0.attn.c_attn.weight.
"""
from __future__ import annotations

import math

from ..autograd import functional as F
from ..nn.layers import Conv1D, Embedding, LayerNorm, Linear
from ..nn.module import Module, ModuleList
from .blocks import attend
from .config import GELU_APPROXIMATE
from .llama import DecoderLM

# The one transpose of the repo. OpenAI's GPT-2 checkpoints store every projection as a "Conv1D"
# whose weight is (in, out), the transpose of torch.nn.Linear's (out, in); HF kept that layout.
# nanoGPT transposes those weights while loading; minipeft instead keeps them as stored, so that
# keys, shapes and PEFT's fan_in_fan_out=True adapters match HF: Conv1D (nn/layers.py) computes
# y = x W + b. Only c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj are Conv1D; lm_head is a Linear.


class GPT2Attention(Module):
    def __init__(self, cfg, layer_idx):
        d = cfg.hidden_size
        self.c_attn = Conv1D(d, 3 * d)  # weight (d, 3d): q | k | v side by side
        self.c_proj = Conv1D(d, d)
        scale = 1.0 / math.sqrt(cfg.head_dim) if cfg.scale_attn_weights else 1.0
        self.scale = scale / (layer_idx + 1) if cfg.scale_attn_by_inverse_layer_idx else scale

    def forward(self, x, ctx, layer_idx, rope=None):
        d = x.shape[-1]
        qkv = self.c_attn(x)  # (B, T, 3d)
        q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]  # (B, T, d) each
        return self.c_proj(attend(q, k, v, ctx, layer_idx, rope, scale=self.scale))


class GPT2MLP(Module):
    def __init__(self, cfg):
        self.approximate = GELU_APPROXIMATE[cfg.hidden_act]
        self.c_fc = Conv1D(cfg.hidden_size, cfg.intermediate_size)
        self.c_proj = Conv1D(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), self.approximate))


class GPT2Block(Module):
    def __init__(self, cfg, layer_idx):
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = GPT2Attention(cfg, layer_idx)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x, ctx, layer_idx, rope=None):
        h = x + self.attn(self.ln_1(x), ctx, layer_idx)
        return h + self.mlp(self.ln_2(h))


class GPT2Model(Module):
    def __init__(self, cfg):
        self.wte = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = ModuleList(GPT2Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.norm_eps)


class GPT2LMHeadModel(DecoderLM):
    base_name, layers_name, final_norm = "transformer", "h", "ln_f"
    learned_positions = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self.transformer = GPT2Model(cfg)  # set first: the tied weight is reported as transformer.wte.weight
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def embed(self, input_ids, position_ids, inputs_embeds=None):
        tok = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        return tok + self.transformer.wpe(position_ids)

    def rope(self, position_ids):
        return None
