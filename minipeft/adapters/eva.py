"""EVA: Explained Variance Adaptation (Paischer, Hauzenberger, Schmied, Alkin, Deisenroth, Hochreiter 2024,
"One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation", arXiv:2410.07170);
PEFT's init_lora_weights="eva" with initialize_lora_eva_weights(model, dataloader).

LoRA (lora.py, spec/lora.md) whose A holds the top right-singular vectors of each layer's inputs on data, and
whose ranks are redistributed across layers by explained variance (data_init.py, METHOD-11).
Symbols: X_l (N, in) layer l's inputs at the counted tokens of the batches seen (attention mask, and labels
    != label_mask_value with use_label_mask), r_l its rank (r or rank_pattern), L the targeted layers,
    k_l = round(rho r_l) its most components, V_l (k_l, in) and S_l (k_l,) its incremental PCA's components
    and singular values, xi_l = S_l^2 / sum((X_l - mean)^2) its explained variance ratios, A (r_l', in), B.
Incremental PCA (EVA-1): per batch, X_c = X - mean(X); after the first, M = [S V; X_c; sqrt(n N / (n + N))
    (mean_seen - mean(X))] (Ross et al., sklearn's IncrementalPCA); M = U S V^T (S descending), each row
    of V signed so its largest |entry| is positive; keep the first k_l. A batch with fewer than k_l rows is
    skipped. Layers whose inputs are equal on the first batch share one PCA (the first in model order).
Convergence (EVA-2): a layer is done when cos(V_i, V_i^prev) >= tau for its first r_l' rows; it then
    sees no more batches unless a new r_l' needs rows not yet done. Batches cycle until all are done.
Ranks (EVA-3): the budget sum_l r_l goes to the largest xi_{l,i} (i < k_l) over all layers (ties in
    layer order); r_l' counts layer l's; a layer sharing a PCA never gets more than the first one;
    sum_l r_l' = sum_l r_l and r_l' <= k_l. A layer with r_l' = 0 is not adapted.
Init (EVA-4): A = V[:r_l'] (whiten: V[:r_l'] / sqrt(S[:r_l'])), B = 0, so h = W0 x + b at step 0; W0 unchanged.
Scaling (EVA-5): adjust_scaling_factors: alpha_l' = alpha_l r_l' / r_l (s_l unchanged); the config saved
    holds rank_pattern {path: r_l' != r}, alpha_pattern {path: alpha_l' != alpha}, target_modules the paths.
Forward, merge, gradients: LoRA's (LORA-3..LORA-5). Serialization (EVA-6): init_lora_weights "eva", eva_config.
PEFT parity: peft/tuners/lora/eva.py get_eva_state_dict, _load_eva_state_dict; peft/utils/incremental_pca.py.
Deviations: PEFT's PCA takes torch.svd_lowrank(q = 2 k_l, 4 power iterations, seed 42) of M, exact only
    where 2 k_l >= in; minipeft takes the exact SVD in float64. PEFT loops forever if never converged;
    minipeft stops after MAX_BATCHES with an error. PEFT shortens target_modules to suffixes at >= 20 layers.
"""
from __future__ import annotations

import collections
import dataclasses
import math

from .. import backend
from ..errors import ConfigError
from .base import check
from .data_init import DataInitConfig, forward, layer_rows, recording, sub_config, token_mask
from .lora import LoRAConfig
from .registry import register

EVA_DEFAULTS = {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100, "whiten": False,
                "adjust_scaling_factors": True}  # PEFT's EvaConfig
MAX_BATCHES = 1000  # EVA-2: forward passes before minipeft gives up on convergence (PEFT has no limit)


class IncrementalPCA:
    """EVA-1: the top k right-singular vectors of the centred rows seen so far, one batch at a time."""

    def __init__(self, k: int):
        self.k, self.n, self.mean, self.m2 = k, 0, None, None  # rows seen, their mean and sum of squared deviations
        self.V = self.S = None
        self.done = [False] * k  # EVA-2, per component

    def step(self, X, tau: float):
        if X.shape[0] < self.k:  # too few rows for k components: skipped, as PEFT does
            return
        xp = backend.xp_of(X)
        N, mu = X.shape[0], xp.mean(X, axis=0)  # (in,)
        Xc = X - mu[None, :]  # (N, in)
        m2 = xp.sum(Xc * Xc, axis=0)
        if self.V is not None:  # the previous components, the batch, and the shift of the mean
            shift = math.sqrt(self.n * N / (self.n + N)) * (self.mean - mu)
            Xc = xp.concat([self.S[:, None] * self.V, Xc, shift[None, :]], axis=0)
            m2 = self.m2 + m2 + shift * shift
            mu = (self.n * self.mean + N * mu) / (self.n + N)
        _, S, Vh = xp.linalg.svd(Xc, full_matrices=False)  # (j,), (j, in)
        top = xp.argmax(xp.abs(Vh), axis=1)
        Vh = Vh * xp.sign(xp.take_along_axis(Vh, top[:, None], axis=1))  # the largest |entry| of each row > 0
        previous = self.V
        self.n, self.mean, self.m2 = self.n + N, mu, m2
        self.V, self.S = Vh[:self.k, :], S[:self.k]  # (k, in), (k,)
        self.ratio = self.S ** 2 / xp.sum(m2)  # xi, (k,)
        if previous is not None:
            cos = xp.sum(self.V * previous, axis=1) / (xp.linalg.vector_norm(self.V, axis=1) *
                                                       xp.linalg.vector_norm(previous, axis=1))
            self.done = [bool(c >= tau) for c in backend.to_host(cos)]


@dataclasses.dataclass
class EVAConfig(DataInitConfig):
    """LoRAConfig's fields, init "eva", and PEFT's eva_config (missing keys take EVA_DEFAULTS)."""

    init: str = "eva"
    eva_config: dict = dataclasses.field(default_factory=dict)

    PEFT_FLAGS = {"init_lora_weights": "eva"}
    PEFT_FIELDS = {**LoRAConfig.PEFT_FIELDS, "eva_config": "eva_config"}

    def validate(self):
        super().validate()
        self.eva_config = c = sub_config(self.eva_config, EVA_DEFAULTS, "eva_config", "EvaConfig")
        check(isinstance(c["rho"], (int, float)) and c["rho"] >= 1.0, "eva_config['rho']", c["rho"], "must be >= 1")
        check(isinstance(c["tau"], (int, float)) and 0.0 <= c["tau"] <= 1.0, "eva_config['tau']", c["tau"],
              "must be in [0, 1]")
        for key in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            check(isinstance(c[key], bool), f"eva_config[{key!r}]", c[key], "must be true or false")

    def max_rank(self, n: int, m: int) -> int:  # EVA-3: r_l' <= k_l <= in; B (out, r_l') may be wider, as PEFT's
        return n

    def from_data(self, model, bases: dict, batches: list):
        c = self.eva_config
        rho = c["rho"] if c["rho"] <= 1000 else min(c["rho"], max(max(p.shape) for p in model.net.parameters())
                                                    // self.rank)  # PEFT's cap on a very large rho
        ranks = {p: self.rank_alpha_for(p)[0] for p in bases}
        most = {p: round(r * rho) for p, r in ranks.items()}  # k_l
        first = self._inputs(model, list(bases), batches[0])
        share = {}  # path -> the path whose PCA it uses (EVA-1)
        for p in bases:
            share[p] = next((q for q in share if share[q] == q and _equal(first[q], first[p])), p)
        for p in bases:
            most[p] = max(most[q] for q in bases if share[q] == share[p])
            check(most[p] <= bases[p].in_features, f"eva_config['rho'] (for {p})", c["rho"],
                  f"gives round(rank * rho) = {most[p]} components, more than its {bases[p].in_features} inputs")
        pca = {p: IncrementalPCA(most[p]) for p in bases if share[p] == p}
        hooks = list(pca)  # PEFT's layer order for ties (EVA-3): the PCA layers, then the others by their PCA's
        order = hooks + sorted((p for p in bases if share[p] != p), key=lambda p: hooks.index(share[p]))
        ranks_now, done, seen = dict(most), {p: False for p in pca}, 0
        while True:
            for p, pc in pca.items():
                ready = all(pc.done[:ranks_now[p]])
                if not done[p] and ready:
                    done[p] = True
                elif done[p] and not ready:
                    done[p] = False
            if all(done.values()):
                break
            if seen >= MAX_BATCHES:
                raise ConfigError(f"EVA: the components of {[p for p in pca if not done[p]]} did not converge in "
                                  f"{MAX_BATCHES} batches (tau={c['tau']}); lower eva_config['tau'] or give more data "
                                  f"(a batch counts for a layer only with >= round(rank * rho) unmasked tokens)")
            live = [p for p in pca if not done[p]]
            X = self._inputs(model, live, batches[seen % len(batches)])
            seen += 1
            for p in live:
                pca[p].step(X[p], c["tau"])
            if all(pc.V is not None for pc in pca.values()):
                ranks_now = _distribute(pca, share, order, most, sum(ranks.values()))
        return self._redistributed(bases, ranks, ranks_now), {
            p: _components(pca[share[p]], r, c["whiten"]) for p, r in ranks_now.items() if r > 0}

    def _inputs(self, model, paths, batch) -> dict:
        """{path: (N, in) float64} the layers' inputs at the counted tokens of one batch (EVA-1)."""
        mask = token_mask(batch, self.eva_config["use_label_mask"], self.eva_config["label_mask_value"])
        with recording(model.net, paths) as seen:
            forward(model, batch)
        return {p: layer_rows(seen[p][0], mask) for p in paths}

    def _redistributed(self, bases, ranks, new):
        """EVA-5: the config with the ranks EVA chose (and their alphas) as patterns over the adapted paths."""
        rank_pattern, alpha_pattern = {}, {}
        for p in bases:
            if new[p] == 0:
                continue
            alpha = self.rank_alpha_for(p)[1]
            if new[p] != ranks[p] and self.eva_config["adjust_scaling_factors"]:
                alpha *= new[p] / ranks[p]
            if new[p] != self.rank:
                rank_pattern[p] = new[p]
            if alpha != self.alpha:
                alpha_pattern[p] = alpha
        return dataclasses.replace(self, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                                   target_modules=tuple(p for p in bases if new[p] > 0))

    def initialise_from(self, delta, base, A):  # EVA-4
        xp = backend.xp_of(base.weight.data)
        delta.lora_A.weight.data = xp.astype(A, base.weight.data.dtype)  # (r', in)
        delta.lora_B.weight.data = xp.zeros_like(delta.lora_B.weight.data)  # (out, r')


def _equal(X, Y) -> bool:
    xp = backend.xp_of(X)
    return X.shape == Y.shape and bool(xp.all(X == Y))


def _distribute(pca, share, order, most, budget) -> dict:
    """EVA-3: {path: r_l'}, the budget's share of each layer among the largest explained variance ratios."""
    keys, values = [], []
    for p in order:
        ratio = backend.to_host(pca[share[p]].ratio[:most[p]])
        keys += [p] * len(ratio)
        values += [float(v) for v in ratio]
    ranked = sorted(range(len(values)), key=lambda i: -values[i])  # stable: ties in layer order
    counts = collections.Counter(keys[i] for i in ranked[:budget])
    out = {p: counts.get(p, 0) for p in share}
    for p, q in share.items():  # a layer sharing q's PCA never gets more than q
        if out[q] < out[p]:
            out[p], out[q] = out[q], out[p]
    return out


def _components(pc, r, whiten):
    """EVA-4: A (r, in) from a converged PCA."""
    A = pc.V[:r, :]
    return A / backend.xp_of(A).sqrt(pc.S[:r])[:, None] if whiten else A


register("eva", EVAConfig, kind="initialiser",
         paper="One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation, Paischer, "
               "Hauzenberger, Schmied, Alkin, Deisenroth, Hochreiter 2024, arXiv:2410.07170",
         summary="EVA, LoRA with A = the top right-singular vectors of each layer's inputs on data (incremental "
                 "PCA) and B = 0, ranks redistributed by explained variance; apply with data= (spec/eva.md).")
