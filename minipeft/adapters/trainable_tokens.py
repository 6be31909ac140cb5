"""TrainableTokens: train the embedding rows of a few tokens alone, as PEFT 0.21.2's TRAINABLE_TOKENS tuner
(peft/tuners/trainable_tokens), spec/trainable_tokens.md. PEFT's own method (no paper): new or re-trained tokens
without training, or saving, the whole embedding matrix.

Symbols: E (V, d) the frozen embedding matrix, t = (t_1..t_k) the token indices, D (k, d) the trained rows (PEFT's
    trainable_tokens_delta: the rows themselves, not an offset), E' the matrix with row t_j replaced by D[j].
Forward (TRAINABLE_TOKENS-1): embedding(ids) = E'[ids]: E'[t_j] = D[j], E'[v] = E[v] for every other v; a tied
    lm_head (tie_word_embeddings) computes logits = h E'^T with the same D (PEFT's tied adapter).
Init (TRAINABLE_TOKENS-2): D = E[t] (init_weights=True), so the model equals the base at step 0; init_weights=False
    draws D ~ N(0, 1) (PEFT's torch.randn).
Merge (TRAINABLE_TOKENS-3): E[t] <- D; unmerge writes back the rows E[t] held when the adapter was made.
Trainable (TRAINABLE_TOKENS-4): D only, k d numbers (once, tied or not); E gets no gradient.
Targets (TRAINABLE_TOKENS-5): Embedding modules; target_modules=None is the input embedding (PEFT's
    get_input_embeddings: "model.embed_tokens", GPT-2 "transformer.wte", BERT "embeddings.word_embeddings"), with a
    tied lm_head added. token_indices must be non-empty, distinct and below V (a ConfigError naming the layer).
Serialization (TRAINABLE_TOKENS-6): peft_type "TRAINABLE_TOKENS", key <embedding>.trainable_tokens_delta (k, d), and
    <lm_head>.trainable_tokens_delta (the same D) when tied; fields token_indices, init_weights, target_modules.
Deviations: with two TrainableTokens adapters active at once, PEFT replaces both sets of rows (and refuses overlapping
    sets); minipeft computes with the last active one's alone.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd import concat, embedding, take_rows
from ..autograd.functional import linear
from ..nn.layers import Embedding
from .base import AdapterConfig, Delta, check, trainable
from .inject import OUTPUT_HEADS
from .registry import register

INPUT_EMBEDDING = "model.embed_tokens"


@dataclasses.dataclass
class TrainableTokensConfig(AdapterConfig):
    target_modules: tuple | str | None = None  # TRAINABLE_TOKENS-5: None is the input embedding
    token_indices: tuple[int, ...] = ()  # checked in validate (check_field_types reads item types of known fields)
    init_weights: bool = True  # TRAINABLE_TOKENS-2: D = E[t]; False: N(0, 1)

    peft_type = "TRAINABLE_TOKENS"
    PEFT_FIELDS = {"token_indices": "token_indices", "init_weights": "init_weights"}
    PEFT_COMMON = ("target_modules",)
    TARGET_TYPES = (Embedding,)
    DEFAULT_TARGETS = {"llama": INPUT_EMBEDDING, "mistral": INPUT_EMBEDDING, "qwen2": INPUT_EMBEDDING,
                       "phi": INPUT_EMBEDDING, "gpt2": "transformer.wte", "bert": "embeddings.word_embeddings"}

    def validate(self):
        check(isinstance(self.token_indices, (list, tuple)), "token_indices", self.token_indices, "must be a list of ints")
        self.token_indices = tuple(self.token_indices)
        check(len(self.token_indices) > 0 and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                  for t in self.token_indices), "token_indices", self.token_indices,
              "must list one or more token ids (integers >= 0)")
        check(len(set(self.token_indices)) == len(self.token_indices), "token_indices", self.token_indices,
              "must not repeat a token (each row is trained once)")

    def tied_targets(self, net, found: list) -> list:
        """A tied lm_head computes with the embedding's rows, so it takes the same D (PEFT's tied adapter)."""
        head = getattr(net, "lm_head", None)
        embeds = [net.get_submodule(p) for p in found]
        tied = head is not None and any(getattr(e, "base_layer", e).weight is getattr(head, "base_layer", head).weight
                                        for e in embeds)
        return ["lm_head"] if tied and "lm_head" not in found else []

    def trainable_count(self, layers: dict, mc) -> int:
        """TRAINABLE_TOKENS-4: k d per embedding; a tied lm_head shares its D."""
        return sum(len(self.token_indices) * d for p, (_, d) in layers.items() if p.split(".")[-1] not in OUTPUT_HEADS)


class TrainableTokensEmbedding(Delta):
    def __init__(self, rows, original, token_indices):
        self.trainable_tokens_delta = rows  # (k, d), a Tensor shared with a tied lm_head's delta
        self.original = original  # (k, d) E[t] when made (an array, not saved), for unmerge
        self.token_indices = list(token_indices)

    @classmethod
    def create_all(cls, bases: dict, cfg: TrainableTokensConfig, rng, init_weights: bool = True):
        deltas = {p: cls.create(b, cfg, p, rng, init_weights) for p, b in bases.items() if isinstance(b, Embedding)}
        for p, b in bases.items():  # TRAINABLE_TOKENS-1: a tied lm_head uses its embedding's D
            if not isinstance(b, Embedding):
                source = next(deltas[q] for q, e in bases.items() if q in deltas and e.weight is b.weight)
                deltas[p] = cls(source.trainable_tokens_delta, source.original, cfg.token_indices)
        return deltas, {}

    @classmethod
    def create(cls, base, cfg: TrainableTokensConfig, path: str, rng, init_weights: bool = True):
        V, d = base.weight.shape
        check(max(cfg.token_indices) < V, f"token_indices (for {path})", max(cfg.token_indices),
              f"must be below the layer's {V} embeddings")
        xp = backend.xp_of(base.weight.data)
        original = xp.take(base.weight.data, backend.asarray(list(cfg.token_indices), "int64"), axis=0)  # (k, d)
        rows = rng.normal((len(cfg.token_indices), d)) if init_weights and not cfg.init_weights else original  # (k, d)
        return cls(trainable(rows), xp.asarray(original, copy=True), cfg.token_indices)

    def positions(self, V: int) -> list:
        """Row v of E' is row pos[v] of [E; D]: V + j for v = t_j, else v."""
        pos = list(range(V))
        for j, t in enumerate(self.token_indices):
            pos[t] = V + j
        return pos

    def adapt(self, x, y, base):  # TRAINABLE_TOKENS-1: the embedding (or tied head) with E' in place of E
        W = take_rows(concat([base.weight, self.trainable_tokens_delta], axis=0), self.positions(base.weight.shape[0]))
        return embedding(W, x) if isinstance(base, Embedding) else linear(x, W, base.bias)  # (V, d) E'

    def merge_into(self, base):  # TRAINABLE_TOKENS-3: E[t] <- D
        self._write(base, self.trainable_tokens_delta.data)

    def unmerge_from(self, base):  # E[t] <- the rows it held
        self._write(base, self.original)

    def _write(self, base, rows):
        W = base.weight.data
        xp = backend.xp_of(W)
        pos = backend.asarray(self.positions(W.shape[0]), "int64")
        base.weight.data = xp.take(xp.concat([W, rows], axis=0), pos, axis=0)  # (V, d) E with rows t replaced


register("trainable_tokens", TrainableTokensConfig, TrainableTokensEmbedding,
         paper="no paper: PEFT's own method, TrainableTokens (Hugging Face PEFT 0.21, peft/tuners/trainable_tokens; "
               "https://github.com/huggingface/peft)",
         summary="TrainableTokens, trained embedding rows D for a few token ids: E'[t_j] = D[j], a tied lm_head "
                 "alike (spec/trainable_tokens.md).")


# ---- LoRA's trainable_token_indices (PEFT's LoraConfig field): the same rows beside a LoRA ------------------------
class TokenAdapter(TrainableTokensEmbedding):
    """TRAINABLE_TOKENS-7: the rows D of a LoRA adapter's trainable_token_indices, saved as PEFT's wrapper names them,
    `<embedding>.token_adapter.trainable_tokens_delta`; a tied lm_head uses the same D and saves nothing."""

    def saved_parameters(self):
        return [] if self.tied else [("token_adapter.trainable_tokens_delta", self.trainable_tokens_delta)]


def token_adapters(net, cfg, model_type: str, rng, init_weights: bool) -> dict:
    """{path: TokenAdapter} for cfg.trainable_token_indices: a list is the input embedding's token ids (PEFT's
    get_input_embeddings), a dict {module name: ids} names the embeddings; a tied lm_head joins its embedding's."""
    spec = getattr(cfg, "trainable_token_indices", None)
    if not spec:
        return {}
    spec = spec if isinstance(spec, dict) else {TrainableTokensConfig.DEFAULT_TARGETS.get(model_type,
                                                                                          INPUT_EMBEDDING): spec}
    out = {}
    for name, ids in spec.items():
        tcfg = TrainableTokensConfig(target_modules=(name,), token_indices=tuple(ids))
        found = [p for p, m in net.named_modules() if isinstance(getattr(m, "base_layer", m), Embedding)
                 and (p == name or p.endswith("." + name))]
        check(bool(found), f"trainable_token_indices[{name!r}]", list(ids), "names no embedding of this model")
        bases = {p: getattr(net.get_submodule(p), "base_layer", net.get_submodule(p))
                 for p in found + tcfg.tied_targets(net, found)}
        made, _ = TrainableTokensEmbedding.create_all(bases, tcfg, rng, init_weights)
        for p, d in made.items():
            out[p] = TokenAdapter(d.trainable_tokens_delta, d.original, d.token_indices)
            out[p].tied = p not in found
    return out
