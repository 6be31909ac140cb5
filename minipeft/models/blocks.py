"""Pieces every architecture shares: rotary tables, the attention mask, the attention core with a
KV cache and optional prefix keys/values, and the causal-LM loss (spec/transformer.md).

Shapes: B batch, T new tokens, P past (cached) tokens, S = P + T keys, H query heads,
Hkv key/value heads, D head size.
"""
from __future__ import annotations

import math

from .. import backend
from ..autograd import checkpoint, concat
from ..autograd import functional as F
from ..autograd.tensor import Tensor
from .config import rope_type


def rope_tables(cfg, position_ids, dtype="float32"):
    """cos, sin of shape (B, 1, T, rot) for integer positions (B, T) (MODEL-3).
    Computed in float32 the way transformers does, so angles match to the last bit."""
    xp = backend.xp_of(position_ids)
    rot = cfg.rotary_dim
    f32 = xp.float32
    inv_freq = 1.0 / (cfg.rope_theta ** (xp.astype(xp.arange(0, rot, 2), f32) / rot))  # (rot/2,)
    inv_freq = _scale_inv_freq(cfg, inv_freq, xp)
    freqs = xp.astype(position_ids, f32)[:, :, None] * inv_freq[None, None, :]  # (B, T, rot/2)
    emb = xp.concat((freqs, freqs), axis=-1)[:, None, :, :]  # (B, 1, T, rot)
    dt = backend.dtype(dtype, xp)
    return xp.astype(xp.cos(emb), dt), xp.astype(xp.sin(emb), dt)


def _scale_inv_freq(cfg, inv_freq, xp):
    s = cfg.rope_scaling or {}
    kind = rope_type(s)
    if kind == "linear":
        return inv_freq / s["factor"]
    if kind == "llama3":  # long-context smoothing of Llama 3.1
        factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old = s.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = xp.where(wavelen > old / lo, inv_freq / factor, inv_freq)
        is_mid = (wavelen >= old / hi) & (wavelen <= old / lo)
        return xp.where(is_mid, mid, out)
    return inv_freq


def attention_mask_bias(attention_mask, T, P, causal=True, window=None, n_prefix=0, dtype="float32", xp=None):
    """Additive mask (B|1, 1, T, n_prefix + S): 0 where query i (absolute position P+i) may read
    key j, the dtype's minimum elsewhere (MODEL-4). attention_mask (B, S) has 1 for real tokens,
    0 for pads. Prefix keys (prefix tuning) come first; every query may read them, except those a
    sliding window has passed (the prefix counts as the first n_prefix positions)."""
    xp = xp or backend.xp()
    S = P + T
    q = xp.arange(P, S)[:, None]  # (T, 1)
    k = xp.arange(S)[None, :]  # (1, S)
    allowed = (k <= q) if causal else xp.ones((T, S), dtype=xp.bool)
    if window is not None and window < S:
        allowed = allowed & (q - k < window)
    allowed = allowed[None, None, :, :]  # (1, 1, T, S)
    if attention_mask is not None:
        allowed = allowed & (attention_mask[:, None, None, :] != 0)
    if n_prefix:  # prefix key j sits at position j and queries at n_prefix + P + i, as in transformers' cache
        lead = (n_prefix + q) - xp.arange(n_prefix)[None, :] < window if window is not None \
            else xp.ones((T, n_prefix), dtype=xp.bool)  # (T, n_prefix)
        lead = xp.broadcast_to(lead[None, None, :, :], tuple(allowed.shape[:3]) + (n_prefix,))
        allowed = xp.concat((lead, allowed), axis=-1)
    dt = backend.dtype(dtype, xp)
    return xp.where(allowed, xp.asarray(0.0, dtype=dt), xp.asarray(xp.finfo(dt).min, dtype=dt))


class KVCache:
    """Preallocated keys and values per layer, (B, Hkv, max_len, D); `length` tokens are filled."""

    def __init__(self, n_layers, batch, n_kv_heads, max_len, head_dim, dtype, xp):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [xp.zeros(shape, dtype=dtype) for _ in range(n_layers)]
        self.v = [xp.zeros(shape, dtype=dtype) for _ in range(n_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer, k, v):
        """Store new keys/values (B, Hkv, T, D) after the cached ones; return all so far."""
        T = k.shape[2]
        end = self.length + T
        self.k[layer][:, :, self.length:end, :] = k
        self.v[layer][:, :, self.length:end, :] = v
        return self.k[layer][:, :, :end, :], self.v[layer][:, :, :end, :]

    def keep_rows(self, rows) -> None:
        """Keep only the batch rows `rows` (an index array), in that order: finished requests leave (SERVING-6)."""
        xp = backend.xp_of(self.k[0])
        self.k = [xp.take(k, rows, axis=0) for k in self.k]
        self.v = [xp.take(v, rows, axis=0) for v in self.v]


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    B, T, HD = x.shape
    return x.reshape(B, T, n_heads, HD // n_heads).transpose(1, 2)  # (B, H, T, D)


def merge_heads(x: Tensor) -> Tensor:
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)


def attend(q, k, v, ctx, layer_idx, rope=None, scale=None):
    """Multi-head attention core on projected q (B,T,H*D), k and v (B,T,Hkv*D) -> (B,T,H*D).

    ctx carries what is per call: n_heads, n_kv_heads, the mask bias, the KV cache, and the
    per-layer prefix keys/values (prefix tuning: Tensors (B, Hkv, Np, D) read before the tokens).
    rope is (cos, sin) or None (GPT-2, BERT use absolute positions); scale defaults to 1/sqrt(D)."""
    q = split_heads(q, ctx.n_heads)
    k = split_heads(k, ctx.n_kv_heads)
    v = split_heads(v, ctx.n_kv_heads)
    if rope is not None:
        q, k = F.rope(q, *rope), F.rope(k, *rope)
    if ctx.cache is not None:
        ck, cv = ctx.cache.update(layer_idx, k.data, v.data)
        k, v = Tensor(ck), Tensor(cv)
    if ctx.prefix_kv is not None:
        pk, pv = ctx.prefix_kv[layer_idx]
        k, v = concat([pk, k], axis=2), concat([pv, v], axis=2)
    if ctx.pattern is not None and ctx.cache is None and ctx.prefix_kv is None:
        return merge_heads(ctx.pattern(q, k, v, ctx, scale))
    return merge_heads(F.sdpa(q, k, v, mask=ctx.mask, scale=scale, blocks=ctx.key_blocks(q.shape[2], k.shape[2])))


class AttnContext:
    """Per-forward attention state shared by all layers (built once by the model's forward)."""

    def __init__(self, n_heads, n_kv_heads, mask, cache=None, prefix_kv=None, pattern=None, attention_mask=None,
                 window=None):
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.mask, self.cache, self.prefix_kv = mask, cache, prefix_kv
        # pattern(q, k, v, ctx, scale): attention other than full (LongLoRA's S²-Attn in training), which
        # reads the (B, S) attention_mask and the sliding window
        self.pattern, self.attention_mask, self.window = pattern, attention_mask, window
        self._key_blocks = {}

    def key_blocks(self, T: int, S: int) -> list:
        """SDPA's blocks of query rows for this mask (AG-20), worked out once per forward, not per layer."""
        if (T, S) not in self._key_blocks:
            self._key_blocks[(T, S)] = F.key_blocks(self.mask, T, S, F.ATTN_BLOCK)
        return self._key_blocks[(T, S)]


def n_prefix(prefix_kv) -> int:
    """How many prefix keys each layer reads before the tokens (0 without prefix tuning)."""
    return prefix_kv[0][0].shape[2] if prefix_kv is not None else 0


def run_layers(net, layers, h, ctx, rope=None):
    """h through each layer(h, ctx, i, rope). With net.gradient_checkpointing in training, a layer
    keeps no activations and is recomputed in backward (AG-21), its dropout RNG rewound."""
    for i, layer in enumerate(layers):
        if net.gradient_checkpointing and net.training:
            rngs = (net.dropout_rng,) if net.dropout_rng else ()
            h = checkpoint(lambda x, layer=layer, i=i: layer(x, ctx, i, rope), h,
                           params=layer.trainable_parameters(), rngs=rngs)
        else:
            h = layer(h, ctx, i, rope)
    return h


def causal_lm_loss(logits: Tensor, labels) -> Tensor:
    """HF causal LM loss: predict token t+1 from position t; labels -100 are ignored (MODEL-6)."""
    xp = backend.xp_of(labels)
    B, T, V = logits.shape
    if labels.shape[1] < T:  # prompt learning's virtual tokens lead the logits and carry no label (PROMPT-3)
        labels = xp.concat((xp.full((B, T - labels.shape[1]), -100, dtype=labels.dtype), labels), axis=1)
    shifted = xp.concat((labels[:, 1:], xp.full((B, 1), -100, dtype=labels.dtype)), axis=1)  # (B, T)
    return F.cross_entropy(logits.reshape(B * T, V), xp.reshape(shifted, (-1,)))
