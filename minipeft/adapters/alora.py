"""aLoRA, activated LoRA (Greenewald et al. 2025, "Activated LoRA: Fine-tuned LLMs for Intrinsics",
arXiv:2504.12397); PEFT 0.21's LoraConfig(alora_invocation_tokens=[...]), spec/alora.md.

LoRA (lora.py) that acts only on the tokens from the last occurrence of an invocation sequence on, so that
everything before it runs the base model alone (its KV cache is the base model's, reusable across adapters).
Symbols: x (B, T, in) a layer's input, y = W0 x + b the base output, A (r, in), B (out, r), s = alpha / r (LORA-2),
    c = (c_1 .. c_k) the invocation tokens, ids (B, L) the input ids of the forward call (L >= T with a KV cache).
Offset (ALORA-1): for row b, j_b = the largest j with ids[b, j : j + k] = c (none: the row is not activated);
    o_b = L - j_b, the number of positions from the invocation's first token to the end (PEFT's alora_offsets).
Forward (ALORA-2): m_bt = 1 if t >= T - min(o_b, T) else 0, h_bt = y_bt + m_bt s B A dropout(x_bt); with a KV
    cache each new token (T = 1) of an activated row is adapted, as the offsets are those of the prompt.
    A row without the invocation is the base model's alone (its gradient is zero, as PEFT's).
Not mergeable (ALORA-3): the update depends on the position, so merge, the conversions and the audit's merged check
    refuse it (PEFT raises too). Mixed batches (METHOD-6): each row's offset comes from its own adapter's tokens.
Saved (ALORA-4): PEFT's LoRA (peft_type "LORA") with alora_invocation_tokens, keys as LoRA's; a LoRA folder with
    that field set loads as this config.
PEFT parity: peft/tuners/lora/variants.py calculate_alora_offsets, ALoraLinearVariant.forward.
Deviations: the masked rows are computed and multiplied by 0 (PEFT indexes only the adapted rows); the same output,
    and the same zero gradient for the others.
"""
from __future__ import annotations

import contextlib
import dataclasses

import numpy as np

from .. import backend
from ..autograd import functional as F
from ..autograd.tensor import Tensor
from ..errors import ConfigError
from .base import check
from .lora import LoRAConfig, LoRALinear
from .registry import register


@dataclasses.dataclass
class ALoRAConfig(LoRAConfig):
    """LoRAConfig's fields, plus alora_invocation_tokens: the token ids whose last occurrence starts the adapter."""

    alora_invocation_tokens: object = None  # a non-empty list of token ids (PEFT's field of the same name)

    PEFT_FLAGS = {"alora_invocation_tokens": True}  # a LoRA folder with the list set is an aLoRA (ALORA-4)
    PEFT_FIELDS = {**LoRAConfig.PEFT_FIELDS, "alora_invocation_tokens": "alora_invocation_tokens"}

    def validate(self):
        super().validate()
        tokens = self.alora_invocation_tokens
        check(isinstance(tokens, (list, tuple)) and len(tokens) > 0 and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0 for t in tokens),
            "alora_invocation_tokens", tokens, "must be a non-empty list of token ids (the tokenized invocation "
            "string, e.g. tokenizer.encode('<|assistant|>'))")
        self.alora_invocation_tokens = tuple(int(t) for t in tokens)
        check(self.trainable_token_indices is None, "trainable_token_indices", self.trainable_token_indices,
              "is not supported with aLoRA here (the token rows would act before the invocation)")

    def to_peft(self) -> dict:
        d = super().to_peft()  # PEFT_FLAGS wrote True: the list itself is the field
        d["alora_invocation_tokens"] = list(self.alora_invocation_tokens)
        return d


def invocation_offset(ids, tokens) -> int | None:
    """ALORA-1: len(ids) - (the start of the last occurrence of tokens in ids), or None if it does not occur."""
    ids, k = np.asarray(ids), len(tokens)
    starts = np.flatnonzero(ids[:max(len(ids) - k + 1, 0)] == tokens[0])
    hits = [j for j in starts if tuple(ids[j:j + k]) == tuple(tokens)]
    return len(ids) - int(hits[-1]) if hits else None


def token_mask(offsets, T: int) -> np.ndarray:
    """ALORA-2: (B, T) float32, 1 on the last min(o_b, T) positions of row b (none where o_b is None)."""
    pos = np.arange(T)[None, :]
    last = np.array([0 if o is None else min(int(o), T) for o in offsets])[:, None]
    return (pos >= T - last).astype(np.float32)


class ALoRALinear(LoRALinear):
    MIXED_BATCH = True  # each row's offset is its own adapter's (activated() gives a group its rows' offsets)
    offsets = None  # per row of the batch this delta sees; set by activated() around a forward

    def adapt(self, x, y, base):  # ALORA-2
        B, T = x.shape[0], (x.shape[1] if len(x.shape) == 3 else 1)
        offsets = self.offsets if self.offsets is not None else [None] * B
        if len(offsets) != B:
            raise ConfigError(f"aLoRA: {len(offsets)} offsets for a batch of {B}; run the model through model(...), "
                              f"model.generate or model.train, which find the invocation tokens")
        m = token_mask(offsets, T).reshape((B, T, 1) if len(x.shape) == 3 else (B, 1))
        h = F.dropout(x, self.p, self.rng, self.training)
        return y + self.lora_B(self.lora_A(h)) * self.s * Tensor(backend.asarray(m))

    def mergeable_into(self, base) -> bool:
        return False

    def merge_into(self, base):  # ALORA-3
        raise ConfigError("aLoRA cannot be merged: it adapts only the tokens after its invocation sequence, which "
                          "no single weight expresses (PEFT refuses it too); keep the adapter unmerged")


def _deltas(model):
    from .inject import adapted_layers
    return [(n, d) for _, layer in adapted_layers(model.net) for n, d in vars(layer.adapters).items()
            if isinstance(d, ALoRALinear)]


@contextlib.contextmanager
def activated(model, ids, adapter_names=None):
    """Within it every aLoRA delta of the model holds the offsets (ALORA-1) of the rows it sees in a forward on
    ids (B, L): all rows, or in a mixed batch (adapter_names) the rows of its own adapter, in their order."""
    deltas = _deltas(model)
    if not deltas:
        yield
        return
    ids = np.asarray(ids)
    ids = ids[None, :] if ids.ndim == 1 else ids
    names = [adapter_names] * len(ids) if isinstance(adapter_names, str) else adapter_names
    offsets = {}
    for n in dict.fromkeys(n for n, _ in deltas):
        rows = range(len(ids)) if names is None else [b for b, m in enumerate(names) if m == n]
        offsets[n] = [invocation_offset(ids[b], model.peft_configs[n].alora_invocation_tokens) for b in rows]
    for n, d in deltas:
        d.offsets = offsets[n]
    try:
        yield
    finally:
        for _, d in deltas:
            d.offsets = None


register("alora", ALoRAConfig, ALoRALinear, mergeable=False,
         paper="Activated LoRA: Fine-tuned LLMs for Intrinsics, Greenewald et al. 2025, arXiv:2504.12397",
         summary="aLoRA, LoRA that acts only from the last occurrence of its invocation tokens on: "
                 "h = W0 x + m s B A x with m = 1 on those positions, so the prompt before it runs (and caches) the "
                 "base model (spec/alora.md).")
