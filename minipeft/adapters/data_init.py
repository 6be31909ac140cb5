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

import numpy as np

from .. import backend
from ..autograd import no_grad
from ..errors import ConfigError
from ..nn.module import Module
from .base import check
from .lora import LoRAInitConfig

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
    from ..data import collate
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
