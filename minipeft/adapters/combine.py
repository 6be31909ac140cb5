"""Combining LoRA adapters into a new one: PEFT's add_weighted_adapter (spec/lora.md LORA-7..LORA-9, LORA-12).

Symbols, per adapted layer: source i has A_i (r_i, in), B_i (out, r_i), scaling s_i, weight w_i and
delta dW_i = s_i B_i A_i (out, in). The result is a plain LoRA adapter with s = 1 (rank = alpha,
use_rslora off), so every source's scaling is folded into A' and B'.
Exact (LORA-7) "cat":  A' = concat_rows(w_i s_i A_i), B' = concat_cols(B_i);  B' A' = sum_i w_i dW_i.
Factor-wise (LORA-8), equal ranks r at the layer: each merge M below runs once on the A_i with
    weights a_i = sgn(w_i s_i) sqrt|w_i s_i| and once on the B_i with b_i = sqrt|w_i s_i|:
    "linear" (cross terms: B'A' != sum w_i dW_i), "ties", "dare_linear", "dare_ties", "magnitude_prune".
SVD (LORA-9): D = M(dW_i; w_i) with M = task arithmetic for "svd", or the merge named by "<M>_svd";
    D = U S Vh, B' = U[:, :k] S[:k], A' = Vh[:k] (k = svd_rank or max r_i), then optionally each
    entry clamped to [-q, q], q = quantile(concat(B', A'), svd_clamp).
Merges on same-shape tensors t_i (the array arithmetic is elementwise):
    task arithmetic  sum_i w_i t_i
    prune_mag(t, d)  keep the int(d * numel) entries of largest |t|, zero the rest (d >= 1: t)
    prune_rand(t, d) t * Bernoulli(d) / d (d >= 1: t), drawn from backend.RNG(seed)
    elect            e = sgn+(sum_i t_i) ("total") or sgn+(sum_i sgn t_i) ("frequency"), sgn+(0) = +1
    disjoint mean    sum_i w_i t_i [sgn t_i = e] / max(#{i: sgn t_i = e}, 1)
    ties = prune_mag, elect, disjoint mean; dare_ties = prune_rand, elect, disjoint mean;
    dare_linear = prune_rand, task arithmetic; magnitude_prune = prune_mag, task arithmetic.
A single source is always combined with "linear" (exact then: B'A' = w s B A), as PEFT does.
lora_B biases (lora_bias) combine as b' = sum_i w_i s_i b_i.
PEFT parity: peft/tuners/lora/model.py add_weighted_adapter, peft/utils/merge_utils.py.
Deviations (LORA-12): rsLoRA sources give s = 1 here (PEFT keeps use_rslora, so s = sqrt(r'));
    ranks are checked and recorded per layer (PEFT: per config, and rank_pattern results do not
    reload); lora_B biases are combined (PEFT drops them); a modules_to_save copy of the one source
    that has it is copied (PEFT starts from the original module); dare_* draw from NumPy's PCG64,
    not torch's generator, so their masks differ from PEFT's.
"""
from __future__ import annotations

import dataclasses
import math
import re

from .. import backend
from ..errors import ConfigError
from . import inject
from .lora import LoRAConfig, LoRALinear
from .modules_to_save import TrainedCopy


@dataclasses.dataclass
class Knobs:
    density: float
    majority_sign_method: str
    rng: backend.RNG


# ---- merges of same-shape tensors ------------------------------------------------------------------
def task_arithmetic(ts, ws, k: Knobs):
    """sum_i w_i t_i."""
    return sum(w * t for w, t in zip(ws, ts))


def prune_mag(t, density: float):
    """Keep the int(density * numel) entries of largest |t| (ties: the lower flat index), zero the rest."""
    if density >= 1:
        return t
    xp = backend.xp_of(t)
    flat = xp.reshape(xp.abs(t), (-1,))
    order = backend.argsort_stable(-flat)  # flat indices, largest |t| first
    place = backend.argsort_stable(order)  # each entry's place in that order
    keep = xp.reshape(place < int(density * flat.shape[0]), t.shape)
    return xp.where(keep, t, xp.zeros_like(t))


def prune_rand(t, density: float, rng):
    """t * m / density with m ~ Bernoulli(density) per entry (DARE's drop and rescale)."""
    if density >= 1:
        return t
    xp = backend.xp_of(t)
    keep = rng.uniform(t.shape, 0.0, 1.0, dtype="float64") < density
    return xp.where(keep, t / density, xp.zeros_like(t))


def disjoint_mean(ts, ws, method: str):
    """e = sgn+(sum_i t_i) or sgn+(sum_i sgn t_i); sum_i w_i t_i [sgn t_i = e] / max(count, 1)."""
    xp = backend.xp_of(ts[0])
    signs = [xp.sign(t) for t in ts]
    votes = sum(ts) if method == "total" else sum(signs)
    one = xp.ones_like(votes)
    elected = xp.where(votes >= 0, one, -one)
    agree = [xp.astype(sg == elected, ts[0].dtype) for sg in signs]
    count = sum(agree)
    return sum(w * t * a for w, t, a in zip(ws, ts, agree)) / xp.where(count < 1, 1.0, count)


def magnitude_prune(ts, ws, k: Knobs):
    """sum_i w_i prune_mag(t_i, density)."""
    return task_arithmetic([prune_mag(t, k.density) for t in ts], ws, k)


def ties(ts, ws, k: Knobs):
    """TIES (arXiv:2306.01708): prune_mag, elect the sign, disjoint mean."""
    return disjoint_mean([prune_mag(t, k.density) for t in ts], ws, k.majority_sign_method)


def dare_linear(ts, ws, k: Knobs):
    """DARE (arXiv:2311.03099): sum_i w_i prune_rand(t_i, density)."""
    return task_arithmetic([prune_rand(t, k.density, k.rng) for t in ts], ws, k)


def dare_ties(ts, ws, k: Knobs):
    """prune_rand, elect the sign, disjoint mean."""
    return disjoint_mean([prune_rand(t, k.density, k.rng) for t in ts], ws, k.majority_sign_method)


MERGES = {"linear": task_arithmetic, "ties": ties, "dare_linear": dare_linear, "dare_ties": dare_ties,
          "magnitude_prune": magnitude_prune}
COMBINATIONS = ("cat", "svd", *MERGES, *(f"{m}_svd" for m in MERGES if m != "linear"))


# ---- one layer: the sources' deltas in, (A', B') out --------------------------------------------------
def cat(deltas, ws):
    """LORA-7: A' = concat_rows(w_i s_i A_i), B' = concat_cols(B_i); exact."""
    xp = backend.xp_of(deltas[0].lora_A.weight.data)
    A = xp.concat([w * d.s * d.lora_A.weight.data for d, w in zip(deltas, ws)], axis=0)  # (sum r_i, in)
    B = xp.concat([d.lora_B.weight.data for d in deltas], axis=1)  # (out, sum r_i)
    return A, B


def factorwise(merge, deltas, ws, k: Knobs):
    """LORA-8: A' = M(A_i; sgn(w_i s_i) sqrt|w_i s_i|), B' = M(B_i; sqrt|w_i s_i|)."""
    roots = [math.sqrt(abs(w * d.s)) for d, w in zip(deltas, ws)]
    a = [r if w * d.s >= 0 else -r for r, d, w in zip(roots, deltas, ws)]
    A = merge([d.lora_A.weight.data for d in deltas], a, k)  # (r, in)
    B = merge([d.lora_B.weight.data for d in deltas], roots, k)  # (out, r)
    return A, B


def svd_split(merge, deltas, ws, k: Knobs, rank: int, clamp):
    """LORA-9: D = M(dW_i; w_i) = U S Vh; B' = U[:, :rank] S[:rank], A' = Vh[:rank], optionally clamped."""
    D = merge([d.delta_weight() for d in deltas], ws, k)  # (out, in)
    xp = backend.xp_of(D)
    if rank > min(D.shape):
        raise ConfigError(f"svd_rank={rank} exceeds min(out, in) = {min(D.shape)} of a {D.shape} layer")
    U, S, Vh = xp.linalg.svd(D, full_matrices=False)  # (out, q), (q,), (q, in)
    B, A = U[:, :rank] * S[None, :rank], Vh[:rank, :]  # (out, rank), (rank, in)
    if clamp is not None:
        q = quantile(xp.concat([xp.reshape(B, (-1,)), xp.reshape(A, (-1,))]), clamp)
        B, A = xp.clip(B, -q, q), xp.clip(A, -q, q)
    return A, B


def quantile(v, q: float):
    """The q-quantile of a 1-d array, linear interpolation between order statistics (torch/NumPy default)."""
    xp = backend.xp_of(v)
    s = xp.sort(v)
    pos = q * (s.shape[0] - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))


def combine_layer(combination, deltas, ws, k: Knobs, svd_rank, clamp, where: str):
    if combination == "cat":
        return cat(deltas, ws)
    ranks = [d.lora_A.weight.shape[0] for d in deltas]
    if combination.endswith("svd"):
        merge = MERGES[combination[:-len("_svd")]] if combination != "svd" else task_arithmetic
        return svd_split(merge, deltas, ws, k, svd_rank or max(ranks), clamp)
    equal_ranks(combination, deltas, where)
    return factorwise(MERGES[combination], deltas, ws, k)


def equal_ranks(combination, deltas, where: str) -> None:
    """LORA-8's factor-wise merges need one rank r at the layer."""
    ranks = [d.lora_A.weight.shape[0] for d in deltas]
    if len(set(ranks)) > 1:
        raise ConfigError(f"combination {combination!r} needs equal ranks, but at {where} the ranks are {ranks}; "
                          "use 'cat' (exact) or 'svd'")


# ---- the model-level operation --------------------------------------------------------------------------
def add_weighted_adapter(model, weights: dict, name: str, combination: str = "linear", svd_rank=None,
                         density: float = 0.5, majority_sign_method: str = "total", seed: int = 0,
                         svd_clamp=None):
    """Add LoRA adapter `name` = the weighted combination of the adapters in `weights` ({name: w})."""
    names = _check_args(model, weights, name, combination, svd_rank, density, majority_sign_method, svd_clamp)
    if len(names) == 1:
        combination = "linear"  # exact for one source (PEFT does the same)
    k = Knobs(float(density), majority_sign_method, backend.RNG(seed))
    new = {}  # path -> (A', B', b' or None)
    for path, layer in inject.adapted_layers(model.net):
        parts = [(layer.adapters[n], float(weights[n])) for n in names if n in layer.adapters]
        if not parts:
            continue
        for d, _ in parts:
            if type(d) is not LoRALinear:
                raise ConfigError(f"merge_adapters combines plain LoRA adapters; {path} holds a {type(d).__name__}")
        deltas, ws = [d for d, _ in parts], [w for _, w in parts]
        A, B = combine_layer(combination, deltas, ws, k, svd_rank, svd_clamp, path)
        biases = [w * d.s * d.lora_B.bias.data for d, w in parts if d.lora_B.bias is not None]  # (out,) each
        new[path] = A, B, (sum(biases) if biases else None)
    owners = _trained_copy_owners(model, names)
    lora_bias = any(b is not None for _, _, b in new.values())
    cfg = _new_config(model, names, {p: A.shape[0] for p, (A, _, _) in new.items()}, lora_bias)
    model.apply_adapter(cfg, name, init_weights=False)
    for path, (A, B, b) in new.items():
        delta = model.net.get_submodule(path).adapters[name]
        delta.lora_A.weight.data, delta.lora_B.weight.data = A, B
        if b is not None:
            delta.lora_B.bias.data = b
    for path, owner in owners.items():  # modules_to_save: copy the one source's trained module
        src = dict(model.net.get_submodule(path).modules_to_save[owner].named_parameters())
        for pname, p in model.net.get_submodule(path).modules_to_save[name].named_parameters():
            p.data = backend.xp_of(src[pname].data).asarray(src[pname].data, copy=True)


def _check_args(model, weights, name, combination, svd_rank, density, sign_method, svd_clamp) -> list:
    if not isinstance(weights, dict) or not weights:
        raise ConfigError("weights must be a non-empty dict {adapter name: weight}")
    for n, w in weights.items():
        if n not in model.peft_configs:
            raise ConfigError(f"no adapter named {n!r}; the model has {sorted(model.peft_configs) or 'none'}")
        if not isinstance(model.peft_configs[n], LoRAConfig):
            raise ConfigError(f"adapter {n!r} is a {type(model.peft_configs[n]).__name__}; only LoRA adapters combine")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"weight of {n!r} must be a finite number, got {w!r}")
    if name in model.peft_configs:
        raise ConfigError(f"an adapter named {name!r} exists already; pick another name or delete_adapter() it")
    if combination not in COMBINATIONS:
        raise ConfigError(f"combination={combination!r} is unknown; use one of {', '.join(COMBINATIONS)}")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ConfigError(f"svd_rank={svd_rank!r} must be a positive integer or None")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ConfigError(f"density={density!r} must lie in (0, 1]")
    if sign_method not in ("total", "frequency"):
        raise ConfigError(f"majority_sign_method={sign_method!r}: use 'total' or 'frequency'")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise ConfigError(f"svd_clamp={svd_clamp!r} must lie in [0, 1] (a quantile) or be None")
    return list(weights)


def _new_config(model, names, ranks: dict, lora_bias: bool) -> LoRAConfig:
    """The first source's config with s = 1 at every layer: rank = alpha = the most common new rank,
    the other layers in rank_pattern = alpha_pattern (keys are escaped full paths)."""
    cfgs = [model.peft_configs[n] for n in names]
    values = list(ranks.values())
    r = max(set(values), key=lambda v: (values.count(v), v))
    pattern = {re.escape(p): v for p, v in ranks.items() if v != r}
    modules_to_save = tuple(dict.fromkeys(e for c in cfgs for e in c.modules_to_save))
    cfg = dataclasses.replace(cfgs[0], rank=r, alpha=r, use_rslora=False, rank_pattern=pattern,
                              alpha_pattern=dict(pattern), init="default", lora_bias=lora_bias,
                              modules_to_save=modules_to_save, target_modules=_union_targets(cfgs))
    try:
        if set(inject.find_targets(model.net, cfg)) == set(ranks):
            return cfg
    except ConfigError:
        pass
    # the sources' selectors do not combine into one that picks exactly these layers: name them
    return dataclasses.replace(cfg, target_modules=tuple(ranks), layers_to_transform=None, layers_pattern=None,
                               exclude_modules=())


def _union_targets(cfgs):
    tms = [c.target_modules for c in cfgs]
    if all(t == tms[0] for t in tms):
        return tms[0]
    if all(isinstance(t, tuple) for t in tms):
        return tuple(dict.fromkeys(e for t in tms for e in t))
    if all(isinstance(t, str) and t != "all-linear" for t in tms):
        return "|".join(f"({t})" for t in tms)
    return tms[0]  # mixed kinds: _new_config falls back to full paths


def _trained_copy_owners(model, names) -> dict:
    """{path: the one source that trains a copy of the module there (modules_to_save)}."""
    owners = {}
    for path, m in model.net.named_modules():
        if isinstance(m, TrainedCopy):
            have = [n for n in names if n in m.modules_to_save]
            if len(have) > 1:
                raise ConfigError(f"adapters {have} each train their own copy of {path} (modules_to_save); "
                                  "such copies cannot be combined")
            if have:
                owners[path] = have[0]
    return owners
