"""LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models (Chen, Qian, Tang, Lai, Liu, Han, Jia,
ICLR 2024, arXiv:2309.12307), spec/longlora.md.

Symbols: T tokens, H attention heads (even), G the group size, s = floor(G / 2) the shift; q (B, H, T, D) after
    RoPE, k and v (B, Hkv, T, D); a token's index n(t) = (t - s) mod T after the roll.
Group size (LONGLORA-1): G = group_size, else max(1, int(T group_size_ratio)) (the authors' T / 4).
S²-Attn (LONGLORA-2), in training only: heads 0..H/2-1 attend within groups [jG, (j+1)G) causally; heads
    H/2..H-1 attend within the groups of the sequence rolled by -s (roll, the paper's Algorithm 1 and the
    authors' forward_noflashattn: key b is read by query a iff floor(n(a)/G) = floor(n(b)/G) and n(b) <= n(a)),
    or within groups [0, G - s), [G - s, 2G - s), ... causally (offset: their forward_flashattn's boundaries);
    the outputs of the shifted heads are rolled back by +s, so each stays at its token. shift=False: both halves
    unshifted. Padding keys and the sliding window stay masked.
Full attention (LONGLORA-3): G >= T, and every forward outside training (eval, generate), is plain causal attention.
LoRA+ (LONGLORA-4): LoRA (r 8, alpha 16 on q, k, v, o_proj, their fine-tune.py) with embed_tokens and every
    RMSNorm trained in full (modules_to_save: embed_tokens, input_layernorm, post_attention_layernorm, norm).
Init (LONGLORA-5): B = 0 and the copies equal the originals: h = the base model's, in training too at G >= T.
Serialization (LONGLORA-6): a plain PEFT LoRA folder with modules_to_save; S²-Attn is training-only, so the file
    holds nothing of it, loads here and in PEFT as LoRAConfig and runs with full attention, as LongLoRA infers.
PEFT parity: LoRA's (the file is PEFT's LORA); PEFT has no S²-Attn. The authors' code (github.com/dvlab-research/
    LongLoRA: llama_attn_replace.py forward_noflashattn, forward_flashattn; fine-tune.py) settles the shift's
    direction, the roll-back, the group size and the trained parameters.
Deviations: T need not be a multiple of G (the last group is shorter; their code raises); the roll and the
    roll-back both move floor(G / 2) tokens (their -G // 2 and G // 2 differ by one for odd G); padding is
    masked per key (their roll path takes the first group's mask for every group).
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd import concat
from ..autograd import functional as F
from .base import check
from .lora import LoRAConfig
from .registry import register

SHIFT_MODES = ("roll", "offset")
MODEL_TYPES = ("llama", "mistral", "qwen2")
LORA_PLUS = ("embed_tokens", "input_layernorm", "post_attention_layernorm", "norm")


@dataclasses.dataclass
class LongLoRAConfig(LoRAConfig):
    target_modules: tuple | str = ("q_proj", "k_proj", "v_proj", "o_proj")  # the authors' fine-tune.py
    modules_to_save: tuple = LORA_PLUS  # their trainable_params "embed,norm"
    group_size_ratio: float = 0.25  # G = int(T ratio) (their group_size_ratio = 1/4)
    group_size: int | None = None  # a fixed G in tokens instead
    shift: bool = True  # shift half the heads by G / 2 (False: plain grouped attention, the paper's ablation)
    shift_mode: str = "roll"  # "roll" (the paper's Algorithm 1) or "offset" (their flash-attention boundaries)

    def validate(self):
        super().validate()
        check(0.0 < self.group_size_ratio <= 1.0, "group_size_ratio", self.group_size_ratio, "must be in (0, 1]")
        check(self.group_size is None or (isinstance(self.group_size, int) and self.group_size >= 1),
              "group_size", self.group_size, "must be None or a positive integer (tokens)")
        check(self.shift_mode in SHIFT_MODES, "shift_mode", self.shift_mode, f"use one of {', '.join(SHIFT_MODES)}")

    def trainable_count(self, layers: dict, mc) -> int:
        """LONGLORA-4: LoRA's r (in + out) per layer, plus V d for embed_tokens and d per norm (2L + 1 of them)
        where modules_to_save names them (other entries are counted apart, as for every method)."""
        sizes = {"embed_tokens": mc.vocab_size * mc.hidden_size, "norm": mc.hidden_size,
                 "input_layernorm": mc.num_hidden_layers * mc.hidden_size,
                 "post_attention_layernorm": mc.num_hidden_layers * mc.hidden_size}
        return super().trainable_count(layers, mc) + sum(sizes.get(e, 0) for e in self.modules_to_save)

    def attach(self, net, name: str) -> None:
        """LONGLORA-2: S²-Attn on the network's attention while it trains."""
        cfg = net.config
        check(cfg.model_type in MODEL_TYPES, "model_type", cfg.model_type,
              f"LongLoRA's S²-Attn is written for {', '.join(MODEL_TYPES)}")
        check(cfg.num_attention_heads % 2 == 0, "num_attention_heads", cfg.num_attention_heads,
              "must be even: S²-Attn shifts half of the heads")
        net.attention_pattern = ShiftedSparseAttention(self.group_size, self.group_size_ratio, self.shift,
                                                       self.shift_mode, name)

    def detach(self, net, name: str) -> None:
        if getattr(net.attention_pattern, "adapter", None) == name:
            net.attention_pattern = None


def group_size(T: int, fixed, ratio: float) -> int:
    """LONGLORA-1."""
    return fixed if fixed is not None else max(1, int(T * ratio))


def allowed(T: int, G: int, shift: int, mode: str, xp):
    """LONGLORA-2: (T, T) bool, query a may read key b (padding and window apart)."""
    t = xp.arange(T)
    if shift and mode == "roll":
        n = (t - shift) % T  # the token's index after roll(-s)
        return (n[:, None] // G == n[None, :] // G) & (n[None, :] <= n[:, None])
    g = (t + shift) // G  # offset: groups [0, G - s), [G - s, 2G - s), ...; s = 0: [jG, (j+1)G)
    return (g[:, None] == g[None, :]) & (t[None, :] <= t[:, None])


class ShiftedSparseAttention:
    """S²-Attn (LONGLORA-2): the network's attention in training (models/blocks.py attend calls it)."""

    def __init__(self, fixed, ratio, shift, mode, adapter):
        self.fixed, self.ratio, self.shift, self.mode, self.adapter = fixed, ratio, shift, mode, adapter

    def __call__(self, q, k, v, ctx, scale):
        B, H, T, _ = q.shape
        G = group_size(T, self.fixed, self.ratio)
        if G >= T:  # LONGLORA-3
            return F.sdpa(q, k, v, mask=ctx.mask, scale=scale)
        Hkv = k.shape[1]
        if Hkv % 2:  # a kv head read by both halves: each query head gets its own copy (the authors' repeat_kv)
            rep = [j // (H // Hkv) for j in range(H)]
            k, v = (concat([x[:, j:j + 1] for j in rep], axis=1) for x in (k, v))
            Hkv = H
        outs = []
        for half, s in ((0, 0), (1, G // 2 if self.shift else 0)):
            hq, hk = slice(half * H // 2, (half + 1) * H // 2), slice(half * Hkv // 2, (half + 1) * Hkv // 2)
            outs.append(F.sdpa(q[:, hq], k[:, hk], v[:, hk], mask=self.mask(ctx, T, G, s), scale=scale))
        return concat(outs, axis=1)  # (B, H, T, D)

    def mask(self, ctx, T, G, s):
        """The additive mask of one half: the grouping, the padding keys and the window."""
        xp = backend.xp_of(ctx.mask)
        ok = allowed(T, G, s, self.mode, xp)[None, None, :, :]  # (1, 1, T, T)
        if ctx.attention_mask is not None:
            ok = ok & (ctx.attention_mask[:, None, None, :] != 0)
        if ctx.window is not None:
            t = xp.arange(T)
            ok = ok & (t[:, None] - t[None, :] < ctx.window)
        low = xp.asarray(xp.finfo(ctx.mask.dtype).min, dtype=ctx.mask.dtype)
        return xp.where(ok, xp.asarray(0.0, dtype=ctx.mask.dtype), low)


register("longlora", LongLoRAConfig,
         paper="LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models, Chen, Qian, Tang, Lai, Liu, "
               "Han, Jia 2024 (ICLR), arXiv:2309.12307",
         summary="LongLoRA, LoRA on q, k, v, o_proj with embed_tokens and the norms trained, and shifted sparse "
                 "attention (S²-Attn: groups of G tokens, half the heads shifted by G / 2) in training, full "
                 "attention at inference (spec/longlora.md).")
