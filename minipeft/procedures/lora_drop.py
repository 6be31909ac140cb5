"""LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation (Zhou, Lu, Xu, Zhu, Zhao, Yang 2024,
arXiv:2402.07721), as a training hook (spec/lora_drop.md). A plain LoRA trains for warmup_steps; then each LoRA
layer's output is measured on a sample of the training data, the important layers keep their LoRA, and the others
of the same module type share one. x_t a layer's input at a counted token t of the sample, s B A its LoRA:

  LORA_DROP-1 sample: ceil(sample_ratio N) of the N training records, drawn without replacement by
              backend.RNG(seed) (in record order), read with the LoRA in eval mode after step warmup_steps - 1.
  LORA_DROP-2 importance: g_i = mean_t ||s B_i A_i x_t||^2; within a module type (the last name of the path,
              q_proj, v_proj, ...) I_i = g_i / sum_j g_j, so each type's importances sum to 1.
  LORA_DROP-3 selection: per type, the layers by I_i descending (model order on ties); kept: the shortest prefix
              whose sum is >= threshold (all of them if every g_i is 0); the rest is dropped.
  LORA_DROP-4 sharing: the dropped layers of a type share ONE LoRA: the first of them (model order) owns it,
              the others' lora_A and lora_B are that owner's modules; it starts new (A LoRA's default init from
              the same RNG, B = 0, its AdamW moments zero), each layer keeping its own s. The other dropped
              factors stop training (no gradient, moments dropped). Training then continues.
  LORA_DROP-5 resume: the hook's state holds the selection; a checkpoint after it resumes to the uninterrupted
              run's losses and factors bit for bit (the sharing is rebuilt before the first resumed step).
  LORA_DROP-6 save: a plain PEFT LoRA folder (peft_type LORA), the shared LoRA written under every sharing
              layer; it loads here and in PEFT as LoRA with the same logits (the sharing itself is not saved).

Deviations: the paper samples D_s by stratified sampling over its classification labels; minipeft's records are
language-model text, so the sample is uniform. How the second stage starts is not fixed by the text read
(spec/lora_drop.md, "Sources"): this follows issue 16 (training continues, the shared LoRA starts new).
"""
from __future__ import annotations

import dataclasses
import math

from .. import backend
from ..adapters.data_init import collated, forward, layer_rows, recording, token_mask
from ..adapters.lora import init_default
from ..adapters.registry import register
from ..errors import ConfigError
from ..hooks import TrainingHook
from ..optimizers.checks import number
from .dylora import lora_layers
from .merging import check_moments
from .relora import positive_int


@dataclasses.dataclass
class LoRADropConfig:
    warmup_steps: int  # optimizer steps of plain LoRA before the importance is measured
    threshold: float = 0.9  # T: the cumulative importance the kept layers of a module type reach (the paper's 0.9)
    sample_ratio: float = 0.1  # alpha: the share of the training records the importance is measured on
    batch_size: int = 8  # records per forward pass of the measurement
    seed: int = 0  # the sample and the shared LoRA's A draw from backend.RNG(seed)

    def __post_init__(self):
        positive_int("LoRADropConfig", "warmup_steps", self.warmup_steps)
        for field in ("threshold", "sample_ratio"):
            v = getattr(self, field)
            number("LoRADropConfig", field, v)
            if not v <= 1:
                raise ConfigError(f"LoRADropConfig.{field}={v!r} must be in (0, 1]")
        positive_int("LoRADropConfig", "batch_size", self.batch_size)
        positive_int("LoRADropConfig", "seed", self.seed, 0)


def module_type(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def select(importance: dict, threshold: float) -> tuple[list, list]:
    """LORA_DROP-3 for one module type: (kept, dropped) paths of {path: I} (I sums to 1, or all 0), in model order."""
    paths = list(importance)
    if not any(importance.values()):
        return paths, []
    ranked = sorted(paths, key=lambda p: (-importance[p], paths.index(p)))
    kept, total = [], 0.0
    for p in ranked:
        if total >= threshold:
            break
        kept.append(p)
        total += importance[p]
    return [p for p in paths if p in kept], [p for p in paths if p not in kept]


class LoRADropHook(TrainingHook):
    """LoRA-drop in model.train: TrainingConfig(hooks=[LoRADropHook(model, LoRADropConfig(warmup_steps=K), data)]),
    `data` the training records (as model.train reads them) the importance is measured on a sample of."""
    key = "lora_drop"
    NEEDS_DATA = True  # the CLI passes its --data

    def __init__(self, model, opts: LoRADropConfig, data, adapter: str = "default", max_length: int | None = None):
        if adapter not in model.peft_configs:
            raise ConfigError(f"LoRA-drop: the model has no adapter {adapter!r}: apply_lora first")
        found = [(p, d) for p, _, d in lora_layers(model, adapter, "LoRA-drop") if d.lora_B.weight.requires_grad]
        if not found:
            raise ConfigError(f"LoRA-drop: adapter {adapter!r} has no trainable LoRA layer")
        shapes = {}
        for p, d in found:  # the layers of one type share one LoRA: they need one shape
            shape = (tuple(d.lora_A.weight.shape), tuple(d.lora_B.weight.shape))
            if shapes.setdefault(module_type(p), shape) != shape:
                raise ConfigError(f"LoRA-drop: {p} has LoRA shapes {shape}, other {module_type(p)} layers "
                                  f"{shapes[module_type(p)]}; layers of one module type share one LoRA, so they "
                                  f"need one rank (drop the rank_pattern entry)")
        self.model, self.opts, self.adapter, self.opt = model, opts, adapter, None
        self.deltas = dict(found)  # {path: LoRALinear}, model order
        from ..train import tokenized
        self.examples, self.pad_id = tokenized(model, data, max_length, "data")  # checked before training
        self.names = {id(t): n for n, t in model.net.named_parameters()}  # the optimizer's keys
        self.importance, self.kept, self.shared = {}, [], {}  # shared: {type: [owner, other sharing paths...]}

    def attach(self, opt):
        check_moments(opt, "LoRA-drop")
        self.opt = opt

    def after_step(self, step):
        if step + 1 != self.opts.warmup_steps:
            return
        rng = backend.RNG(self.opts.seed)
        n = len(self.examples)
        rows = sorted(int(i) for i in rng.permutation(n)[:math.ceil(self.opts.sample_ratio * n)])  # LORA_DROP-1
        self.importance = self.measure(collated([self.examples[i] for i in rows], self.pad_id, self.opts.batch_size))
        self.kept, self.shared = [], {}
        for t in dict.fromkeys(module_type(p) for p in self.deltas):
            kept, dropped = select({p: i for p, i in self.importance.items() if module_type(p) == t},
                                   self.opts.threshold)
            self.kept += kept
            if dropped:
                self.shared[t] = dropped
        self.share(fresh=rng)

    def measure(self, batches) -> dict:
        """LORA_DROP-2: {path: I_i}, normalised within each module type."""
        net, was = self.model.net, self.model.net.training
        g = dict.fromkeys(self.deltas, 0.0)
        tokens = 0
        net.eval()
        try:
            for batch in batches:
                mask = token_mask(batch)
                with recording(net, list(self.deltas)) as seen:
                    forward(self.model, batch)
                for p, d in self.deltas.items():
                    x = layer_rows(seen[p][0], mask)  # (N, in) float64
                    xp = backend.xp_of(x)
                    A, B = (xp.astype(w.weight.data, xp.float64) for w in (d.lora_A, d.lora_B))
                    y = (x @ A.T) @ B.T * d.s  # (N, out): s B A x_t
                    g[p] += float(xp.sum(y * y))
                tokens += int(mask.sum())
        finally:
            net.train(was)
        g = {p: v / tokens for p, v in g.items()}
        totals = {}
        for p, v in g.items():
            totals[module_type(p)] = totals.get(module_type(p), 0.0) + v
        return {p: v / totals[module_type(p)] if totals[module_type(p)] else 0.0 for p, v in g.items()}

    def share(self, fresh=None) -> None:
        """LORA_DROP-4: each type's dropped layers onto its owner's LoRA; fresh (an RNG): the owner starts new."""
        for owner, *others in self.shared.values():
            o = self.deltas[owner]
            if fresh is not None:
                init_default(o, None, fresh)
                o.lora_B.weight.data = backend.xp_of(o.lora_B.weight.data).zeros_like(o.lora_B.weight.data)
                self.forget(o)
            for p in others:
                d = self.deltas[p]
                for w in (d.lora_A.weight, d.lora_B.weight):
                    w.requires_grad, w.grad = False, None
                self.forget(d)
                d.lora_A, d.lora_B = o.lora_A, o.lora_B

    def forget(self, delta) -> None:
        """Drop the AdamW moments of a delta's factors (a new LoRA starts from zero moments)."""
        for w in (delta.lora_A.weight, delta.lora_B.weight):
            for moments in (self.opt.m, self.opt.v):
                moments.pop(self.names[id(w)], None)

    def state(self):
        return {}, {"importance": self.importance, "kept": self.kept, "shared": self.shared}

    def load_state(self, arrays, info):  # after the weights and moments are loaded: rebuild the sharing only
        self.importance, self.kept, self.shared = info["importance"], info["kept"], info["shared"]
        self.share()


register("lora_drop", LoRADropConfig, kind="procedure", hook=LoRADropHook, in_peft=False,
         paper="LoRA-drop: Efficient LoRA Parameter Pruning based on Output Evaluation, Zhou, Lu, Xu, Zhu, Zhao, "
               "Yang 2024, arXiv:2402.07721",
         summary="LoRA-drop, after warmup_steps of LoRA the layers whose output E||s B A x||^2 reaches the "
                 "threshold of their module type keep their LoRA, the others share one (spec/lora_drop.md).")
