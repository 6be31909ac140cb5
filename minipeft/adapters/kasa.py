"""KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language Models (Wang, Jiang, Park, Kim, Tang,
ICLR 2025, arXiv:2412.06071).

LoRA (lora.py) with a trained diagonal between its factors, over a base whose smallest singular directions
are removed. Symbols: W0 (out, in) the base weight as loaded, k = min(in, out), W0 = U diag(sigma) V^T its
thin SVD (sigma descending), A (r, in), B (out, r), d (r,) PEFT's lora_diag, s = alpha / r (LORA-2).
Truncation (KASA-1): W0_t = U[:, :k-r] diag(sigma[:k-r]) V[:, :k-r]^T replaces W0 when the adapter is made,
    and again when a saved adapter is loaded onto the original base (the adapter was trained on W0_t).
Init (KASA-2): A, B as LoRA's init (B = 0), d ~ N(0, 1): h = W0_t x + b at step 0, not W0 x + b.
Forward (KASA-3): h = W0_t x + b + s (B (d * (A dropout(x))) + b_B)   (b_B: lora_B's bias, with lora_bias).
Delta weight / merge (KASA-4): dW = s B diag(d) A; W <- W0_t + dW (b <- b + s b_B); unmerge gives W0_t back.
Trainable (KASA-5): A, B, d: r (in + out + 1) per layer (+ out with lora_bias); W0_t gets no gradient.
Regularisers (KASA-6): R = sum over layers of beta ||d||^2 + gamma (||B^T B - I||_F + ||A A^T - I||_F),
    added by model.train to the loss of each micro-batch (KaSAHook); model.regularization() returns it.
Serialization (KASA-7): PEFT's LoraConfig with kasa_config {"beta", "gamma"} (peft_type "LORA"); key
    <layer>.lora_diag (r,), next to lora_A.weight and lora_B.weight.
PEFT parity: peft/tuners/lora/variants.py KasaLinearVariant (_truncate_base_weight, forward, _get_delta_weight)
    and _kasa_layer_regularization_loss; LoraModel._get_kasa_loss sums it over the active adapters' layers.
Deviations: the SVD runs in float64 (PEFT's in float32); PEFT leaves the regulariser to the user's loop, where
    model.train adds it (beta = gamma = 0 trains as PEFT's Trainer does); init is "default" or "gaussian" only;
    a KaSA adapter beside a non-KaSA one on the same model is not refused (PEFT refuses it), yet every adapter
    of a layer then runs on the truncated W0.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..autograd import functional as F
from ..autograd.tensor import Tensor
from ..hooks import TrainingHook
from .base import check, check_peft_linear, trainable
from .data_init import sub_config
from .lora import LoRAConfig, LoRALinear
from .registry import register

KASA_DEFAULTS = {"beta": 1e-4, "gamma": 1e-3}  # PEFT's KasaConfig defaults (the paper's GLUE values)


@dataclasses.dataclass
class KaSAConfig(LoRAConfig):
    """LoRAConfig's fields, plus PEFT's kasa_config {"beta", "gamma"} (the regularisers' weights, KASA-6)."""

    kasa_config: dict = dataclasses.field(default_factory=dict)

    PEFT_FLAGS = {"kasa_config": True}
    PEFT_FIELDS = {**LoRAConfig.PEFT_FIELDS, "kasa_config": "kasa_config"}
    INIT_MOVES_OUTPUT = "KaSA truncates W0 to its largest min(in, out) - r singular directions (KASA-1)"

    def validate(self):
        super().validate()
        self.kasa_config = c = sub_config(self.kasa_config, KASA_DEFAULTS, "kasa_config", "KasaConfig")
        for key in KASA_DEFAULTS:
            check(isinstance(c[key], (int, float)) and not isinstance(c[key], bool) and c[key] >= 0,
                  f"kasa_config[{key!r}]", c[key], "must be a number >= 0 (PEFT's KasaConfig)")
        check(self.init in ("default", "gaussian"), "init", self.init,
              "KaSA takes LoRA's 'default' or 'gaussian' init (its B = 0 over the truncated W0)")

    def trainable_count(self, layers: dict, mc) -> int:
        """KASA-5: LoRA's count plus r for d per layer."""
        return super().trainable_count(layers, mc) + sum(self.rank_alpha_for(p)[0] for p in layers)

    def to_peft(self) -> dict:
        d = super().to_peft()
        d["kasa_config"] = dict(self.kasa_config)  # the flag's value is the sub-config itself
        return d


def truncated(W0, r: int):
    """KASA-1: W0 (out, in) without its r smallest singular directions, in float64, cast back to W0's dtype."""
    xp = backend.xp_of(W0)
    W = xp.astype(W0, backend.dtype("float64", xp))  # (out, in)
    U, S, Vh = xp.linalg.svd(W, full_matrices=False)  # (out, k), (k,), (k, in)
    keep = S.shape[0] - r
    return xp.astype((U[:, :keep] * S[None, :keep]) @ Vh[:keep, :], W0.dtype)  # (out, in)


class KaSAHook(TrainingHook):
    """One active KaSA adapter in model.train: its regularisers in the loss (KASA-6)."""

    def __init__(self, name: str, deltas: dict, cfg: KaSAConfig):
        self.key, self.deltas, self.cfg = name, deltas, cfg

    def regularization(self):
        terms = [d.regularization(**self.cfg.kasa_config) for d in self.deltas.values()]
        return sum(terms[1:], terms[0]) if terms else None


class KaSALinear(LoRALinear):
    training_hook = KaSAHook  # model.train's hook of each active adapter (minipeft/hooks.py)
    REWRITES_BASE = True  # create_all truncates each base layer and shares nothing (the audit builds it per layer)

    @classmethod
    def create(cls, base, cfg: KaSAConfig, path: str, rng, init_weights: bool = True):
        check_peft_linear(base, path, "LoRA with kasa_config", "KaSA")
        r, (n, m) = cfg.rank_alpha_for(path)[0], (base.in_features, base.out_features)
        check(r < min(n, m), f"rank (for {path})", r,
              f"must be < min(in={n}, out={m}): KaSA keeps min(in, out) - r > 0 singular directions of W0")
        delta = super().create(base, cfg, path, rng, init_weights)
        delta.lora_diag = trainable(rng.normal((r,)))  # KASA-2: d ~ N(0, 1), (r,)
        return delta

    @classmethod
    def create_all(cls, bases: dict, cfg, rng, init_weights: bool = True):
        """Every layer checked first, then W0 <- W0_t on each (KASA-1), on a load too: a refused layer leaves the
        model as it was."""
        deltas, shared = super().create_all(bases, cfg, rng, init_weights)
        for path, delta in deltas.items():
            bases[path].weight.data = truncated(bases[path].weight.data, delta.lora_diag.shape[0])
        return deltas, shared

    def adapt(self, x, y, base):  # KASA-3
        h = F.dropout(x, self.p, self.rng, self.training)
        return y + self.lora_B(self.lora_A(h) * self.lora_diag) * self.s

    def delta_weight(self):  # KASA-4: s B diag(d) A, (out, in)
        xp = backend.xp_of(self.lora_A.weight.data)
        return xp.matmul(self.lora_B.weight.data * self.lora_diag.data[None, :], self.lora_A.weight.data) * self.s

    def regularization(self, beta: float, gamma: float):
        """KASA-6 of this layer: beta ||d||^2 + gamma (||B^T B - I||_F + ||A A^T - I||_F), a scalar Tensor."""
        A, B, d = self.lora_A.weight, self.lora_B.weight, self.lora_diag  # (r, in), (out, r), (r,)
        eye = Tensor(backend.xp_of(d.data).eye(d.shape[0], dtype=d.dtype))  # (r, r)
        norms = [((G - eye) * (G - eye)).sum().sqrt() for G in (B.T @ B, A @ A.T)]
        return (d * d).sum() * beta + (norms[0] + norms[1]) * gamma


register("kasa", KaSAConfig, KaSALinear,
         paper="KaSA: Knowledge-Aware Singular-Value Adaptation of Large Language Models, Wang et al. 2024, "
               "arXiv:2412.06071",
         summary="LoRA with a trained diagonal, dW = s B diag(d) A, over W0 without its r smallest singular "
                 "directions (spec/kasa.md).")
