"""Lily: Low-Rank Interconnected Adaptation across Layers (Zhong, Zhao, Zhou, Findings of ACL 2025,
arXiv:2407.09946), as PEFT 0.21.2's LILY tuner; spec/lily.md.

Symbols: a targeted Linear W0 (m, n) = (out, in), b its bias, x (..., n), tokens t over the whole batch;
    r the rank, E = num_B experts, s = scaling; A (r, n) the local projector (lily_A.weight), B (E r, m) the
    experts stacked (lily_B.weight; expert e is rows e r .. (e + 1) r), R (E, r) the layer's router
    (lily_router.weight).
Forward (LILY-1): z = A x (.., r); p_t = softmax(R z_t) (E,) per token; pbar = mean_t p_t over every token of
    the batch; B* = sum_e pbar_e B_e (r, m); h = W0 x + b + s z B*.
Sharing (LILY-2): targets are grouped by (the target_modules entry the path ends with, W0's shape), in model
    order; a regex string is one entry. In a group of layers l_0, l_1, ..: l_i uses the A of l_(stride_A floor(i /
    stride_A)) and every layer the B of l_0; each layer has its own router.
Targets (LILY-3): target_modules as PEFT's inject_adapter rewrites it before grouping: "all-linear" is the
    full paths of the linear layers but the output head; a list of >= 20 entries is condensed to the shortest
    suffixes that match no other module (as PEFT's _find_minimal_target_modules); a path ending with two entries
    is a ConfigError (PEFT's grouping then follows Python's set order).
Init (LILY-4): A ~ U(+-1/sqrt(n)), R ~ U(+-1/sqrt(r)) (kaiming-uniform, a = sqrt 5); B = 0, so h = W0 x + b at
    step 0; init_weights=False: B ~ U(+-1/sqrt(m)) too.
Trainable (LILY-5): per group of L layers: ceil(L / stride_A) r n + E r m + L E r.
Merge (LILY-6): none: B* depends on the batch's tokens, so there is no fixed dW (PEFT raises too); merging is a
    ConfigError, and so is a GPT-2 Conv1D target or a 4-bit base.
Serialization (LILY-7): peft_type "LILY"; every layer saves <layer>.lily_A.weight (r, n), .lily_B.weight (E r, m)
    and .lily_router.weight (E, r), shared tensors once per layer that uses them (copies must be equal to load);
    fields r, stride_A, num_B, scaling, init_weights.
PEFT parity: peft/tuners/lily/layer.py Linear.forward, LilyLayer.update_layer and reset_lily_parameters;
    model.py LilyModel._post_injection_hook; tuners_utils.py _maybe_include_all_linear_layers and
    _find_minimal_target_modules.
Deviations: a path ending with two target_modules entries is refused (PEFT groups it by set order). Draws come
    from minipeft's RNG, not torch's (the same distributions).
"""
from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..autograd import functional as F
from ..errors import ConfigError
from .base import AdapterConfig, Delta, check, check_peft_linear, fan_in_uniform
from .gralora import general_factor
from .inject import OUTPUT_HEADS, linear_paths
from .registry import register

MERGE_REFUSED = ("Lily cannot be merged: its expert mix B* averages the router over each batch's tokens, so no fixed "
                 "dW exists (PEFT raises too); run the adapter unmerged, or unload() it")
CONDENSED_FROM = 20  # PEFT's MIN_TARGET_MODULES_FOR_OPTIMIZATION: a list this long is condensed (LILY-3)


def _suffixes(path: str) -> list:
    """The dotted suffixes of a path, shortest first: a.b.c -> c, b.c, a.b.c."""
    parts = path.split(".")
    return [".".join(parts[i:]) for i in reversed(range(len(parts)))]


def condensed(entries, others) -> tuple:
    """LILY-3: the shortest suffixes of `entries` (module paths) that are no suffix of any of `others`, taken
    through the entries in the order of their suffix lists, an entry already covered by a taken suffix adding none."""
    other = {s for o in others for s in _suffixes(o)}
    taken = set()
    for item in sorted(entries, key=_suffixes):
        for s in _suffixes(item):
            if s in taken or s in other:
                continue
            if not any(item.endswith("." + t) for t in taken):
                taken.add(s)
                break
    return tuple(sorted(taken)) if taken else tuple(entries)


def groups(layers: dict, target_modules) -> list:
    """LILY-2: the targeted paths {path: (in, out)} as [[path, ...], ...], each group in model order."""
    out = {}
    for path, shape in layers.items():
        if isinstance(target_modules, str):
            key = target_modules
        else:
            ends = sorted({e for e in target_modules if path.endswith(e)})
            check(len(ends) <= 1, "target_modules", list(target_modules),
                  f"{path} ends with {' and '.join(ends)}; PEFT's Lily would share its A and B by whichever of them "
                  f"Python's set order gives last, so keep only one")
            key = ends[0] if ends else path
        out.setdefault((key, tuple(shape)), []).append(path)
    return list(out.values())


@dataclasses.dataclass
class LilyConfig(AdapterConfig):
    rank: int = 32  # r, PEFT's default
    stride_A: int = 1  # consecutive layers of a group sharing one A
    num_B: int = 2  # E experts, shared by every layer of a group
    scaling: float = 1.0  # s, a plain multiplier
    init_weights: bool = True  # True: B = 0 (the base); False: B kaiming too

    peft_type = "LILY"
    PEFT_FIELDS = {"rank": "r", "stride_A": "stride_A", "num_B": "num_B", "scaling": "scaling",
                   "init_weights": "init_weights"}
    PEFT_COMMON = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "exclude_modules")

    def validate(self):
        for field, low, rule in (("rank", 1, "a positive integer (PEFT's r)"),
                                 ("stride_A", 1, "an integer >= 1 (1: every layer its own A)"),
                                 ("num_B", 2, "an integer >= 2 (the router mixes at least two experts)")):
            v = getattr(self, field)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= low, field, v, f"must be {rule}")
        check(isinstance(self.scaling, (int, float)) and not isinstance(self.scaling, bool), "scaling", self.scaling,
              "must be a number")
        check(isinstance(self.init_weights, bool), "init_weights", self.init_weights, "must be True or False")

    def resolve_targets(self, net):
        """LILY-3: target_modules as PEFT rewrites it for this model before it groups the layers."""
        entries = self.target_modules
        if entries == "all-linear":
            entries = tuple(p for p in linear_paths(net) if p.split(".")[-1] not in OUTPUT_HEADS)
        if not isinstance(entries, str) and len(entries) >= CONDENSED_FROM:
            others = [p for p, _ in net.named_modules() if p not in entries and not p.endswith(
                tuple("." + e for e in entries))]
            short = condensed(entries, others)
            entries = short if len(short) < len(entries) else entries
        return dataclasses.replace(self, target_modules=entries) if entries != self.target_modules else self

    def trainable_count(self, layers: dict, mc) -> int:
        """LILY-5: per group of L layers, ceil(L / stride_A) A's, one B, L routers."""
        r, E = self.rank, self.num_B
        total = 0
        for group in groups(layers, self.target_modules):
            n, m = layers[group[0]]
            total += math.ceil(len(group) / self.stride_A) * r * n + E * r * m + len(group) * E * r
        return total


class LilyLinear(Delta):
    def __init__(self, A, B, router, num_B: int, scaling: float):
        self.E, self.s = num_B, scaling
        self.lily_A = A  # Linear (n -> r), shared by stride_A layers of the group
        self.lily_B = B  # Linear (m -> E r): weight (E r, m), shared by the group
        self.lily_router = router  # Linear (r -> E), this layer's own

    @classmethod
    def create_all(cls, bases: dict, cfg: LilyConfig, rng, init_weights: bool = True):
        """LILY-2, LILY-4: the groups' shared A and B, and a router per layer."""
        r, E = cfg.rank, cfg.num_B
        for path, base in bases.items():
            check_peft_linear(base, path, "LILY", "Lily")
        shapes = {p: (b.in_features, b.out_features) for p, b in bases.items()}
        xp = backend.xp_of(next(iter(bases.values())).weight.data)
        f32 = backend.dtype("float32", xp)

        def draw(shape, fan_in, zero=False):
            return xp.zeros(shape, dtype=f32) if zero or not init_weights else fan_in_uniform(rng, shape, fan_in)

        deltas = {}
        for group in groups(shapes, cfg.target_modules):
            n, m = shapes[group[0]]
            B = general_factor(E * r, m, draw((E * r, m), m, zero=cfg.init_weights))  # (E r, m)
            for i, path in enumerate(group):
                if i % cfg.stride_A == 0:
                    A = general_factor(r, n, draw((r, n), n))  # (r, n)
                deltas[path] = cls(A, B, general_factor(E, r, draw((E, r), r)), E, cfg.scaling)
        return deltas, {}

    def adapt(self, x, y, base):  # LILY-1
        z = F.linear(x, self.lily_A.weight)  # (.., r)
        p = F.softmax(F.linear(z, self.lily_router.weight))  # (.., E)
        pbar = p.reshape(-1, self.E).mean(axis=0)  # (E,): over every token of the batch
        r, m = z.shape[-1], self.lily_B.weight.shape[1]
        B_mix = (pbar.reshape(1, self.E) @ self.lily_B.weight.reshape(self.E, r * m)).reshape(r, m)  # (r, m)
        return y + (z @ B_mix) * self.s

    def delta_weight(self):  # LILY-6
        raise NotImplementedError("Lily has no fixed dW: its expert mix depends on each batch's tokens")

    def merge_into(self, base):
        raise ConfigError(MERGE_REFUSED)


register("lily", LilyConfig, LilyLinear, mergeable=False,
         paper="Low-Rank Interconnected Adaptation across Layers, Zhong, Zhao, Zhou, 2024 (Findings of ACL 2025), "
               "arXiv:2407.09946",
         summary="Lily, h = W0 x + s (A x) sum_e pbar_e B_e: A shared by stride_A layers, num_B experts B shared by "
                 "all layers of a target, a router per layer (spec/lily.md).")
