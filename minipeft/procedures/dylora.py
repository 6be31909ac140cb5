"""DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank Adaptation
(Valipour, Rezagholizadeh, Kobyzev, Ghodsi 2023, arXiv:2210.07558), as a training hook (spec/dylora.md).
A (r, in), B (out, r) a LoRA layer's factors, alpha its lora_alpha, k the 0-based optimizer step:

  DYLORA-1 before each step k one rank b_k ~ U{r_min, ..., r_max} is drawn from backend.RNG(seed), for every layer.
  DYLORA-2 step k's forward at every trained LoRA layer: h = W0 x + s_b B[:, :b] A[:b] dropout(x),
           s_b = alpha / b (LoRA's scaling rule at rank b, LORA-2: alpha / sqrt(b) with use_rslora).
  DYLORA-3 only the truncated factors learn: A[:b] and B[:, :b]; frozen=True: only the b-th row A[b-1] and
           column B[:, b-1] (the lower ranks enter the forward as constants). Every other entry, and its AdamW
           moments m, v, keeps its value from before the step.
  DYLORA-4 truncate_rank(model, b): A <- A[:b], B <- B[:, :b], rank <- b, s <- s_b: a plain rank-b LoRA whose
           output is DYLORA-2's at b, saved in PEFT's format with r = b.

Deviations: the authors' PyTorch code slices the parameters in the forward and lets Adam's momentum move the
entries outside the slice (their gradient is 0, their moments are not); minipeft follows the paper's update
(DYLORA-3). AdamW's step count t, and so its bias correction, is shared by all entries, as in the authors' code.
"""
from __future__ import annotations

import dataclasses

from .. import backend
from ..adapters.inject import adapted_layers
from ..adapters.lora import LoRALinear, lora_scaling
from ..adapters.registry import register
from ..autograd import concat, functional as F, no_grad
from ..autograd.tensor import Tensor
from ..errors import ConfigError
from ..hooks import TrainingHook
from .merging import check_moments
from .relora import positive_int


@dataclasses.dataclass
class DyLoRAConfig:
    r_min: int = 1  # the smallest rank drawn
    r_max: int | None = None  # the largest rank drawn; None: the smallest rank of the trained LoRA layers
    frozen: bool = False  # the paper's "frozen" mode: only the b-th row of A and column of B learn
    seed: int = 0  # the ranks draw from backend.RNG(seed)

    def __post_init__(self):
        positive_int("DyLoRAConfig", "r_min", self.r_min)
        if self.r_max is not None:
            positive_int("DyLoRAConfig", "r_max", self.r_max)
            if self.r_min > self.r_max:
                raise ConfigError(f"DyLoRAConfig.r_min={self.r_min} must be <= r_max={self.r_max}: "
                                  f"the ranks are drawn from {{r_min, ..., r_max}}")
        if not isinstance(self.frozen, bool):
            raise ConfigError(f"DyLoRAConfig.frozen={self.frozen!r} must be True or False")
        positive_int("DyLoRAConfig", "seed", self.seed, 0)


class DyLoRALinear(LoRALinear):
    """A LoRA layer's delta with DYLORA-2's forward at rank `b`; it holds the LoRA layer's own lora_A and lora_B
    modules, so the parameters and their names are the same. In eval mode it runs at b = r_max."""

    def __init__(self, lora: LoRALinear, alpha, use_rslora: bool, frozen: bool, r_max: int):
        self.s, self.p, self.rng = lora.s, lora.p, lora.rng
        self.lora_A, self.lora_B = lora.lora_A, lora.lora_B  # (r, in), (out, r): shared, not copied
        self.training = lora.training
        self.alpha, self.use_rslora, self.frozen, self.r_max = alpha, use_rslora, frozen, r_max
        self.b = r_max

    def adapt(self, x, y, base):  # DYLORA-2
        b = self.b if self.training else self.r_max
        h = F.dropout(x, self.p, self.rng, self.training)
        A, B = self.lora_A.weight, self.lora_B.weight  # (r, in), (out, r)
        if self.frozen and b > 1:  # DYLORA-3: ranks below b are constants
            A_b = concat([Tensor(A.data[:b - 1, ...]), A[b - 1:b]], axis=0)  # (b, in)
            B_b = concat([Tensor(B.data[:, :b - 1]), B[:, b - 1:b]], axis=1)  # (out, b)
        else:
            A_b, B_b = A[:b], B[:, :b]  # (b, in), (out, b)
        return y + F.linear(F.linear(h, A_b), B_b) * lora_scaling(self.alpha, b, self.use_rslora)


def lora_layers(model, name: str, procedure: str) -> list:
    """[(path, adapted layer, LoRALinear)] of adapter `name`: plain LoRA (over a float or 4-bit base), no lora_bias."""
    out = [(p, layer, layer.adapters[name]) for p, layer in adapted_layers(model.net) if name in layer.adapters]
    if not out:
        raise ConfigError(f"{procedure}: adapter {name!r} adapts no layer: apply_lora first")
    for path, layer, delta in out:
        where = f"{procedure}: {path} (adapter {name!r})"
        if type(delta) is not LoRALinear:
            raise ConfigError(f"{where} is {type(delta).__name__}; {procedure} truncates the rank of plain LoRA "
                              f"layers (apply_lora or apply_qlora)")
        if delta.lora_B.bias is not None:
            raise ConfigError(f"{where} has lora_bias=True; {procedure} truncates A and B only: use lora_bias=False")
        if name in layer.merged:
            raise ConfigError(f"{where} is merged: unmerge it first")
    return out


class DyLoRAHook(TrainingHook):
    """DyLoRA in model.train: TrainingConfig(hooks=[DyLoRAHook(model, DyLoRAConfig(r_min=1))]); afterwards
    truncate_rank(model, b) for any b in r_min..r_max."""
    key = "dylora"

    def __init__(self, model, opts: DyLoRAConfig, adapter: str = "default"):
        cfg = model.peft_configs.get(adapter)
        if cfg is None:
            raise ConfigError(f"DyLoRA: the model has no adapter {adapter!r}: apply_lora first")
        found = [(p, layer, d) for p, layer, d in lora_layers(model, adapter, "DyLoRA")
                 if d.lora_B.weight.requires_grad]
        if not found:
            raise ConfigError(f"DyLoRA: adapter {adapter!r} has no trainable LoRA layer")
        smallest = min(d.lora_A.weight.shape[0] for _, _, d in found)
        self.r_max = smallest if opts.r_max is None else opts.r_max
        if self.r_max > smallest:
            raise ConfigError(f"DyLoRA: r_max={self.r_max} exceeds the rank {smallest} of a trained LoRA layer "
                              f"(apply_lora with rank >= r_max, or lower r_max)")
        if opts.r_min > self.r_max:
            raise ConfigError(f"DyLoRA: r_min={opts.r_min} must be <= r_max={self.r_max}")
        self.opts, self.adapter, self.opt = opts, adapter, None
        self.rng = backend.RNG(opts.seed)
        self.layers = [(layer, d) for _, layer, d in found]
        self.dy = [DyLoRALinear(d, cfg.rank_alpha_for(p)[1], cfg.use_rslora, opts.frozen, self.r_max)
                   for p, _, d in found]
        self.names = {id(t): n for n, t in model.net.named_parameters()}  # the optimizer's keys of A and B
        self.b, self.prev = self.r_max, {}

    def attach(self, opt):
        check_moments(opt, "DyLoRA")
        self.opt = opt
        for (layer, _), dy in zip(self.layers, self.dy):
            layer.adapters[self.adapter] = dy  # the step's forward is DYLORA-2's
        self.draw()
        self.snapshot()

    def draw(self):  # DYLORA-1
        self.b = self.rng.integer(self.opts.r_min, self.r_max)
        for dy in self.dy:
            dy.b = self.b

    def factors(self):
        """[(parameter Tensor, axis of its rank)] of every trained layer: A's rows, B's columns."""
        return [(t, axis) for dy in self.dy for t, axis in ((dy.lora_A.weight, 0), (dy.lora_B.weight, 1))]

    def snapshot(self):
        """Each factor and its moments as they are now: what the entries that do not learn go back to."""
        self.prev = {id(t): (t.data, *(d.get(self.names[id(t)]) for d in (self.opt.m, self.opt.v)))
                     for t, _ in self.factors()}

    def after_step(self, step):  # DYLORA-3
        b = self.b
        lo = b - 1 if self.opts.frozen else 0
        for t, axis in self.factors():
            xp = backend.xp_of(t.data)
            r = t.data.shape[axis]
            learns = xp.reshape((xp.arange(r) >= lo) & (xp.arange(r) < b), (r, 1) if axis == 0 else (1, r))
            data, m, v = self.prev[id(t)]
            t.data = xp.where(learns, t.data, data)
            name = self.names[id(t)]
            for moments, before in ((self.opt.m, m), (self.opt.v, v)):
                if name in moments:
                    old = xp.zeros_like(moments[name]) if before is None else before
                    moments[name] = xp.where(learns, moments[name], old)
        self.draw()
        self.snapshot()

    def state(self):
        return {}, {"rng": self.rng.get_state(), "b": self.b}

    def load_state(self, arrays, info):  # after the weights and moments are loaded: the snapshot is theirs
        self.rng.set_state(info["rng"])
        self.b = info["b"]
        for dy in self.dy:
            dy.b = self.b
        self.snapshot()

    def end(self):
        for layer, lora in self.layers:  # the plain LoRA layers back, holding the trained factors
            layer.adapters[self.adapter] = lora


def truncate_rank(model, b: int, name: str = "default") -> None:
    """DYLORA-4, in place: adapter `name` becomes a plain rank-b LoRA (A[:b], B[:, :b], s = alpha / b), which
    save_adapters writes in PEFT's format with r = b. Save the full adapter first to keep the other ranks."""
    cfg = model.peft_configs.get(name)
    layers = lora_layers(model, name, "truncate_rank")
    smallest = min(d.lora_A.weight.shape[0] for _, _, d in layers)
    positive_int("truncate_rank", "b", b)
    if b > smallest:
        raise ConfigError(f"truncate_rank: b={b} exceeds the rank {smallest} of a layer of adapter {name!r}")
    with no_grad():
        for path, _, d in layers:
            A, B = d.lora_A.weight, d.lora_B.weight  # (r, in), (out, r)
            A.data, B.data, A.grad, B.grad = A.data[:b], B.data[:, :b], None, None  # (b, in), (out, b)
            d.lora_A.out_features = d.lora_B.in_features = b
            d.s = lora_scaling(cfg.rank_alpha_for(path)[1], b, cfg.use_rslora)
    model.peft_configs[name] = dataclasses.replace(cfg, rank=b, rank_pattern={})


register("dylora", DyLoRAConfig, kind="procedure", hook=DyLoRAHook, in_peft=False,
         paper="DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank "
               "Adaptation, Valipour et al. 2023, arXiv:2210.07558",
         summary="DyLoRA, each step a rank b ~ U{r_min..r_max} and the forward s_b B[:, :b] A[:b]; afterwards "
                 "truncate_rank(model, b) gives a rank-b LoRA (spec/dylora.md).")
