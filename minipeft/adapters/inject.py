"""Which modules an adapter targets, and wrapping them (spec/lora.md LORA-10, PEFT's matching rules).

target_modules:
  - a list: a module matches when its path equals an entry or ends with "." + entry; an entry that
    matches no linear layer is a warning naming it (PEFT accepts it silently), none matching an error;
  - a string: a regex that must match the whole path (re.fullmatch), as in PEFT; matching nothing is
    an error that suggests the list form (LORA-13);
  - "all-linear": every Linear/Conv1D/Linear4bit except the output head (lm_head).
A 4-bit Linear4bit (quant/linear4bit.py) counts as a linear layer and is wrapped like one (QLORA-5).
LoRAConfig itself (AdapterConfig.adapts_embeddings) also matches embeddings (LORA-15); "all-linear" never does.
A method whose config names other module types (TARGET_TYPES: LN tuning's norms) matches among those instead,
and one with DEFAULT_TARGETS takes target_modules=None as PEFT's default for the model type (default_targets).
layers_to_transform keeps only layers whose index (the number after "layers."/"h."/"layer.")
is listed; exclude_modules removes matches by the same rules.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings

from ..autograd.tensor import Tensor
from ..errors import ConfigError
from ..nn.layers import Embedding, Linear
from ..quant.linear4bit import Linear4bit
from .base import AdaptedLayer
from .modules_to_save import TrainedCopy, trained_copies

OUTPUT_HEADS = ("lm_head",)
LINEAR = (Linear, Linear4bit)  # what a method targets unless its config says otherwise (AdapterConfig.TARGET_TYPES)
LINEAR_OR_EMBEDDING = LINEAR + (Embedding,)  # LoRA's (AdapterConfig.adapts_embeddings, LORA-15)


def _name_matches(path: str, entries) -> bool:
    if isinstance(entries, str):
        return re.fullmatch(entries, path) is not None
    return any(path == e or path.endswith("." + e) for e in entries)


def _layer_index(path: str, pattern: str | None):
    rx = rf"(?:^|.*?\.){re.escape(pattern)}\.(\d+)\." if pattern else r".*?\.[^.]*\.(\d+)\."
    m = re.match(rx, path + ".")
    return int(m.group(1)) if m else None


def linear_paths(net, types=LINEAR) -> list[str]:
    """Paths of every module of `types` (Linear or Linear4bit), an adapted one by its base layer, in the model."""
    return [p for p, m in net.named_modules() if isinstance(m.base_layer if isinstance(m, AdaptedLayer) else m, types)
            and ".base_layer" not in p and ".adapters." not in p and ".modules_to_save" not in p]


def kind_of(types) -> str:
    """The word for a target kind in messages: "linear", "linear or embedding", or the type names
    ("LayerNorm or RMSNorm")."""
    if types == LINEAR_OR_EMBEDDING:
        return "linear or embedding"
    return "linear" if types == LINEAR else " or ".join(t.__name__ for t in types)


def target_types(cfg) -> tuple:
    """The module types cfg's target_modules match among: its TARGET_TYPES, else linear layers (and embeddings
    for LoRA itself, LORA-15)."""
    return cfg.TARGET_TYPES or (LINEAR_OR_EMBEDDING if cfg.adapts_embeddings() else LINEAR)


def default_targets(cfg, model_type: str):
    """cfg with target_modules=None replaced by its method's DEFAULT_TARGETS for model_type (PEFT's mapping,
    which PEFT then saves); cfg itself when it names its targets."""
    if cfg.target_modules is not None:
        return cfg
    if model_type not in cfg.DEFAULT_TARGETS:
        raise ConfigError(f"{type(cfg).__name__} has no default target_modules for model_type {model_type!r} (PEFT's "
                          f"mapping covers {', '.join(sorted(cfg.DEFAULT_TARGETS))}); pass target_modules=[...]")
    named = cfg.DEFAULT_TARGETS[model_type]  # a list, or PEFT's saved string (a full-match regex)
    return dataclasses.replace(cfg, target_modules=named if isinstance(named, str) else tuple(named))


def find_targets(net, cfg) -> list[str]:
    types = target_types(cfg)
    paths = linear_paths(net, types)
    if cfg.target_modules == "all-linear":
        found = [p for p in linear_paths(net) if p.split(".")[-1] not in OUTPUT_HEADS]
    else:
        found = [p for p in paths if _name_matches(p, cfg.target_modules)]
        warn_unmatched(paths, cfg.target_modules, kind_of(types))
    if cfg.exclude_modules:
        found = [p for p in found if not _name_matches(p, cfg.exclude_modules)]
    if cfg.layers_to_transform is not None:
        keep = {cfg.layers_to_transform} if isinstance(cfg.layers_to_transform, int) else set(cfg.layers_to_transform)
        found = [p for p in found if _layer_index(p, cfg.layers_pattern) in keep]
    by_parameter = parameter_targets(net, getattr(cfg, "target_parameters", None) or ())
    both = sorted(set(found) & set(by_parameter))
    if both:
        raise ConfigError(f"{both[0]} is named by target_modules and by target_parameters; name it in one of them "
                          "(PEFT refuses this too)")
    found += by_parameter
    if not found:
        narrowed = "".join(f", {f}={getattr(cfg, f)!r}" for f in ("exclude_modules", "layers_to_transform",
                                                                    "layers_pattern") if getattr(cfg, f) not in (None, ()))
        narrowed += "" if cfg.layers_to_transform != () else ", layers_to_transform=()"
        hint = ""
        if isinstance(cfg.target_modules, str) and cfg.target_modules != "all-linear":
            named = [p for p in paths if p.split(".")[-1] == cfg.target_modules] or paths or [""]
            hint = (f". A string is a regular expression that must match the whole module path (PEFT's rule, "
                    f"e.g. {named[0]!r}); to target layers by name pass a list: "
                    f"target_modules=[{cfg.target_modules!r}]")
        raise ConfigError(f"target_modules={cfg.target_modules!r}{narrowed} matches no {kind_of(types)} layer of this "
                          f"model; its {kind_of(types)} layers are named: {leaf_names(paths)}{hint}")
    return found + cfg.tied_targets(net, found)


def parameter_targets(net, entries) -> list[str]:
    """LORA-19: paths of the modules whose parameter `<path>.<name>` equals an entry of target_parameters or ends
    with "." + entry (PEFT's rule). Here each must be the weight of a float Linear (the MoE expert tensors PEFT's
    ParamWrapper exists for do not occur in minipeft's model families); an entry matching nothing is an error."""
    params = [(p.removesuffix(".base_layer"), n, m) for p, m in net.named_modules()  # an adapted layer: its base's
              if ".adapters." not in p and ".modules_to_save" not in p
              for n, t in vars(m).items() if isinstance(t, Tensor)]
    out = []
    for entry in entries:
        hits = [(p, n, m) for p, n, m in params if _name_matches(f"{p}.{n}", [entry])]
        if not hits:
            raise ConfigError(f"target_parameters entry {entry!r} matches no parameter of this model; name one as "
                              "'<module>.<parameter>', e.g. 'q_proj.weight'")
        for p, n, m in hits:
            if not (n == "weight" and type(m) is Linear):
                raise ConfigError(f"target_parameters entry {entry!r} names {p}.{n} of a {type(m).__name__}; here "
                                  "target_parameters takes the weight of a float Linear (use target_modules for "
                                  "the others)")
            out.append(p)
    return sorted(set(out), key=out.index)


def leaf_names(paths) -> str:
    """The distinct last components of the paths (q_proj, k_proj, ...), for messages."""
    return ", ".join(sorted({p.split(".")[-1] for p in paths}))


def unmatched_entries(paths, entries) -> list:
    """The entries of a target_modules list that match none of the paths (none for a regex string)."""
    if isinstance(entries, str):
        return []
    return [e for e in entries if not any(_name_matches(p, [e]) for p in paths)]


def warn_unmatched(paths, entries, kind: str = "linear") -> None:
    """LORA-13: list entries that match no linear layer anywhere are named in a warning (PEFT 0.21 accepts a
    list as long as one entry matches, so a PEFT config keeps loading)."""
    unmatched = unmatched_entries(paths, entries)
    if unmatched and len(unmatched) < len(entries):
        warnings.warn(f"target_modules entries {unmatched} match no {kind} layer of this model and are ignored; "
                      f"its {kind} layers are named: {leaf_names(paths)}", stacklevel=4)


def wrap(net, path: str) -> AdaptedLayer:
    """The AdaptedLayer at path, creating it around the Linear there if needed."""
    m = net.get_submodule(path)
    if isinstance(m, AdaptedLayer):
        return m
    wrapped = AdaptedLayer(m)
    net.set_submodule(path, wrapped)
    return wrapped


def adapted_layers(net):
    """(path, AdaptedLayer) pairs, in model order."""
    return [(p, m) for p, m in net.named_modules() if isinstance(m, AdaptedLayer)]


def unwrap_all(net) -> None:
    """Replace every AdaptedLayer by its base layer and every TrainedCopy by the copy in use (after
    merging, this is merge_and_unload)."""
    for path, layer in adapted_layers(net):
        net.set_submodule(path, layer.base_layer)
    for path, m in trained_copies(net):
        net.set_submodule(path, m.current())


def activate(net, names: list, trainable: bool) -> None:
    """Make `names` the active adapters of every adapted layer and trained copy; with trainable, their
    tensors (and only theirs) get gradients."""
    if trainable:
        net.requires_grad_(False)
    for _, m in net.named_modules():
        if not isinstance(m, (AdaptedLayer, TrainedCopy)):
            continue
        m.active = list(names)
        held = m.adapters if isinstance(m, AdaptedLayer) else m.modules_to_save
        for n in names if trainable else ():
            if n in held:
                held[n].requires_grad_(True)


def set_bias_trainable(net, cfg) -> None:
    """bias="all": every base bias trains; "lora_only" (or another "<method>_only"): those of adapted layers."""
    mode = getattr(cfg, "bias", "none")
    for path, m in net.named_modules():
        if getattr(m, "bias", None) is None or not isinstance(m.bias, Tensor) or ".adapters." in path:
            continue
        if mode == "all" or (mode.endswith("_only") and path.endswith(".base_layer")):  # lora_only, vera_only
            m.bias.requires_grad = True


def remove_adapter(net, name: str) -> None:
    """Take adapter `name` off every layer and trained copy; a layer left with none is the plain layer again."""
    for path, layer in adapted_layers(net):
        if name in layer.adapters:
            del layer.adapters[name]
        if not layer.adapters.keys():  # no adapter left: the plain layer again (parameter names as loaded)
            net.set_submodule(path, layer.base_layer)
    for path, m in trained_copies(net):
        if name in m.modules_to_save:
            del m.modules_to_save[name]
            if not m.modules_to_save.keys():
                net.set_submodule(path, m.original_module)


@contextlib.contextmanager
def mixed_batch(model, adapter_names, batch: int):
    """Within the block, example b uses adapter adapter_names[b] alone ("__base__": none), METHOD-6;
    every check of METHOD-7 comes first. adapter_names=None changes nothing (METHOD-8)."""
    if adapter_names is None:
        yield
        return
    from .registry import layer_class, method_of
    names = [adapter_names] * batch if isinstance(adapter_names, str) else list(adapter_names)
    if len(names) != batch:
        raise ConfigError(f"adapter_names has {len(names)} names for a batch of {batch} examples; give one per example")
    for n in dict.fromkeys(names):
        if n == "__base__":
            continue
        if n not in model.peft_configs:
            raise ConfigError(f"adapter_names: no adapter named {n!r}; the model has "
                              f"{sorted(model.peft_configs) or 'none'} (and '__base__' for none)")
        cfg = model.peft_configs[n]
        if getattr(cfg, "is_prompt_learning", False) or not layer_class(cfg).MIXED_BATCH:
            raise ConfigError(f"adapter_names: adapter {n!r} is {method_of(cfg).name}, which cannot serve a mixed "
                              f"batch (LoRA and QLoRA can; DoRA cannot, as in PEFT); run its examples apart")
    if model.net.training:
        raise ConfigError("adapter_names is for inference: call model.net.eval() first (PEFT refuses it in training too)")
    layers = [m for _, m in model.net.named_modules() if isinstance(m, (AdaptedLayer, TrainedCopy))]
    if any(isinstance(m, AdaptedLayer) and m.merged for m in layers):
        raise ConfigError("adapter_names with merged adapters: call unmerge_adapter() first (as PEFT requires)")
    groups = [(n, [b for b, m in enumerate(names) if m == n]) for n in dict.fromkeys(names)]
    for m in layers:
        m.groups = groups
    try:
        yield
    finally:
        for m in layers:
            m.groups = None
