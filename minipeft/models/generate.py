"""Generation with a KV cache: greedy (temperature 0), or sampling with temperature, top-k, top-p
(spec/transformer.md MODEL-10). Greedy output equals transformers' greedy output token for token."""
from __future__ import annotations

import numpy as np

from .. import backend
from ..autograd import no_grad
from ..errors import ConfigError
from .blocks import KVCache
from .llama import DecoderLM


def position_ids_from_mask(mask: np.ndarray) -> np.ndarray:
    """Left-padded batches count positions from each row's first real token (as transformers does)."""
    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos)


def pick_next(logits: np.ndarray, temperature: float, top_k, top_p, rng) -> np.ndarray:
    """logits (B, V) on the host -> next token ids (B,)."""
    if temperature <= 0.0:
        return np.argmax(logits, axis=-1)
    z = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(z, axis=-1)[:, -min(top_k, z.shape[-1])][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, axis=-1)
        drop = np.cumsum(sorted_p, axis=-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        mask = np.zeros_like(p, dtype=bool)
        np.put_along_axis(mask, order, drop, axis=-1)
        p = np.where(mask, 0.0, p)
        p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.gen.choice(p.shape[-1], p=row) for row in p])


def generate(net, input_ids, attention_mask=None, max_new_tokens=32, temperature=0.0, top_k=None,
             top_p=None, eos_token_id=None, pad_token_id=None, rng=None, prefix_kv=None):
    """input_ids (B, T) ints -> (B, T + n) ints on the host, n <= max_new_tokens."""
    ids = np.asarray(input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None, :]
    B, T = ids.shape
    lead = net.prompt_encoder.lead_tokens() if getattr(net, "prompt_encoder", None) is not None else 0  # virtual tokens
    if not isinstance(net, DecoderLM):
        raise ConfigError(f"generate needs a causal LM; {net.config.model_type} is an encoder")
    if lead + T + max_new_tokens > net.config.max_position_embeddings:  # TRAIN-9: before any work
        virtual = f"{lead} virtual tokens (num_virtual_tokens of the active prompt adapter) + " if lead else ""
        raise ConfigError(f"{virtual}{T} prompt tokens + {max_new_tokens} new tokens exceed the "
                          f"{net.config.max_position_embeddings} positions (max_position_embeddings, the context) "
                          f"of this {net.config.model_type} model; shorten the prompt or lower max_new_tokens"
                          + (" or num_virtual_tokens" if lead else ""))
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = pad_token_id if pad_token_id is not None else (min(eos) if eos else 0)
    rng = rng or backend.RNG(0)
    cfg = net.config
    cache = KVCache(cfg.num_hidden_layers, B, cfg.num_key_value_heads, lead + T + max_new_tokens, cfg.head_dim,
                    backend.dtype("float32"), backend.xp())
    done = np.zeros(B, dtype=bool)
    step_ids, pos = ids, position_ids_from_mask(mask)
    with no_grad():
        for _ in range(max_new_tokens):
            logits = net(backend.asarray(step_ids), attention_mask=backend.asarray(mask),
                         position_ids=backend.asarray(pos), cache=cache, prefix_kv=prefix_kv)
            last = backend.to_host(logits.data[:, -1, :])  # (B, V)
            nxt = np.where(done, pad, pick_next(last, temperature, top_k, top_p, rng))
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
            done |= np.isin(nxt, list(eos))
            if done.all():
                break
            mask = np.concatenate([mask, np.ones((B, 1), dtype=mask.dtype)], axis=1)
            step_ids, pos = nxt[:, None], pos[:, -1:] + 1
    return ids
