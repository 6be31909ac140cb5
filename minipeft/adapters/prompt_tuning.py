"""Prompt tuning: T trainable soft tokens before the input (Lester et al. 2021, arXiv:2104.08691).

Symbols: T = num_virtual_tokens, d hidden size, E (V, d) the frozen word embeddings, ids (B, n).
Init (PROMPT-1): "random": P ~ N(0, initializer_range^2) (PEFT's RANDOM is N(0, 1): initializer_range = 1);
    "text": P = E[t] with t the tokens of init_text, repeated then cut to T; "sample_vocab":
    P = E[u], u ~ U{0 .. V-1}^T drawn from the model's RNG.
Forward (PROMPT-2): x = [P; E[ids]] (B, T + n, d), mask [1_T; m], positions 0 .. T + n - 1;
    logits (B, T + n, V), real tokens at [:, T:], as PEFT's PeftModelForCausalLM returns them.
Loss (PROMPT-3): labels [-100_T; y]: virtual positions carry no target; position T - 1 predicts y_0.
Trainable (PROMPT-4): P alone; every base weight is frozen.
Serialization (PROMPT-5): peft_type "PROMPT_TUNING", prompt_embeddings (T, d) = P; with init "text",
    tokenizer_name_or_path = the base model's path or id (PROMPT-9: PEFT refuses a TEXT config without it).
PEFT parity: peft/tuners/prompt_tuning/model.py PromptEmbedding; peft/peft_model.py
    PeftModelForCausalLM.forward (inputs_embeds = cat(prompts, embeds)) and prepare_inputs_for_generation.
Deviations: initializer_range is minipeft's (the seed's field); PEFT always draws N(0, 1). init_text is
    tokenized by the model folder's tokenizer.json (PEFT loads tokenizer_name_or_path).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import backend
from .base import check
from .prompt_learning import InputPrompt, PromptLearningConfig, word_embeddings
from .registry import register

INITS = ("random", "text", "sample_vocab")


@dataclasses.dataclass
class PromptTuningConfig(PromptLearningConfig):
    num_virtual_tokens: int = 10
    initializer_range: float = 0.5  # std of the "random" init (PEFT: 1.0)
    init_text: str | None = None
    init: str | None = None  # "random" | "text" | "sample_vocab"; None: "text" when init_text is set
    tokenizer_name_or_path: str | None = None  # what tokenized init_text; None: the model's name_or_path

    peft_type = "PROMPT_TUNING"
    PEFT_FIELDS = {"init": "prompt_tuning_init", "init_text": "prompt_tuning_init_text",
                   "tokenizer_name_or_path": "tokenizer_name_or_path"}
    PEFT_VALUES = {"init": {"random": "RANDOM", "text": "TEXT", "sample_vocab": "SAMPLE_VOCAB"}}

    def validate(self):
        super().validate()
        if self.init is None:
            self.init = "text" if self.init_text is not None else "random"
        check(self.init in INITS, "init", self.init, f"must be one of {', '.join(INITS)}")
        r = self.initializer_range
        check(isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0,
              "initializer_range", r, "must be a finite number > 0")
        check(self.init != "text" or (isinstance(self.init_text, str) and self.init_text != ""), "init_text",
              self.init_text, 'init="text" needs a non-empty string')

    def trainable_count(self, layers: dict, mc) -> int:
        """PROMPT-4: P (T, d)."""
        return self.num_virtual_tokens * self.token_dim


def text_tokens(ids: list, T: int) -> list:
    """PEFT's rule: cut to T, or repeat ceil(T / len) times and cut."""
    return (ids * math.ceil(T / len(ids)))[:T]


class PromptEmbedding(InputPrompt):
    """embedding.weight (T, d) is the prompt P."""

    @classmethod
    def create(cls, model, cfg, rng, init_weights=True):
        T, d = cfg.num_virtual_tokens, cfg.token_dim
        if not init_weights:
            return cls(cfg, np.zeros((T, d)))
        E = backend.to_host(word_embeddings(model.net).weight.data)  # (V, d)
        if cfg.init == "random":
            return cls(cfg, backend.to_host(rng.normal((T, d), std=cfg.initializer_range)))
        if cfg.init == "sample_vocab":
            return cls(cfg, E[rng.gen.integers(0, E.shape[0], T)])
        if model.tokenizer is None:
            check(False, "init_text", cfg.init_text, "needs the model folder's tokenizer.json to tokenize it")
        ids = model.tokenizer.encode(cfg.init_text)
        check(len(ids) > 0, "init_text", cfg.init_text, "gives no tokens")
        cfg.tokenizer_name_or_path = cfg.tokenizer_name_or_path or model.name_or_path or None  # PROMPT-9
        return cls(cfg, E[text_tokens(ids, T)])


register("prompt_tuning", PromptTuningConfig, PromptEmbedding, kind="prompt", mergeable=False,
         paper="The Power of Scale for Parameter-Efficient Prompt Tuning, Lester et al. 2021, arXiv:2104.08691",
         summary="T soft tokens before the input embeddings (spec/prompt_tuning.md).")
