"""modules_to_save: a module trained in full, per adapter (PEFT's ModulesToSaveWrapper).

The wrapper keeps the original module and one trainable copy per adapter name; forward uses the
copy of the first active adapter that has one. On disk the copy is saved under the original
path (base_model.model.<path>.weight), as PEFT does.
"""
from __future__ import annotations

import copy

from .. import backend
from ..autograd import concat, take_rows
from ..autograd.tensor import Tensor
from ..errors import ConfigError
from ..nn.module import Module
from .base import ModuleDict, batch_order


def rows_of(x, rows: list):
    """Rows of a Tensor (differentiable) or of an integer array (token ids), along axis 0."""
    if isinstance(x, Tensor):
        return take_rows(x, rows)
    return backend.xp_of(x).take(x, backend.asarray(rows, "int64"), axis=0)


class TrainedCopy(Module):
    def __init__(self, original):
        self.original_module = original
        self.modules_to_save = ModuleDict()
        self.active: list[str] = []
        self.groups = None  # a mixed batch (inject.mixed_batch): each group's rows use its adapter's copy

    def add(self, name: str):
        dup = copy.deepcopy(self.original_module)
        self.modules_to_save[name] = dup
        return dup

    def current(self):
        for name in self.active:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, x, *args, **kwargs):
        if self.groups is None:
            return self.current()(x, *args, **kwargs)
        parts = []  # METHOD-6: each group's rows through its adapter's copy, or the original where it has none
        for n, rows in self.groups:
            module = self.modules_to_save[n] if n in self.modules_to_save else self.original_module
            parts.append(module(rows_of(x, rows), *args, **kwargs))
        return take_rows(concat(parts, axis=0), batch_order(self.groups))

    def __getattr__(self, attr):  # weight, in_features, ... of the module in use
        if attr.startswith("__") or attr in ("original_module", "modules_to_save", "active", "groups"):
            raise AttributeError(attr)
        return getattr(self.current(), attr)


def trained_copy_paths(net, entry: str) -> list:
    """The module paths a modules_to_save entry names (the path, or a path ending in "." + entry)."""
    paths = [p for p, m in net.named_modules() if p and (p == entry or p.endswith("." + entry))
             and ".modules_to_save" not in p and ".original_module" not in p]
    if not paths:
        raise ConfigError(f"modules_to_save entry {entry!r} matches no module of the model")
    return paths


def add_trained_copy(net, paths: list, name: str) -> None:
    """Adapter `name`'s trainable copy of each module at paths (wrapped in a TrainedCopy once)."""
    for path in paths:
        m = net.get_submodule(path)
        if not isinstance(m, TrainedCopy):
            m = TrainedCopy(m)
            net.set_submodule(path, m)
        m.add(name)


def trained_copies(net) -> list:
    """(path, TrainedCopy) pairs, in model order."""
    return [(p, m) for p, m in net.named_modules() if isinstance(m, TrainedCopy)]
