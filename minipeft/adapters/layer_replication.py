"""LoRA's layer_replication (PEFT 0.21's LoraConfig field; spec/lora.md LORA-14): the decoder's layer list is
rebuilt from [start, end) ranges of the original layers, the copies sharing the original weights, before the
adapter is put on, so that each copy gets a LoRA of its own (a model made deeper at the memory of the original;
mergekit's pass-through format). [[0, 4], [2, 5]] on 5 layers gives the layers 0, 1, 2, 3, 2, 3, 4.

PEFT parity: peft/tuners/tuners_utils.py replicate_layers (model.layers of llama-style models;
config.num_hidden_layers set to the new count). PEFT's LoraModel._check_merge_allowed means to refuse a merge, but
looks the field up in its dict of adapter configs and so merges (wrongly: every copy's B A into the one shared weight);
minipeft refuses it."""
from __future__ import annotations

import copy

from ..errors import ConfigError
from ..nn.module import Module, ModuleList
from .base import check


def check_layer_map(layer_map):
    """LORA-14's field: None, or a non-empty list of [start, end) pairs of integers with 0 <= start < end."""
    if layer_map is None:
        return None
    ok = isinstance(layer_map, (list, tuple)) and len(layer_map) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
        and 0 <= p[0] < p[1] for p in layer_map)
    check(ok, "layer_replication", layer_map, "must be a list of [start, end) layer ranges, 0 <= start < end, e.g. "
          "[[0, 4], [2, 5]]")
    return tuple(tuple(p) for p in layer_map)


def shared_clone(m: Module) -> Module:
    """A copy of the module tree whose every module is new and every parameter the original's (the same Tensor)."""
    new = copy.copy(m)
    for name, child in m.named_children():
        setattr(new, name, shared_clone(child))
    return new


def replicate(net, layer_map, where: str):
    """LORA-14: net's layer list becomes the layers of each [start, end) range in turn, the repeated ones clones
    sharing their weights; config.num_hidden_layers is the new count. Checked before anything changes; returns the
    function that puts the original layers back (an adapter whose creation fails leaves the model as it was)."""
    base = getattr(net, getattr(net, "base_name", ""), None)
    layers = getattr(base, getattr(net, "layers_name", ""), None)
    if getattr(net, "base_name", None) != "model" or not isinstance(layers, ModuleList):
        raise ConfigError(f"{where}: layer_replication needs a decoder whose layers are model.layers (llama, mistral, "
                          f"qwen2, phi), as PEFT's replicate_layers does; {net.config.model_type} has none")
    if getattr(net, "replicated", None) is not None:
        raise ConfigError(f"{where}: the model's layers are replicated already ({list(net.replicated)}); PEFT would "
                          "replicate them again: give layer_replication to one adapter only")
    n = len(layers)
    for start, end in layer_map:
        if end > n:
            raise ConfigError(f"{where}: layer_replication range [{start}, {end}) reaches past the model's {n} layers")
    seen, new = set(), []
    for start, end in layer_map:
        for i in range(start, end):
            new.append(layers[i] if i not in seen else shared_clone(layers[i]))
            seen.add(i)
    setattr(base, net.layers_name, ModuleList(new))
    net.config.num_hidden_layers = len(new)
    net.replicated = layer_map

    def undo():
        setattr(base, net.layers_name, layers)
        net.config.num_hidden_layers = n
        net.replicated = None
    return undo


def prepare(net, cfg, where: str):
    """Replicate net's layers for cfg's layer_replication (none: nothing); the undo function. A method whose init
    rewrites W0 (PiSSA, LoRA-GA, ...) would rewrite a shared weight once per copy: refused."""
    layer_map = getattr(cfg, "layer_replication", None)
    if layer_map is None:
        return lambda: None
    initialiser = getattr(cfg, "initialiser", None)
    if initialiser is not None and initialiser()[1]:
        raise ConfigError(f"{where}: layer_replication with init={cfg.init!r}, which rewrites W0: the copies share "
                          "their W0, so each copy's init would rewrite it again; use init 'default' or 'gaussian'")
    return replicate(net, layer_map, where)


def check_mergeable(model) -> None:
    """PEFT refuses to merge when the base layers are replicated: a shared weight would take every copy's update."""
    if getattr(model.net, "replicated", None) is not None:
        raise ConfigError(f"the model's layers are replicated (layer_replication={list(model.net.replicated)}): their "
                          "copies share one weight, so no adapter can be merged into it (PEFT 0.21.2 means to refuse "
                          "it, but merges every copy's update into the shared weight)")
