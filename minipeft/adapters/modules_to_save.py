"""modules_to_save: a module trained in full, per adapter (PEFT's ModulesToSaveWrapper).

The wrapper keeps the original module and one trainable copy per adapter name; forward uses the
copy of the first active adapter that has one. On disk the copy is saved under the original
path (base_model.model.<path>.weight), as PEFT does.
"""
from __future__ import annotations

import copy

from ..nn.module import Module
from .base import ModuleDict


class TrainedCopy(Module):
    def __init__(self, original):
        self.original_module = original
        self.modules_to_save = ModuleDict()
        self.active: list[str] = []

    def add(self, name: str):
        dup = copy.deepcopy(self.original_module)
        self.modules_to_save[name] = dup
        return dup

    def current(self):
        for name in self.active:
            if name in self.modules_to_save:
                return self.modules_to_save[name]
        return self.original_module

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, attr):  # weight, in_features, ... of the module in use
        if attr.startswith("__") or attr in ("original_module", "modules_to_save", "active"):
            raise AttributeError(attr)
        return getattr(self.current(), attr)
