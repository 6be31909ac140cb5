"""OSF: orthogonal subspace fine-tuning, from Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual
Learning (Nayak, Killamsetty, Han, Bhandwaldar, Chanda, Xu, Wang, Pareja, Silkin, Eyceoz, Srivastava 2025,
arXiv:2504.07097), as PEFT 0.21.2's OSF tuner; spec/osf.md.

Symbols: W0 (out, in) = (m, n) frozen base weight, k = min(m, n), e the effective rank (OSF-1's rule), x (..., n);
    W0 = U S V^T its SVD (float32, S descending, each pair's sign fixed as PSOFT-1: U's largest-|.| entry > 0);
    U_hi (m, e), V_hi (e, n) the top e (frozen, kept); U0 (m, k-e), S0 (k-e,), V0 (k-e, n) the rest at creation
    (frozen, kept); U_low, S_low, V_low (PEFT's osf_svd_params) the trained copies of U0, S0, V0.
Rank (OSF-1): e = effective_rank (rank_pattern's first re.search match on the layer path overrides it): None ->
    k // 2; a float in (0, 1] -> int(k e); else int(e); clamped to [0, k]; e = 0 is a ConfigError naming the layer.
Forward (OSF-2): h = W0 x + b + U_low diag(S_low) V_low x - U0 diag(S0) V0 x, so W' = U_hi S_hi V_hi^T +
    U_low S_low V_low (PEFT's rank-2(k-e) factored form).
Gradients (OSF-3): backward projects dU_low <- dU - U_hi (U_hi^T dU) and dV_low <- dV - (dV V_hi^T) V_hi (PEFT's
    gradient hooks; ProjectOut below), dS_low plain: a gradient step keeps U_low, V_low orthogonal to the frozen
    high subspace (the optimizer's own rescaling, AdamW's, may not).
Init (OSF-4): init="default" (PEFT init_weights=True): U_low, S_low, V_low = U0, S0, V0, so h = W0 x + b at step 0;
    "random" (init_weights=False): each ~ N(0, 1).
Merge (OSF-5): W <- W0 + U_low S_low V_low - U0 S0 V0; unmerge subtracts it (PEFT cannot unmerge OSF).
Trainable (OSF-6): (k - e)(m + n + 1) per layer.
Serialization (OSF-7): peft_type "OSF", keys <layer>.osf_svd_params.U_low (m, k-e), .S_low (k-e,), .V_low (k-e, n);
    U0, S0, V0, U_hi, V_hi are not saved (rebuilt from W0 by each library); fields effective_rank, rank_pattern,
    init_weights, target_modules, modules_to_save.
PEFT parity: peft/tuners/osf/utils.py decompose_weight_matrix, layer.py OSFLayer.update_layer, _attach_hooks,
    get_delta_weight, Linear.forward; model.py _create_and_replace (_resolve_rank).
Deviations: unmerge works (PEFT raises); the square-factor shortcut of PEFT's hook (U0 U0^T g) is the same projector
    as g - U_hi U_hi^T g, one formula here; torch.nn.Linear only, as PEFT (GPT-2's Conv1D is a ConfigError where PEFT
    skips it silently).
"""
from __future__ import annotations

import contextlib
import dataclasses
import numbers
import re

from .. import backend
from ..autograd import functional as F
from ..autograd.function import Function
from ..autograd.tensor import Tensor
from ..errors import ConfigError
from ..nn.module import Module
from .base import AdapterConfig, Delta, check, check_peft_linear, trainable
from .psoft import fixed_signs
from .registry import register

INITS = ("default", "random")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj")  # PEFT's llama default


def is_rank(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0


@dataclasses.dataclass
class OSFConfig(AdapterConfig):
    target_modules: tuple | str = LLAMA_TARGETS
    effective_rank: int | float | None = None  # e, the frozen top of W0's spectrum (OSF-1); None: k // 2
    rank_pattern: dict | None = None  # {regex: e} per layer, first re.search match (OSF-1)
    init: str = "default"  # one of INITS (OSF-4)

    peft_type = "OSF"
    PEFT_FIELDS = {"effective_rank": "effective_rank", "rank_pattern": "rank_pattern", "init": "init_weights"}
    PEFT_VALUES = {"init": {"default": True, "random": False}}
    PEFT_COMMON = ("target_modules", "modules_to_save")  # PEFT's OSFConfig has no other layer-selection field

    def validate(self):
        check(self.effective_rank is None or is_rank(self.effective_rank), "effective_rank", self.effective_rank,
              "must be None (half of each layer's min(in, out)), an int >= 1, or a float in (0, 1] (a fraction)")
        for pattern, v in (self.rank_pattern or {}).items():
            check(is_rank(v), f"rank_pattern[{pattern!r}]", v, "must be an int >= 1 or a float in (0, 1]")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"rank_pattern: {pattern!r} is not a regular expression ({e})") from e
        check(self.init in INITS, "init", self.init, f"use one of {', '.join(INITS)} (PEFT: True, False)")

    def rank_of(self, path: str, n: int, m: int) -> int:
        """OSF-1: e for the layer at `path` with in = n, out = m."""
        k, value = min(n, m), self.effective_rank
        for pattern, v in (self.rank_pattern or {}).items():
            if re.search(pattern, path):
                value = v
                break
        if value is None:
            e = k // 2
        elif isinstance(value, float) and 0 < value <= 1:
            e = int(k * value)
        else:
            e = int(value)
        e = max(min(k, e), 0)
        check(e > 0, f"effective_rank (for {path})", value,
              f"leaves e = 0 frozen directions of its min(in, out) = {k}; PEFT refuses it too: give a larger one "
              f"(or a rank_pattern entry for this layer)")
        return e

    def trainable_count(self, layers: dict, mc) -> int:
        """OSF-6: (k - e)(in + out + 1) per layer."""
        return sum((min(n, m) - self.rank_of(p, n, m)) * (n + m + 1) for p, (n, m) in layers.items())


class ProjectOut(Function):
    """OSF-3: X unchanged; backward removes the gradient's part in span(H): g - H (H^T g) for U_low (H = U_hi
    (m, e)), g - (g H^T) H for V_low (H = V_hi (e, n))."""

    def forward(self, X, H, left: bool):
        self.H, self.left = H, left
        return X

    def backward(self, g):
        xp, H = backend.xp_of(g), self.H
        Ht = xp.matrix_transpose(H)
        return (g - xp.matmul(H, xp.matmul(Ht, g)) if self.left else g - xp.matmul(xp.matmul(g, Ht), H),)


class OSFLinear(Delta):
    MIXED_BATCH = True  # y_rows + the rows' own low-rank update (METHOD-6)

    def __init__(self, U, S, Vh, e: int, init: str | None, rng):
        self.high = (U[:, :e], Vh[:e, :])  # U_hi (m, e), V_hi (e, n): frozen, not saved (a tuple is not walked)
        self.init_low = (U[:, e:], S[e:], Vh[e:, :])  # U0 (m, k-e), S0 (k-e,), V0 (k-e, n)
        self.osf_svd_params = Module()
        low = self.init_low if init != "random" else tuple(rng.normal(t.shape) for t in self.init_low)
        for name, t in zip(("U_low", "S_low", "V_low"), low):
            setattr(self.osf_svd_params, name, trainable(backend.xp_of(t).asarray(t, copy=True)))
        self.held = None  # (U_low, V_low) as they are, inside gradient_reference

    @classmethod
    def create(cls, base, cfg: OSFConfig, path: str, rng, init_weights: bool = True):
        check_peft_linear(base, path, "OSF", "OSF")
        n, m = base.in_features, base.out_features
        e = cfg.rank_of(path, n, m)
        xp = backend.xp_of(base.weight.data)
        U, S, Vh = xp.linalg.svd(base.weight_out_in(), full_matrices=False)  # (m, k), (k,), (k, n): float32
        U, Vh = fixed_signs(U, Vh)
        return cls(U, S, Vh, e, cfg.init if init_weights else None, rng)

    @contextlib.contextmanager
    def gradient_reference(self, base):
        """OSF-3 as a function: U_eff = U - U_hi U_hi^T (U - U_now) (and V's alike) has the value U and the exact
        gradient (I - U_hi U_hi^T) dU, ProjectOut's."""
        p = self.osf_svd_params
        self.held = (p.U_low.data, p.V_low.data)
        try:
            yield
        finally:
            self.held = None

    def factors(self):
        """(U_low, V_low) whose backward is OSF-3's projected gradient."""
        p, (Uh, Vh) = self.osf_svd_params, self.high
        if self.held is None:
            return ProjectOut.apply(p.U_low, Tensor(Uh), left=True), ProjectOut.apply(p.V_low, Tensor(Vh), left=False)
        Uh, Vh, (U_now, V_now) = Tensor(Uh), Tensor(Vh), (Tensor(a) for a in self.held)
        return (p.U_low - Uh @ (Uh.T @ (p.U_low - U_now)),  # (m, k-e)
                p.V_low - ((p.V_low - V_now) @ Vh.T) @ Vh)  # (k-e, n)

    def adapt(self, x, y, base):  # OSF-2
        if self.osf_svd_params.S_low.shape[0] == 0:  # e = k: every direction frozen, W' = W0 (an empty sum)
            return y
        U, V = self.factors()
        U0, S0, V0 = (Tensor(t) for t in self.init_low)
        now = F.linear(F.linear(x, V) * self.osf_svd_params.S_low, U)  # (..., m)
        return y + now - F.linear(F.linear(x, V0) * S0, U0)

    def delta_weight(self):  # OSF-5: U_low S_low V_low - U0 S0 V0 (m, n)
        p, (U0, S0, V0) = self.osf_svd_params, self.init_low
        xp = backend.xp_of(U0)
        return xp.matmul(p.U_low.data * p.S_low.data, p.V_low.data) - xp.matmul(U0 * S0, V0)


register("osf", OSFConfig, OSFLinear,
         paper="Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning, Nayak et al. 2025, "
               "arXiv:2504.07097",
         summary="OSF, W0's SVD split at the effective rank: the top frozen, the rest U_low S_low V_low trained with "
                 "gradients projected orthogonal to the top singular vectors (spec/osf.md).")
