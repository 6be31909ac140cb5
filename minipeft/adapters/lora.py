"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al. 2021, arXiv:2106.09685).

Symbols: W0 (out, in) frozen base weight, A (r, in), B (out, r), s scaling, x (..., in).
Scaling (LORA-2): s = alpha / r, or alpha / sqrt(r) with use_rslora (rsLoRA, arXiv:2312.03732).
Forward (LORA-3): h = W0 x + b + s (B A dropout(x) + b_B)   (b_B: lora_B's bias, with lora_bias).
Delta weight / merge (LORA-4): W <- W0 + s B A (and b <- b + s b_B); unmerge subtracts them (W0 to rounding).
Init (LORA-1): "default": A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt 5), B = 0, so
    h = W0 x at step 0. "gaussian": A ~ N(0, 1/r), B = 0.
    "pissa" (arXiv:2404.02948): W0 = U S V^T, A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s),
    W0 <- W0 - s B A (the residual absorbs the principal part: h unchanged at step 0, LORA-6).
    "olora" (arXiv:2406.01775): W0 = Q R, B = Q[:, :r], A = R[:r], W0 <- W0 - s B A (LORA-6).
    Loading a PiSSA/OLoRA adapter recomputes this residual first, as PEFT does.
    PEFT's other named inits are methods of kind "initialiser" (METHOD-10), LoRAInitConfig subclasses
    with a file each: orthogonal.py, mica.py, loftq.py.
Trainable (LORA-5): A, B (and biases by `bias`: "none" | "all" | "lora_only"); W0 gets no gradient.
PEFT parity: peft/tuners/lora/layer.py Linear.forward, get_delta_weight; keys lora_A.weight (r, in),
    lora_B.weight (out, r); GPT-2 Conv1D keeps these shapes and transposes only dW (fan_in_fan_out).
Combining adapters (LORA-7..LORA-9, LORA-12): adapters/combine.py. Targeting (LORA-10): adapters/inject.py.
An embedding in target_modules gets LoRAEmbedding (adapters/lora_embedding.py, LORA-15..LORA-18).
Deviations: none known.
"""
from __future__ import annotations

import dataclasses
import math
import re

from .. import backend
from ..autograd import functional as F
from ..nn.layers import Embedding, Linear
from ..errors import ConfigError
from .base import AdapterConfig, Delta, check, fan_in_uniform
from .layer_replication import check_layer_map
from .lora_embedding import LoRAEmbedding
from .registry import initialiser_names, register


@dataclasses.dataclass
class LoRAConfig(AdapterConfig):
    rank: int = 8
    alpha: float = 16
    dropout: float = 0.0
    bias: str = "none"  # "none" | "all" | "lora_only"
    use_rslora: bool = False
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    init: str = "default"  # a key of INITS
    lora_bias: bool = False  # a trainable bias on lora_B (PEFT's lora_bias)
    trainable_token_indices: tuple[int, ...] | dict | None = None  # TRAINABLE_TOKENS-7: token ids, or {embedding: ids}
    layer_replication: object = None  # LORA-14: [[start, end), ...] ranges of layers stacked, copies sharing weights
    target_parameters: tuple | None = None  # LORA-19: parameter names ("q_proj.weight"): LoRA on that Linear's weight

    peft_type = "LORA"
    EMBEDDINGS = True  # an embedding in target_modules gets LoRAEmbedding (lora_embedding.py, LORA-15..18)
    PEFT_FIELDS = {"rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "bias": "bias",
                   "use_rslora": "use_rslora", "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern",
                   "init": "init_lora_weights", "lora_bias": "lora_bias",
                   "trainable_token_indices": "trainable_token_indices", "layer_replication": "layer_replication",
                   "target_parameters": "target_parameters"}
    PEFT_VALUES = {"init": {"default": True}}

    def validate(self):
        check_rank_alpha(self)
        check(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, "dropout", self.dropout,
              "must be in [0, 1)")
        check(self.bias in ("none", "all", "lora_only"), "bias", self.bias, "use 'none', 'all' or 'lora_only'")
        self.check_init()
        self.layer_replication = check_layer_map(self.layer_replication)
        if self.target_parameters is not None:
            self.target_parameters = tuple(self.target_parameters)
        if self.target_parameters:  # LORA-19: PEFT's ParamWrapper refuses these too
            check(type(self) is LoRAConfig, "target_parameters", self.target_parameters,
                  f"is for plain LoRA (PEFT refuses it with LoRA variants); {type(self).__name__} takes target_modules")
            for field, ok in (("dropout", self.dropout == 0), ("lora_bias", not self.lora_bias),
                              ("init", self.init in ("default", "gaussian"))):
                check(ok, field, getattr(self, field), "must be 0 / False / 'default' or 'gaussian' with "
                      "target_parameters (PEFT's ParamWrapper refuses dropout and lora_bias); use target_modules")
        tokens = self.trainable_token_indices
        for ids in (tokens.values() if isinstance(tokens, dict) else [tokens] if tokens is not None else []):
            check(isinstance(ids, (list, tuple)) and len(ids) > 0 and len(set(ids)) == len(ids)
                  and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids),
                  "trainable_token_indices", tokens, "must list distinct token ids (integers >= 0), or map embedding "
                  "names to such lists")

    def check_init(self):
        """LORA-11: init is one of INITS; an initialiser method (METHOD-10) is named by its own config."""
        own = initialiser_names()
        hint = f" (for {self.init!r} use its own config, {own[self.init]}, or apply_{self.init})" if self.init in own else ""
        check(self.init in INITS, "init", self.init, f"use one of {', '.join(INITS)}{hint}")

    def initialiser(self, path: str = ""):
        """(init function, whether it rewrites W0) for this config's init (LORA-1, LORA-6) at the layer `path`;
        an initialiser method (METHOD-10) is a LoRAConfig subclass that gives its own."""
        return INITS[self.init], self.init in MUTATING

    def max_rank(self, n: int, m: int) -> int:
        """The largest rank a layer with n inputs and m outputs takes (LORA-11's bound)."""
        return min(n, m)

    def rank_alpha_for(self, path: str):
        """(r, alpha) of one module: the first rank_pattern/alpha_pattern key matching
        `(.*\\.)?(key)$` wins (PEFT's rule), else the config's own."""
        return (_first_match(self.rank_pattern, path, self.rank), _first_match(self.alpha_pattern, path, self.alpha))

    def trainable_count(self, layers: dict, mc) -> int:
        """LORA-5: r (in + out) per layer (r from rank_pattern), plus out for lora_B's bias with lora_bias."""
        return sum(self.rank_alpha_for(p)[0] * (n + m) + (m if self.lora_bias else 0) for p, (n, m) in layers.items())


@dataclasses.dataclass
class LoRAInitConfig(LoRAConfig):
    """The config of an initialiser method (METHOD-10): LoRA whose `init` is fixed to the method's name (saved as
    init_lora_weights, which PEFT_FLAGS holds so that the adapter loads as this config), run by `initialise`."""

    REWRITES_W0 = False  # the init replaces W0 (then it runs on load too, LORA-6)
    STEP0_RTOL = 1e-6  # METHOD-5: the output at step 0 equals the base's to this relative error

    def check_init(self):
        own = self.PEFT_FLAGS["init_lora_weights"]
        check(self.init == own, "init", self.init, f"is {own!r} for {type(self).__name__}; for another init use LoRAConfig")

    def initialiser(self, path: str = ""):
        return self.initialise, self.REWRITES_W0

    def initialise(self, delta, base, rng):
        raise NotImplementedError


def check_rank_alpha(cfg):
    """rank, alpha, rank_pattern and alpha_pattern (LORA-11); LoHa and LoKr check theirs with it too."""
    check(isinstance(cfg.rank, int) and cfg.rank > 0, "rank", cfg.rank, "must be a positive integer")
    check(isinstance(cfg.alpha, (int, float)) and cfg.alpha > 0, "alpha", cfg.alpha, "must be > 0")
    for field in ("rank_pattern", "alpha_pattern"):
        for k, v in getattr(cfg, field).items():
            check(isinstance(v, (int, float)) and v > 0, f"{field}[{k!r}]", v, "must be > 0")


def _first_match(pattern: dict, path: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def lora_scaling(alpha, r, use_rslora: bool) -> float:
    """LORA-2, the one place the scaling rule is written."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(Delta):
    MIXED_BATCH = True  # PEFT's _mixed_batch_forward: y_rows + s B A dropout(x_rows) (METHOD-6)

    def __init__(self, in_features, out_features, r, s, dropout, lora_bias, rng):
        self.s, self.p, self.rng = s, dropout, rng
        self.lora_A = Linear(in_features, r, bias=False)  # (r, in)
        self.lora_B = Linear(r, out_features, bias=lora_bias)  # (out, r)

    @classmethod
    def create(cls, base, cfg: LoRAConfig, path: str, rng, init_weights: bool = True):
        """The delta for the layer at `path`; init_weights=False leaves A, B for a load to fill, except
        that PiSSA/OLoRA still replace W0 by its residual W0 - s B A (the adapter was trained on it)."""
        r, alpha = cfg.rank_alpha_for(path)
        if isinstance(base, Embedding):  # LORA-15: PEFT's lora.Embedding
            return LoRAEmbedding.create(base, cfg, path, rng, init_weights, r, lora_scaling(alpha, r, cfg.use_rslora))
        n, m = base.in_features, base.out_features
        bound = cfg.max_rank(n, m)
        check(r <= bound, f"rank (for {path})", r,
              f"must be <= min(in={n}, out={m})" if bound == min(n, m) else f"must be <= {bound} (in={n}, out={m})")
        initialise, rewrites = cfg.initialiser(path)
        check(not rewrites or isinstance(base, Linear), f"init (for {path})", cfg.init,
              "rewrites W0, which a 4-bit layer cannot hold; use 'default' or 'gaussian', or apply it to the "
              "float model (load_model without quantization=)")
        delta = cls(n, m, r, lora_scaling(alpha, r, cfg.use_rslora), cfg.dropout, cfg.lora_bias, rng)
        if init_weights or rewrites:  # a loaded PiSSA/OLoRA adapter needs W0's residual, as in PEFT
            initialise(delta, base, rng)
        return delta

    def adapt(self, x, y, base):  # LORA-3
        h = F.dropout(x, self.p, self.rng, self.training)
        return y + self.lora_B(self.lora_A(h)) * self.s

    def delta_weight(self):  # LORA-4: s B A, (out, in)
        xp = backend.xp_of(self.lora_A.weight.data)
        return xp.matmul(self.lora_B.weight.data, self.lora_A.weight.data) * self.s

    def merge_into(self, base):  # LORA-4: W <- W + s B A, and b <- b + s b_B with lora_bias
        if self.lora_B.bias is not None and base.bias is None:
            raise ConfigError("lora_bias=True: this layer has no bias to merge lora_B.bias into (PEFT refuses too)")
        super().merge_into(base)
        if self.lora_B.bias is not None:
            base.bias.data = base.bias.data + self.lora_B.bias.data * self.s

    def unmerge_from(self, base):
        super().unmerge_from(base)
        if self.lora_B.bias is not None and base.bias is not None:  # (PiSSA's init unmerges a zero b_B)
            base.bias.data = base.bias.data - self.lora_B.bias.data * self.s


# ---- initialisations (LORA-1, LORA-6) ----------------------------------------------------------
def init_default(delta, base, rng):
    r, n = delta.lora_A.weight.shape
    delta.lora_A.weight.data = fan_in_uniform(rng, (r, n), n)


def init_gaussian(delta, base, rng):
    r, n = delta.lora_A.weight.shape
    delta.lora_A.weight.data = rng.normal((r, n), std=1.0 / r)


def init_pissa(delta, base, rng):
    xp = backend.xp_of(base.weight.data)
    r = delta.lora_A.weight.shape[0]
    U, S, Vh = xp.linalg.svd(base.weight_out_in(), full_matrices=False)  # (out, k), (k,), (k, in)
    root = xp.sqrt(S[:r] / delta.s)  # (r,)
    delta.lora_A.weight.data = root[:, None] * Vh[:r, :]  # (r, in)
    delta.lora_B.weight.data = U[:, :r] * root[None, :]  # (out, r)
    delta.unmerge_from(base)  # W0 <- W0 - s B A


def init_olora(delta, base, rng):
    xp = backend.xp_of(base.weight.data)
    r = delta.lora_A.weight.shape[0]
    Q, R = xp.linalg.qr(base.weight_out_in())  # (out, k), (k, in)
    delta.lora_A.weight.data = xp.asarray(R[:r, :], copy=True)
    delta.lora_B.weight.data = xp.asarray(Q[:, :r], copy=True)
    delta.unmerge_from(base)


INITS = {"default": init_default, "gaussian": init_gaussian, "pissa": init_pissa, "olora": init_olora}
MUTATING = ("pissa", "olora")  # inits that change W0


register("lora", LoRAConfig, LoRALinear, paper="LoRA: Low-Rank Adaptation of Large Language Models, Hu et al. 2021, arXiv:2106.09685",
         summary="LoRA, dW = s B A with A (r, in), B (out, r) trained and W0 frozen (spec/lora.md).")
