"""What the data-driven initialisers (EVA, CorDA, LoRA-GA) share (spec/methods.md METHOD-11).

A data-driven initialiser is an initialiser method (METHOD-10) whose A and B (and W0) come from the model's
behaviour on data. `model.apply_adapter(cfg, data=batches)`, or `model.apply_eva(data=batches, **fields)`,
runs `cfg.from_data(model, bases, batches)` on the model as it is (its other adapters disabled, eval mode,
no gradient unless the method asks for one). That returns the config to keep and save (EVA writes the ranks
it chose into rank_pattern) and {layer path: statistics}; each targeted layer is then set by
`cfg.initialise_from(delta, base, stats[path])`. A layer missing from the statistics is not adapted (EVA's
rank 0). Loading a saved adapter needs no data: the file holds A and B.

data: batches, each a dict with "input_ids" (B, T) and, optionally, "attention_mask" and "labels" (B, T), as
PEFT's dataloader yields them; or training data as model.train takes it (strings, dicts, a .jsonl path),
tokenized and cut into batches of `batch_size` in order, without shuffling (init_batches).
"""
from __future__ import annotations

import contextlib
import functools
import math

import numpy as np

from .. import backend
from ..autograd import Tensor, no_grad
from ..errors import ConfigError
from ..nn.layers import Linear
from ..nn.module import Module
from .base import check
from .lora import LoRAInitConfig, LoRALinear

BATCH_KEYS = ("input_ids", "attention_mask", "labels")


class DataInitConfig(LoRAInitConfig):
    """An initialiser that needs data (METHOD-11): from_data gathers, initialise_from sets one layer."""

    NEEDS_DATA = True

    def from_data(self, model, bases: dict, batches: list):
        """(the config to keep, {path: statistics}) from the model on `batches`."""
        raise NotImplementedError

    def initialise_from(self, delta, base, stats):
        raise NotImplementedError

    def initialiser(self, path: str = ""):
        stats = getattr(self, "_stats", None)
        if stats is None:  # a load (init_weights=False): A and B come from the file
            return self.initialise, self.REWRITES_W0
        return functools.partial(self._initialise_path, stats[path]), self.REWRITES_W0

    def _initialise_path(self, stats, delta, base, rng):
        self.initialise_from(delta, base, stats)

    def initialise(self, delta, base, rng):
        raise ConfigError(f"{type(self).__name__} initialises from data: pass data= to apply_adapter "
                          f"(or apply_{self.init}), a list of batches or training records")


class ConvertedInitConfig(DataInitConfig):
    """A data-driven initialiser that takes s B0 A0 out of W0 (LoRA-GA, CorDA) and saves as PEFT's conversion
    (save_pretrained(path_initial_model_for_weight_conversion=...); LORA_GA-6, CORDA-5): a plain LoRA of rank 2r
    for the unmodified base, A' = [A; A0] (2r, in), B' = [B, -B0] (out, 2r), r and alpha doubled (alpha by sqrt 2
    with rslora), rank_pattern and alpha_pattern doubled, init_lora_weights true, the method's own sub-config
    (lora_ga_config, corda_config) null, which PEFT reads only with its init (and else warns about: PEFT's own
    conversion keeps it). Its layer is ConvertedLoRALinear."""

    REWRITES_W0 = True
    STEP0_RTOL = 1e-5
    RELOAD_RTOL = 1e-5  # the file runs on W0, the model on float32's W0 - s B0 A0 (step 0's rounding)
    RANK_RULE = "min(in, out)"  # the bound max_rank computes, as the rank error states it

    def check_targets(self, bases: dict, needs: str):
        """Every targeted layer's rank and type, before any data is read (nothing changes on an error)."""
        for p, b in bases.items():
            n, m = b.in_features, b.out_features
            check(isinstance(b, Linear), f"target_modules (for {p})", type(b).__name__,
                  f"is quantized; {needs} (PEFT refuses too): load the float model")
            check(self.rank_alpha_for(p)[0] <= self.max_rank(n, m), f"rank (for {p})", self.rank_alpha_for(p)[0],
                  f"must be <= {self.RANK_RULE} = {self.max_rank(n, m)} (in={n}, out={m})")

    def initialise(self, delta, base, rng):
        check(False, "init_lora_weights", self.init,
              "is an adapter trained on W0 - s B0 A0, which no file holds: PEFT's folders of it load only on their "
              "saved residual base; save with minipeft (a rank-2r LoRA of the unmodified base) or with PEFT's "
              "save_pretrained(path_initial_model_for_weight_conversion=...)")

    def to_peft(self) -> dict:  # PEFT's converted config, a plain LoRA: the method's sub-config left out (None)
        d = super().to_peft()
        d.update({k: None for f, k in self.PEFT_FIELDS.items() if f not in LoRAInitConfig.PEFT_FIELDS})
        d.update(r=2 * self.rank, lora_alpha=self.alpha * (math.sqrt(2) if self.use_rslora else 2),
                 rank_pattern={k: 2 * v for k, v in self.rank_pattern.items()},
                 alpha_pattern={k: 2 * v for k, v in self.alpha_pattern.items()}, init_lora_weights=True)
        return d


class ConvertedLoRALinear(LoRALinear):
    """LoRA holding its initial A0, B0, so that it saves as PEFT's conversion (ConvertedInitConfig)."""

    A0 = B0 = None

    def start(self, A, B, base):
        """A (r, in), B (out, r) at step 0, cast to W0's dtype and kept as A0, B0; then W0 <- W0 - s B A."""
        xp, dtype = backend.xp_of(A), base.weight.data.dtype
        self.lora_A.weight.data, self.lora_B.weight.data = xp.astype(A, dtype), xp.astype(B, dtype)
        self.A0, self.B0 = (xp.asarray(w.weight.data, copy=True) for w in (self.lora_A, self.lora_B))
        self.unmerge_from(base)

    def saved_parameters(self):
        xp = backend.xp_of(self.lora_A.weight.data)
        for name, p in self.named_parameters():
            if name == "lora_A.weight":
                p = Tensor(xp.concat((p.data, xp.astype(self.A0, p.data.dtype)), axis=0))  # (2r, in)
            elif name == "lora_B.weight":
                p = Tensor(xp.concat((p.data, -xp.astype(self.B0, p.data.dtype)), axis=1))  # (out, 2r)
            yield name, p


def sub_config(value, defaults: dict, field: str, peft_class: str) -> dict:
    """A method's PEFT sub-config (eva_config, corda_config): a dict with keys among `defaults`, filled from them."""
    check(isinstance(value, dict) and set(value) <= set(defaults), field, value,
          f"must be a dict with keys among {', '.join(defaults)} (PEFT's {peft_class})")
    return {**defaults, **value}


@contextlib.contextmanager
def prepared(model, cfg, bases: dict, data, init_weights: bool):
    """(cfg, bases) to create the deltas with: a data-driven cfg (with init_weights) gathers its statistics
    first, and holds them only while the block runs. Data for any other config is an error."""
    if not getattr(cfg, "NEEDS_DATA", False):
        if data is not None:
            raise ConfigError(f"data= is for the data-driven initialisers (eva, corda, lora_ga); "
                              f"{type(cfg).__name__} takes none")
        yield cfg, bases
        return
    if not init_weights:  # a load: the file's A and B
        yield cfg, bases
        return
    if data is None:
        raise ConfigError(f"{type(cfg).__name__} ({cfg.init}) initialises from data: pass data=, a list of batches "
                          f"{{'input_ids', 'attention_mask', 'labels'}} or training records (strings, dicts, "
                          f"a .jsonl path); nothing was changed")
    batches = init_batches(model, data)
    with model.disable_adapters():
        was = model.net.training
        model.net.eval()
        try:
            cfg, stats = cfg.from_data(model, bases, batches)
        finally:
            model.net.train(was)
    cfg._stats = stats
    try:
        yield cfg, {p: b for p, b in bases.items() if p in stats}
    finally:
        del cfg._stats


def init_batches(model, data, batch_size: int = 4, max_length: int | None = None) -> list:
    """[{"input_ids", "attention_mask", "labels"} (B, T) int64 arrays]: batches as given, or training data
    tokenized as model.train does (TRAIN-5; max_length truncates) and collated `batch_size` records at a
    time, in order."""
    from ..train import tokenized
    if isinstance(data, (list, tuple)) and data and all(isinstance(b, dict) and np.ndim(b.get("input_ids")) == 2
                                                        for b in data):
        out = []
        for i, b in enumerate(data):
            extra = sorted(set(b) - set(BATCH_KEYS))
            if extra:
                raise ConfigError(f"data[{i}] has keys {extra}; a batch holds {', '.join(BATCH_KEYS)} only")
            ids = np.asarray(b["input_ids"], dtype=np.int64)
            out.append({"input_ids": ids, "attention_mask": np.asarray(b.get("attention_mask", np.ones_like(ids))),
                        **({"labels": np.asarray(b["labels"])} if "labels" in b else {})})
            for k in out[-1]:
                if out[-1][k].shape != ids.shape:
                    raise ConfigError(f"data[{i}][{k!r}] has shape {out[-1][k].shape}, input_ids {ids.shape}")
        return out
    examples, pad_id = tokenized(model, data, max_length, name="data")
    return collated(examples, pad_id, batch_size)


def collated(examples: list, pad_id: int, batch_size: int) -> list:
    """Tokenized examples (train.tokenized) as batches {"input_ids", "attention_mask", "labels"}, in order."""
    from ..data import collate
    return [dict(zip(BATCH_KEYS, collate(examples[i:i + batch_size], pad_id)))
            for i in range(0, len(examples), batch_size)]


def token_mask(batch, use_labels: bool = False, ignored: int = -100) -> np.ndarray:
    """(B, T) bool: the positions whose layer inputs count, attention_mask = 1 (and labels != ignored)."""
    mask = batch["attention_mask"].astype(bool)
    if use_labels and "labels" in batch:
        mask = mask & (batch["labels"] != ignored)
    return mask


def forward(model, batch):
    """The model's logits on one batch (no gradient)."""
    with no_grad():
        return model(batch["input_ids"], attention_mask=batch["attention_mask"])


class Recorder(Module):
    """Its inner layer, recording each input x (..., in) it sees."""

    def __init__(self, inner, seen: list):
        self.inner, self.seen = inner, seen

    def forward(self, x):
        self.seen.append(x.data)
        return self.inner(x)


@contextlib.contextmanager
def recording(net, paths):
    """{path: [input of each call]} filled while the block runs; the layers are put back after."""
    seen = {p: [] for p in paths}
    layers = {p: net.get_submodule(p) for p in paths}
    for p, m in layers.items():
        net.set_submodule(p, Recorder(m, seen[p]))
    try:
        yield seen
    finally:
        for p, m in layers.items():
            net.set_submodule(p, m)


def layer_rows(x, mask: np.ndarray):
    """The rows of x (B, T, in) at the mask's positions, in (b, t) order, float64: (N, in)."""
    xp = backend.xp_of(x)
    return xp.astype(x, xp.float64)[backend.asarray(mask)]
