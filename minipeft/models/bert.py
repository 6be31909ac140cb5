"""BERT: a post-norm encoder with learned absolute positions and token types (spec/transformer.md MODEL-5).

    x0 = LayerNorm(word(ids) + token_type(tt) + position(pos))
    a  = LayerNorm(dense(attn(query(x), key(x), value(x))) + x)       attention.self / attention.output
    y  = LayerNorm(dense(gelu(dense(a))) + a)                          intermediate / output

Attention is bidirectional: every token reads every real (attention_mask = 1) token, the
mask built by attention_mask_bias(causal=False). forward returns the last hidden state (B, T, d),
as transformers' BertModel(...).last_hidden_state. The pooler (tanh(dense(h[:, 0]))) is kept so
that its keys load and save, and is not applied. A checkpoint without it (BertForMaskedLM,
saved with a "bert." prefix and "cls." heads) loads with the pooler dropped (io.load_state).
Attribute paths equal the HF keys: encoder.layer.0.attention.self.query.weight.
"""
from __future__ import annotations

from .. import backend
from ..autograd import functional as F
from ..nn.layers import Embedding, LayerNorm, Linear
from ..nn.module import Module, ModuleList
from .blocks import AttnContext, attend, attention_mask_bias, n_prefix, run_layers
from .config import GELU_APPROXIMATE


class BertEmbeddings(Module):
    def __init__(self, cfg):
        d = cfg.hidden_size
        self.word_embeddings = Embedding(cfg.vocab_size, d)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, d)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, d)
        self.LayerNorm = LayerNorm(d, cfg.norm_eps)

    def forward(self, input_ids, position_ids, token_type_ids, inputs_embeds=None):
        x = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x + self.position_embeddings(position_ids))  # transformers' summation order


class BertSelfAttention(Module):
    def __init__(self, cfg):
        d = cfg.hidden_size
        self.query, self.key, self.value = Linear(d, d), Linear(d, d), Linear(d, d)

    def forward(self, x, ctx, layer_idx):
        return attend(self.query(x), self.key(x), self.value(x), ctx, layer_idx)  # (B, T, d)


class BertResidualNorm(Module):
    """attention.output and output: y = LayerNorm(dense(x) + residual), the post-norm step."""

    def __init__(self, n_in, cfg):
        self.dense = Linear(n_in, cfg.hidden_size)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(Module):
    def __init__(self, cfg):
        self.self = BertSelfAttention(cfg)  # HF's name: attention.self.query
        self.output = BertResidualNorm(cfg.hidden_size, cfg)

    def forward(self, x, ctx, layer_idx):
        return self.output(self.self(x, ctx, layer_idx), x)


class BertIntermediate(Module):
    def __init__(self, cfg):
        self.approximate = GELU_APPROXIMATE[cfg.hidden_act]
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x), self.approximate)


class BertLayer(Module):
    def __init__(self, cfg):
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualNorm(cfg.intermediate_size, cfg)

    def forward(self, x, ctx, layer_idx, rope=None):
        a = self.attention(x, ctx, layer_idx)  # (B, T, d)
        return self.output(self.intermediate(a), a)


class BertEncoder(Module):
    def __init__(self, cfg):
        self.layer = ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertPooler(Module):
    def __init__(self, cfg):
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size)


class BertModel(Module):
    base_name = ""  # keys have no prefix; a "bert." prefix (task checkpoints) is stripped on load
    optional_modules = ("pooler",)
    gradient_checkpointing = False
    dropout_rng = None

    def __init__(self, cfg):
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, prefix_kv=None):
        """Last hidden state (B, T, d). attention_mask (B, T): 1 real, 0 pad; token types default to 0."""
        cfg = self.config
        first = input_ids if inputs_embeds is None else inputs_embeds.data
        B, T = first.shape[0], first.shape[1]
        xp = backend.xp_of(first)
        if position_ids is None:
            position_ids = xp.broadcast_to(xp.arange(T)[None, :], (B, T))
        if token_type_ids is None:
            token_type_ids = xp.zeros((B, T), dtype=xp.int64)
        h = self.embeddings(input_ids, position_ids, token_type_ids, inputs_embeds)  # (B, T, d)
        mask = attention_mask_bias(attention_mask, T, 0, causal=False, n_prefix=n_prefix(prefix_kv), xp=xp)
        ctx = AttnContext(cfg.num_attention_heads, cfg.num_attention_heads, mask, None, prefix_kv)
        return run_layers(self, self.encoder.layer, h, ctx)
