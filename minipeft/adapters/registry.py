"""The method registry: every adapter method minipeft knows, and the one place that maps a method's
name, its config class and PEFT's `peft_type` string to each other (spec/methods.md METHOD-n).

A method is one module under minipeft/adapters/ (or anywhere else: see README "Adding a method")
holding its config dataclass and its layer class, ending in one `register(...)` call. Importing
minipeft.adapters imports every module of the package, so a new file there is a new method with no
other edit. Dispatch is on config types (`method_of(cfg)`); an adapter_config.json's peft_type maps
back to a config class, and where several share one peft_type (LORA, and DoRA as LORA + use_dora),
their PEFT_FLAGS decide.
"""
from __future__ import annotations

import dataclasses

from ..errors import CheckpointError, ConfigError

KINDS = ("layer", "prompt", "procedure", "initialiser", "optimiser")
TRAINING_KINDS = ("optimiser", "procedure")  # a method that is a TrainingHook (hook=...), not an adapter


@dataclasses.dataclass(frozen=True)
class Method:
    """One registered method, as `minipeft.methods()` lists it."""

    name: str  # the stem of apply_<name>, adapters/<name>.py, spec/<name>.md, the CLI's --method
    config: type  # its AdapterConfig dataclass (an optimiser or procedure: its options dataclass)
    layer: type | None  # its layer (or prompt encoder) class; None: the one of the config's parent method
    kind: str  # one of KINDS
    paper: str  # title, authors, year, arXiv id
    summary: str  # one line: what it does to the model (the apply_<name> docstring)
    mergeable: bool = True  # its update folds into the base weights (merge_adapter, merge_and_unload)
    in_peft: bool = True  # PEFT 0.21 has it, and loads its files
    quantized_base: bool = False  # it runs over a 4-bit base (load_model(..., quantization=...)) only
    hook: type | None = None  # an optimiser or procedure: its TrainingHook class, built as hook(model, options)

    @property
    def is_adapter(self) -> bool:
        """An adapter method (apply_<name>, the CLI's --method), not an optimiser or procedure of model.train."""
        return self.kind not in TRAINING_KINDS

    @property
    def title(self) -> str:
        """The method's own name as its config class spells it (LoRA, DoRA, QLoRA, IA3, PromptTuning)."""
        return self.config.__name__.removesuffix("Config")

    @property
    def peft_type(self) -> str | None:
        """PEFT's peft_type of the saved adapter_config.json, or None where PEFT lacks the method."""
        return getattr(self.config, "peft_type", None) if self.in_peft else None  # an optimiser has none


_METHODS: dict[str, Method] = {}  # name -> Method, in registration order
METHODS: dict[str, type] = {}  # name -> config class of the adapter methods (the CLI's --method choices)
REGISTRY: dict[type, type] = {}  # config class -> layer class, for the methods with a layer class of their own
_LISTENERS: list = []  # listener(method, registered) as a method comes and goes (Model's apply_<name> shorthands)


def register(name: str, config: type, layer: type | None = None, *, kind: str = "layer", paper: str = "",
             summary: str = "", mergeable: bool = True, in_peft: bool = True, quantized_base: bool = False,
             hook: type | None = None) -> Method:
    """Add a method (METHOD-1). The name must be new; registering the same config class again is refused.
    An optimiser or procedure (kind in TRAINING_KINDS) gives its TrainingHook class as hook= and no layer."""
    if not name.isidentifier() or name != name.lower():
        raise ConfigError(f"method name {name!r} must be a lower-case Python identifier (it names apply_{name})")
    if name in _METHODS:
        raise ConfigError(f"a method named {name!r} is registered already ({_METHODS[name].config.__name__})")
    if kind not in KINDS:
        raise ConfigError(f"method {name!r}: kind={kind!r} must be one of {', '.join(KINDS)}")
    if any(m.config is config for m in _METHODS.values()):
        raise ConfigError(f"{config.__name__} is registered already, as {method_of_class(config).name!r}")
    if kind in TRAINING_KINDS:
        if hook is None or layer is not None:
            raise ConfigError(f"method {name!r}: a {kind} is a training hook: register(..., hook=<its TrainingHook "
                              f"class>) with no layer")
    elif hook is not None:
        raise ConfigError(f"method {name!r}: hook= is for kinds {', '.join(TRAINING_KINDS)}, not {kind!r}")
    elif layer is None and _inherited_layer(config) is None:
        raise ConfigError(f"method {name!r}: {config.__name__} derives from no registered config, so it needs a "
                          f"layer class (register(..., layer=...))")
    m = Method(name, config, layer, kind, paper, summary, mergeable, in_peft, quantized_base, hook)
    if m.is_adapter:
        for listener in _LISTENERS:  # first: a listener may refuse the method (a name Model already uses)
            listener(m, True)
        METHODS[name] = config
    _METHODS[name] = m
    if layer is not None:
        REGISTRY[config] = layer
    return m


def unregister(name: str) -> None:
    """Remove a method registered with register() (a method module of the package stays registered)."""
    m = method(name)
    if m.config.__module__.startswith(__package__ + "."):
        raise ConfigError(f"{name!r} is one of minipeft's own methods; only methods registered elsewhere unregister")
    del _METHODS[name]
    METHODS.pop(name, None)
    REGISTRY.pop(m.config, None)
    for listener in _LISTENERS if m.is_adapter else ():
        listener(m, False)


def on_register(listener) -> None:
    """Call listener(method, True) for every adapter method registered so far and every one registered
    later, and listener(method, False) for each one unregistered (optimisers and procedures are not told)."""
    _LISTENERS.append(listener)
    for m in _METHODS.values():
        if m.is_adapter:
            listener(m, True)


def methods() -> list[Method]:
    """Every registered method, in registration order."""
    return list(_METHODS.values())


def method(name: str) -> Method:
    if name not in _METHODS:
        raise ConfigError(f"no method named {name!r}; minipeft has {', '.join(_METHODS)}")
    return _METHODS[name]


def method_of_class(config_cls: type) -> Method:
    """The method of a config class: its own registration, else its nearest registered base class's."""
    for cls in config_cls.__mro__:
        for m in _METHODS.values():
            if m.config is cls:
                return m
    raise ConfigError(f"no adapter method is registered for {config_cls.__name__}")


def method_of(cfg) -> Method:
    return method_of_class(type(cfg))


def _inherited_layer(config_cls: type):
    for cls in config_cls.__mro__:
        if cls in REGISTRY:
            return REGISTRY[cls]
    return None


def layer_class(cfg):
    """The layer class that applies cfg: its method's, or the nearest base method's (QLoRA: LoRA's)."""
    found = _inherited_layer(type(cfg))
    if found is None:
        raise CheckpointError(f"no adapter method is registered for {type(cfg).__name__}")
    return found


def initialiser_names() -> dict:
    """{name: config class name} of the initialisers (kind "initialiser", METHOD-10)."""
    return {m.name: m.config.__name__ for m in _METHODS.values() if m.kind == "initialiser"}


def _flag_holds(fields: dict, key, value) -> bool:
    """A PEFT_FLAGS entry: a bool holds as the key's truth (absent: false), any other value by equality."""
    return bool(fields.get(key, False)) == value if isinstance(value, bool) else fields.get(key) == value


def config_class(peft_type: str, where: str = "adapter_config.json", fields: dict | None = None):
    """The config class for an adapter_config.json: its peft_type, then the class (with a layer of its own,
    or an initialiser's, METHOD-10) whose PEFT_FLAGS all hold in `fields`, the one with the most flags
    winning; two winners (DoRA's use_dora with an initialiser's init_lora_weights) are an error."""
    candidates = list(REGISTRY) + [m.config for m in _METHODS.values() if m.kind == "initialiser"]
    fits = {cls for cls in candidates if cls.peft_type == peft_type and
            all(_flag_holds(fields or {}, k, v) for k, v in cls.PEFT_FLAGS.items())}
    if fits:
        most = max(len(cls.PEFT_FLAGS) for cls in fits)
        best = sorted((cls for cls in fits if len(cls.PEFT_FLAGS) == most), key=lambda cls: cls.__name__)
        if len(best) > 1:
            raise CheckpointError(f"{where}: its fields fit {' and '.join(c.__name__ for c in best)} alike "
                                  f"({', '.join(f'{k}={v!r}' for c in best for k, v in c.PEFT_FLAGS.items())}); "
                                  f"minipeft has no method that combines them")
        return best[0]
    known = sorted({c.peft_type for c in REGISTRY})
    raise CheckpointError(f"{where}: peft_type {peft_type!r} is not supported; minipeft reads {', '.join(known)}")
