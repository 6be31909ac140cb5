"""CPT: Context-aware Prompt Tuning (Blau et al. 2024, arXiv:2410.17222); PEFT's CPT (CPTConfig).

Symbols: T = len(cpt_token_ids) = num_virtual_tokens, d hidden size, E (V, d) the frozen word
    embeddings, c = cpt_token_ids (T,) the in-context examples' tokens, k = cpt_tokens_type_mask (T,):
    0 none; for example j = 1, 2, ..: 4j-3 input template, 4j-2 input, 4j-1 output template, 4j label.
Prompt (CPT-1): P = E[c] + D with E[c] (T, d) frozen (embedding.weight) and the trained D (T, d)
    (delta_embedding.weight), zero at init; rows t with k_t % 4 == 0 (labels, none) get no gradient.
Forward (CPT-2): x = [P; E[ids]] (B, T + n, d), mask [1_T; m], logits (B, T + n, V) (PROMPT-2).
Projection (CPT-3): after each optimizer step D_t <- D_t * eps_t / max(||D_t||_2, eps_t) for rows
    with ||D_t|| > 0; eps_t = opt_projection_format_epsilon * sqrt(d / 2048) for k_t % 4 in {1, 3},
    opt_projection_epsilon * sqrt(d / 2048) for k_t % 4 == 2, 1e-10 otherwise (float32, as PEFT).
Labels (CPT-4): the input's types u (B, n) (default 4) become u + max(k) where u > 0; with types
    s = [k; u] and labels z = [c; y], z_i = -100 unless s_i > 0 and s_i % 4 == 0.
Loss (CPT-5): position i predicts z_{i+1}; L = (1/N) sum_{z_{i+1} != -100} w_{i+1} CE_i, N the count
    of those targets; w = 1 ("none"), or ("decay") w_i = f^r with f = opt_loss_decay_factor and r
    the rank of the label type s_i counted down from the row's last label type (r = 0).
Trainable (CPT-6): D alone (T d numbers); E[c] and every base weight are frozen.
Serialization (CPT-7): peft_type "CPT", config keys as PEFT's; prompt_embeddings (T, d) = P, plus
    prompt_encoder.embedding.weight and prompt_encoder.delta_embedding.weight; a file with only
    prompt_embeddings (PEFT's) loads as E[c] = P, D = 0.
PEFT parity: peft/tuners/cpt/model.py CPTEmbedding (forward, get_projection, calculate_loss);
    peft/peft_model.py PeftModelForCausalLM._cpt_forward.
Deviations: PEFT projects D at the start of each forward; minipeft after each optimizer step
    (model.train, or model.update_and_allocate(step) in a loop of one's own): the same parameters.
    Gradient accumulation weighs micro-batches by the data's target tokens (TRAIN-3), not CPT's N.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import backend
from ..autograd.tensor import Tensor
from ..errors import CheckpointError, ConfigError
from ..hooks import TrainingHook
from ..models.blocks import causal_lm_loss
from .base import check
from .prompt_learning import ENCODER_KEY, InputPrompt, PromptLearningConfig, table, word_embeddings
from .registry import register

LOSS_TYPES = ("none", "decay")
MIN_EPSILON = 1e-10  # PEFT's ball for the tokens that are not trained (labels, type 0)


def _ints(v) -> bool:
    return isinstance(v, (list, tuple)) and all(isinstance(e, int) and not isinstance(e, bool) for e in v)


@dataclasses.dataclass
class CPTConfig(PromptLearningConfig):
    num_virtual_tokens: int | None = None  # len(cpt_token_ids); given, it must equal it
    cpt_token_ids: list | None = None  # None: [0] (PEFT's default)
    cpt_mask: list | None = None  # None: all 1; PEFT keeps it and reads it nowhere (nor does minipeft)
    cpt_tokens_type_mask: list | None = None  # None: all 1 (PEFT's default)
    opt_weighted_loss_type: str = "none"  # "none" | "decay"
    opt_loss_decay_factor: float = 1.0
    opt_projection_epsilon: float = 0.1  # input tokens' ball, before * sqrt(d / 2048)
    opt_projection_format_epsilon: float = 0.1  # template tokens' ball
    tokenizer_name_or_path: str | None = None  # kept for PEFT's config; CPT tokenizes nothing

    peft_type = "CPT"
    PEFT_FIELDS = {f: f for f in ("cpt_token_ids", "cpt_mask", "cpt_tokens_type_mask", "opt_weighted_loss_type",
                                  "opt_loss_decay_factor", "opt_projection_epsilon", "opt_projection_format_epsilon",
                                  "tokenizer_name_or_path")}

    def validate(self):  # CPT-8
        ids = [0] if self.cpt_token_ids is None else self.cpt_token_ids
        check(_ints(ids) and len(ids) > 0 and min(ids) >= 0, "cpt_token_ids", ids,
              "must be a non-empty list of token ids (ints >= 0)")
        self.cpt_token_ids = list(ids)
        T = len(ids)
        for f, rule in (("cpt_mask", "ints"), ("cpt_tokens_type_mask", "token types (ints >= 0)")):
            v = [1] * T if getattr(self, f) is None else getattr(self, f)
            check(_ints(v) and (f == "cpt_mask" or min(v, default=0) >= 0), f, v, f"must be a list of {rule}")
            check(len(v) == T, f, v, f"has {len(v)} entries but cpt_token_ids has {T}: give one per token")
            setattr(self, f, list(v))
        check(self.num_virtual_tokens in (None, T), "num_virtual_tokens", self.num_virtual_tokens,
              f"is len(cpt_token_ids) = {T} for CPT; leave it unset")
        self.num_virtual_tokens = T
        super().validate()
        check(self.opt_weighted_loss_type in LOSS_TYPES, "opt_weighted_loss_type", self.opt_weighted_loss_type,
              f"must be one of {', '.join(LOSS_TYPES)}")
        for f in ("opt_loss_decay_factor", "opt_projection_epsilon", "opt_projection_format_epsilon"):
            v = getattr(self, f)
            check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0, f, v,
                  "must be a finite number >= 0")

    def trainable_count(self, layers: dict, mc) -> int:
        """CPT-6: D (T, d)."""
        return self.num_virtual_tokens * self.token_dim

    def epsilons(self) -> np.ndarray:
        """CPT-3: eps_t (T,) in float32, as PEFT computes it."""
        k = np.asarray(self.cpt_tokens_type_mask)
        scale = np.sqrt(np.float32(self.token_dim / 2048))
        eps = np.full(k.shape, MIN_EPSILON, np.float32)
        eps[(k > 0) & (k % 2 == 1)] = np.float32(self.opt_projection_format_epsilon) * scale
        eps[(k > 0) & (k % 4 == 2)] = np.float32(self.opt_projection_epsilon) * scale
        return eps

    def trained_rows(self) -> np.ndarray:
        """CPT-1: (T, 1) 1.0 where k_t % 4 in {1, 2, 3} (templates and inputs), 0.0 for labels and type 0."""
        return (np.asarray(self.cpt_tokens_type_mask) % 4 != 0).astype(np.float32)[:, None]


# ---- the loss (CPT-4, CPT-5) ----------------------------------------------------------------------------------
def cpt_labels(cfg: CPTConfig, labels, input_type_mask=None) -> tuple:
    """(z, s): labels and token types (B, T + n) over the prompt and the input, on the host (CPT-4)."""
    y = np.asarray(backend.to_host(labels), np.int64)  # (B, n)
    B = y.shape[0]
    u = np.full(y.shape, 4, np.int64) if input_type_mask is None else np.array(backend.to_host(input_type_mask),
                                                                               np.int64)
    if u.shape != y.shape:
        raise ConfigError(f"input_type_mask has shape {u.shape}; it needs the labels' shape {y.shape}")
    k = np.asarray(cfg.cpt_tokens_type_mask, np.int64)
    s = np.concatenate([np.broadcast_to(k, (B, k.size)), np.where(u > 0, u + k.max(), u)], axis=1)
    z = np.concatenate([np.broadcast_to(np.asarray(cfg.cpt_token_ids, np.int64), (B, k.size)), y], axis=1)
    return np.where((s > 0) & (s % 4 == 0), z, -100), s


def label_weights(cfg: CPTConfig, s: np.ndarray) -> np.ndarray:
    """w (B, S) (CPT-5): 1, or f^r by the label type's rank r from the row's last label type."""
    w = np.ones(s.shape)
    if cfg.opt_weighted_loss_type != "decay":
        return w
    for b in range(s.shape[0]):
        kinds = np.unique(s[b][(s[b] > 0) & (s[b] % 4 == 0)])  # ascending
        for r, kind in enumerate(kinds[::-1]):
            w[b][s[b] == kind] = cfg.opt_loss_decay_factor ** r
    return w


def cpt_loss(logits: Tensor, labels, cfg: CPTConfig, input_type_mask=None) -> Tensor:
    """CPT-5: the weighted mean CE over the prompt's and the input's label tokens, PEFT's calculate_loss.
    Written as sum over the distinct weights v of v (N_v / N) CE_v, CE_v the mean CE over its N_v targets."""
    z, s = cpt_labels(cfg, labels, input_type_mask)
    zs, ws = z[:, 1:], label_weights(cfg, s[:, 1:])  # (B, S - 1): the targets of positions 0 .. S - 2
    kept = zs != -100
    N = int(kept.sum())
    if not N:  # PEFT's mean over no target is NaN: say why instead
        raise ConfigError("CPT loss: no token carries a label (a type k > 0 with k % 4 == 0, in "
                          "cpt_tokens_type_mask or in the input's types shifted by max(cpt_tokens_type_mask), "
                          "and a label != -100)")
    lead = np.full((z.shape[0], 1), -100)  # causal_lm_loss shifts the labels itself
    terms = [causal_lm_loss(logits, backend.asarray(np.concatenate([lead, np.where(kept & (ws == v), zs, -100)], 1)))
             * (float(v) * int((kept & (ws == v)).sum()) / N) for v in np.unique(ws[kept])]
    return sum(terms[1:], terms[0])


# ---- the prompt --------------------------------------------------------------------------------------------------
class CPTProjection(TrainingHook):
    """CPT's part in model.train: its loss (CPT-5) and the projection after each step (CPT-3)."""

    def __init__(self, name: str, parts: dict, cfg: CPTConfig):
        self.key, self.cfg, self.prompt = name, cfg, parts[f"prompt_encoder.{name}"]
        k = max(cfg.cpt_tokens_type_mask)
        if k % 4:
            raise ConfigError(f"CPT adapter {name!r}: cpt_tokens_type_mask's largest type is {k}, so the training "
                              f"data's tokens get type {4 + k} (PEFT's rule), which is no label type (a multiple "
                              f"of 4): their labels would carry no loss. End cpt_tokens_type_mask with a label token "
                              f"(type 4j for the last example j)")

    def lm_loss(self, logits, labels):
        return cpt_loss(logits, labels, self.cfg)

    def after_step(self, step: int) -> None:
        self.prompt.project()


class CPTEmbedding(InputPrompt):
    """embedding.weight (T, d) = E[c], frozen; delta_embedding.weight (T, d) = D, trained (PEFT's names)."""

    ENCODER = ("delta_embedding",)
    training_hook = CPTProjection

    @classmethod
    def create(cls, model, cfg, rng, init_weights=True):
        T, d = cfg.num_virtual_tokens, cfg.token_dim
        V = model.config.vocab_size
        check(max(cfg.cpt_token_ids) < V, "cpt_token_ids", cfg.cpt_token_ids, f"this model's ids lie in [0, {V})")
        E = backend.to_host(word_embeddings(model.net).weight.data)  # (V, d)
        a = cls(cfg, E[cfg.cpt_token_ids].astype(np.float32) if init_weights else np.zeros((T, d)))
        a.delta_embedding = table(T, d, np.zeros((T, d)))
        return a.requires_grad_(True)

    def requires_grad_(self, flag: bool = True):
        super().requires_grad_(flag)
        self.embedding.weight.requires_grad = False  # CPT-6: E[c] stays
        return self

    def encode(self, e: Tensor) -> Tensor:
        """CPT-1: P = E[c] + D; the untrained rows of D enter as constants (PEFT's gradient mask)."""
        D = self.delta_embedding.weight  # (T, d)
        m = backend.asarray(self.cfg.trained_rows(), backend.dtype_name(D.data))  # (T, 1)
        return e + D * Tensor(m) + Tensor(D.data * (1 - m))

    def project(self) -> None:
        """CPT-3: each row of D into its ball, in place."""
        D = self.delta_embedding.weight
        xp = backend.xp_of(D.data)
        eps = backend.asarray(self.cfg.epsilons()[:, None], backend.dtype_name(D.data))  # (T, 1)
        norm = xp.sqrt(xp.sum(D.data * D.data, axis=1, keepdims=True))  # (T, 1)
        over = xp.maximum(norm, eps)  # 0 only where the row is 0 (and eps too): the row stays 0
        D.data = D.data * (eps / xp.where(over > 0, over, xp.ones_like(over)))

    def bare_file(self, loaded: dict) -> None:
        """CPT-7: PEFT's file holds P alone; it becomes E[c], with D = 0 (PEFT's CPTEmbedding after loading)."""
        P = loaded["prompt_embeddings"]
        want = tuple(self.embedding.weight.shape)
        if tuple(P.shape) != want:
            raise CheckpointError(f"prompt_embeddings has shape {tuple(P.shape)}; this CPT adapter needs {want} "
                                  f"(len(cpt_token_ids), hidden size)")
        loaded[ENCODER_KEY + "embedding.weight"] = P
        loaded[ENCODER_KEY + "delta_embedding.weight"] = np.zeros_like(P)


register("cpt", CPTConfig, CPTEmbedding, kind="prompt", mergeable=False,
         paper="Context-aware Prompt Tuning: Advancing In-Context Learning with Adversarial Methods, Blau et al. "
               "2024, arXiv:2410.17222",
         summary="In-context examples as the prompt, their embeddings trained within epsilon balls (spec/cpt.md).")
