"""What every layer adapter shares (spec/lora.md LORA-0, spec/peft-format.md).

An adapted layer is an `AdaptedLayer` that keeps the original layer as `base_layer` and one
delta module per adapter name in `adapters`. A delta module holds its trainable tensors under
PEFT's leaf names (lora_A.weight, lora_B.weight, lora_magnitude_vector, ...), so the key PEFT
saves is `base_model.model.<layer path>.<parameter path inside the delta module>`: saving and
loading is one generic walk, with no per-method key table.

A delta module implements:
    create_all(bases, cfg, rng, init_weights) -> ({path: delta}, {name: shared Tensor})
    adapt(x, y, base) -> y'   the layer's output with this adapter applied (y = base(x) so far)
    delta_weight()   -> dW    (out, in) in W's orientation, for merge/unmerge (None: not mergeable)
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import numbers
import re
import typing

from .. import backend
from ..autograd import concat, take_rows
from ..autograd.tensor import Tensor
from ..errors import ConfigError
from ..nn.module import Module

NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# the layer-selection fields every AdapterConfig has, saved under these names in adapter_config.json
COMMON_FIELDS = ("target_modules", "layers_to_transform", "layers_pattern", "modules_to_save", "exclude_modules")


def no_field(owner: str, key: str, fields, aliases: dict | None = None) -> ConfigError:
    """The error for a keyword `owner` does not take: it names the closest fields (and PEFT aliases)."""
    aliases = aliases or {}
    close = difflib.get_close_matches(key, sorted(set(fields) | set(aliases)), n=3, cutoff=0.6)
    close = [f"{c} (PEFT's name of {aliases[c]})" if c in aliases else c for c in close]
    hint = f"; did you mean {' or '.join(close)}?" if close else "."
    return ConfigError(f"{owner} has no field {key!r}{hint} Its fields: {', '.join(sorted(fields))}")


class ConfigType(type):
    """The metaclass of every AdapterConfig: a config also takes PEFT's names for its fields (METHOD-4),
    `LoRAConfig(r=8, lora_alpha=16, init_lora_weights=True)` = `LoRAConfig(rank=8, alpha=16, init="default")`,
    and a field it does not have is a ConfigError naming the closest ones."""

    def __call__(cls, *args, **kwargs):
        return super().__call__(*args, **cls.our_names(kwargs))

    def our_names(cls, kwargs: dict) -> dict:
        fields = {f.name for f in dataclasses.fields(cls)}
        aliases = {theirs: ours for ours, theirs in cls.PEFT_FIELDS.items() if theirs not in fields}
        out, given = {}, {}
        for key, value in kwargs.items():
            ours = key if key in fields else aliases.get(key)
            if ours is None:
                raise no_field(cls.__name__, key, fields, aliases)
            if ours in out:
                raise ConfigError(f"{cls.__name__}: {given[ours]!r} and {key!r} name the same field; give one of them")
            if key != ours:  # a PEFT value where ours differ (init_lora_weights=True is init="default")
                value = {json_key(v): k for k, v in cls.PEFT_VALUES.get(ours, {}).items()}.get(json_key(value), value)
            out[ours], given[ours] = value, key
        return out


@dataclasses.dataclass
class AdapterConfig(metaclass=ConfigType):
    """Fields every layer-adapter config has (PEFT names in the comments)."""

    target_modules: tuple | str = ("q_proj", "v_proj")  # names, a regex (full match), or "all-linear"
    layers_to_transform: tuple | int | None = None
    layers_pattern: str | None = None
    modules_to_save: tuple = ()  # modules trained in full (e.g. a classifier head)
    exclude_modules: tuple = ()

    peft_type = "BASE"  # PEFT's enum string, set by each method
    PEFT_FIELDS: typing.ClassVar[dict] = {}  # our field -> PEFT's adapter_config.json key
    PEFT_VALUES: typing.ClassVar[dict] = {}  # our field -> {our value: PEFT's value} where they differ
    PEFT_FLAGS: typing.ClassVar[dict] = {}  # PEFT keys (bools, or init_lora_weights) telling methods of a peft_type apart
    # the common keys PEFT's config class for this method has (PEFT warns on and ignores others): a common
    # field missing here must stay unset, since PEFT would read the saved adapter without it
    PEFT_COMMON: typing.ClassVar[tuple] = COMMON_FIELDS + ("fan_in_fan_out",)
    # the module types target_modules matches among (None: Linear and Linear4bit; LN tuning: its norms), and
    # {model_type: names} that target_modules=None stands for (PEFT's per-model mapping; empty: None is refused)
    TARGET_TYPES: typing.ClassVar[tuple | None] = None
    EMBEDDINGS: typing.ClassVar[bool] = False  # target_modules may name embeddings too (LoRA, LORA-15)
    DEFAULT_TARGETS: typing.ClassVar[dict] = {}

    def __post_init__(self):
        if isinstance(self.target_modules, list):
            self.target_modules = tuple(self.target_modules)
        if isinstance(self.modules_to_save, (list, str)):
            self.modules_to_save = (self.modules_to_save,) if isinstance(self.modules_to_save, str) \
                else tuple(self.modules_to_save)
        if self.modules_to_save is None:
            self.modules_to_save = ()
        by_model = self.target_modules is None and self.DEFAULT_TARGETS  # None: the default for the model type
        if not by_model and not isinstance(self.target_modules, (tuple, str)) or (
                isinstance(self.target_modules, tuple) and not all(isinstance(t, str) for t in self.target_modules)):
            raise ConfigError(f"target_modules must be a list of module names, a regex or 'all-linear', "
                              f"got {self.target_modules!r}")
        if isinstance(self.layers_to_transform, list):
            self.layers_to_transform = tuple(self.layers_to_transform)
        check_field_types(self)
        for field in COMMON_FIELDS:
            check(field in self.PEFT_COMMON or getattr(self, field) in (None, ()), field, getattr(self, field),
                  f"PEFT's {self.peft_type} config has no {field}, so a saved adapter would be read without it; "
                  f"leave it unset")
        self.validate()

    def validate(self):
        """Range checks of the method's own fields; raise ConfigError naming the field."""

    @classmethod
    def adapts_embeddings(cls) -> bool:
        """Whether target_modules may name an embedding beside the linear layers (LORA-15). Declared by a class
        itself, never inherited: LoRA's variants and initialisers subclass LoRAConfig but adapt linear layers only."""
        return cls.__dict__.get("EMBEDDINGS", False)

    def tied_targets(self, net, found: list) -> list:
        """Paths adapted with the matched ones `found` because they share a weight with them (TrainableTokens'
        tied lm_head); none for most methods."""
        return []

    def resolve_targets(self, net):
        """The config with target_modules as PEFT's inject_adapter rewrites it for this model (all-linear expanded,
        a long list condensed), for a method whose layers' sharing reads those names (LILY-3); itself for most."""
        return self

    def attach(self, net, name: str) -> None:
        """What the method sets on the network beyond its layers, once its layers are in (LongLoRA's training
        attention, LONGLORA-2); most methods set nothing. detach undoes it when the adapter goes."""

    def detach(self, net, name: str) -> None:
        """Undo attach (delete_adapter, unload, merge_and_unload)."""

    def trainable_count(self, layers: dict, mc) -> int:
        """The spec's count of the numbers this adapter trains (METHOD-5), for its targeted layers
        {path: (in, out)} on a model of config mc; base biases a `bias` mode unfreezes and
        modules_to_save copies are counted apart (Model.parameter_counts counts everything)."""
        raise NotImplementedError(f"{type(self).__name__} does not state its trainable_count (METHOD-5)")

    def to_peft(self) -> dict:
        """The method's own fields under PEFT's names and values."""
        out = {}
        for ours, theirs in self.PEFT_FIELDS.items():
            v = list(getattr(self, ours)) if isinstance(getattr(self, ours), tuple) else getattr(self, ours)
            table = {json_key(k): pv for k, pv in self.PEFT_VALUES.get(ours, {}).items()}
            out[theirs] = table.get(json_key(v), v)
        out.update(self.PEFT_FLAGS)
        return out

    @classmethod
    def from_peft(cls, d: dict):
        """A config from PEFT's adapter_config.json dict (unknown keys ignored, as PEFT does)."""
        kwargs = {}
        for field in COMMON_FIELDS:
            if d.get(field) is not None:
                kwargs[field] = d[field]
        for ours, theirs in cls.PEFT_FIELDS.items():
            if d.get(theirs) is not None:
                back = {json_key(v): k for k, v in cls.PEFT_VALUES.get(ours, {}).items()}
                kwargs[ours] = back.get(json_key(d[theirs]), d[theirs])
        return cls(**kwargs)


# a field's declared type (its annotation, split on "|") -> the values it takes; IO-7: a JSON value of
# the wrong type is a ConfigError naming the field, whatever the method (no per-method type table)
_KINDS = {"int": lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v),
          "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
          "dict": lambda v: isinstance(v, dict), "None": lambda v: v is None,
          "tuple": lambda v: isinstance(v, (tuple, list))}


def check_field_types(cfg) -> None:
    for f in dataclasses.fields(cfg):
        kinds = [k.strip() for k in str(f.type).split("|")]
        if not all(k in _KINDS for k in kinds):
            continue  # a type this table does not know: the method's validate() checks it
        v = getattr(cfg, f.name)
        check(any(_KINDS[k](v) for k in kinds), f.name, v, f"must be of type {f.type}")
        if isinstance(v, (tuple, list)):  # layer indices, or module names
            item = "int" if f.name == "layers_to_transform" else "str"
            check(all(_KINDS[item](e) for e in v), f.name, v, f"must hold only values of type {item}")


def json_key(v):
    """A hashable stand-in for a JSON value (True and 1 kept apart)."""
    return (type(v).__name__, json.dumps(v, sort_keys=True))


def check(cond: bool, field: str, value, rule: str):
    if not cond:
        raise ConfigError(f"{field}={value!r} is invalid: {rule}")


class ModuleDict(Module):
    """Children keyed by adapter name."""

    def __setitem__(self, name, m):
        setattr(self, name, m)

    def __getitem__(self, name):
        return vars(self)[name]

    def __delitem__(self, name):
        delattr(self, name)

    def __contains__(self, name):
        return name in vars(self)

    def keys(self):
        return [k for k, v in vars(self).items() if isinstance(v, Module)]


class AdaptedLayer(Module):
    """base_layer plus named adapters; forward applies the active, unmerged ones in order."""

    def __init__(self, base_layer):
        self.base_layer = base_layer
        self.adapters = ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.groups = None  # a mixed batch: [(adapter name or "__base__", [row, ...]), ...] (inject.mixed_batch)

    def forward(self, x):
        if self.groups is not None:  # METHOD-6
            return self.mixed_forward(x)
        live = [self.adapters[n] for n in self.active if n in self.adapters and n not in self.merged]
        h = x
        for delta in live:
            h = delta.adapt_input(h)
        y = self.base_layer(h)
        for delta in live:
            y = delta.adapt(x, y, self.base_layer)
        return y

    def mixed_forward(self, x):
        """METHOD-6: rows of group (n, rows) get adapter n alone; "__base__" and adapters this layer lacks, none.
        Every group's rows are computed from base(x) once, then put back in the batch's order (AG-22)."""
        y = self.base_layer(x)  # (B, ..., out)
        if not any(n in self.adapters for n, _ in self.groups):
            return y
        parts = []
        for n, rows in self.groups:
            y_rows = take_rows(y, rows)
            parts.append(self.adapters[n].adapt(take_rows(x, rows), y_rows, self.base_layer)
                         if n in self.adapters else y_rows)
        return take_rows(concat(parts, axis=0), batch_order(self.groups))

    # merge/unmerge add or subtract delta_weight() in the base weight's own layout
    def merge(self, name):
        if name in self.merged:
            return
        self.adapters[name].merge_into(self.base_layer)
        self.merged.append(name)

    def unmerge(self, name):
        if name not in self.merged:
            return
        self.adapters[name].unmerge_from(self.base_layer)
        self.merged.remove(name)


def batch_order(groups) -> list:
    """Where each example of the batch is once its groups' rows are stacked in group order."""
    stacked = [b for _, rows in groups for b in rows]
    where = [0] * len(stacked)
    for j, b in enumerate(stacked):
        where[b] = j
    return where


class Delta(Module):
    """Base of delta modules: merge adds delta_weight() to W, unmerge subtracts it.
    Methods whose merge is not additive (IA3, DoRA) override merge_into / unmerge_from."""

    MIXED_BATCH = False  # adapt(x_rows, base(x)_rows, base) is the adapted layer on those rows alone (METHOD-7)

    def adapt_input(self, x):
        return x

    @classmethod
    def create_all(cls, bases: dict, cfg, rng, init_weights: bool = True):
        """({path: delta} for the targeted base layers {path: base}, {name: Tensor} of frozen tensors
        the deltas share, saved once as base_model.<name>). Most methods share nothing (VeRA does)."""
        return {p: cls.create(b, cfg, p, rng, init_weights) for p, b in bases.items()}, {}

    def delta_weight(self):
        raise NotImplementedError

    def mergeable_into(self, base) -> bool:
        """Whether merge_into can fold this delta into `base` (BEFT's bias offset needs a base bias)."""
        return True

    @contextlib.contextmanager
    def gradient_reference(self, base):
        """Within it the forward is the function whose exact gradient backward computes (METHOD-5's finite
        differences). The same as the forward, except for a method whose backward treats a quantity as a
        constant on purpose: it holds that quantity at its present value here (DoRA's row norm, DORA-3)."""
        yield

    def merge_into(self, base):
        base.weight.data = base.weight.data + orient(self.delta_weight(), base)

    def unmerge_from(self, base):
        base.weight.data = base.weight.data - orient(self.delta_weight(), base)


def put_back(base, kept) -> None:
    """Unmerge of a method whose merge_into kept (W, b) as they were (None: nothing merged): restores them bit for bit."""
    if kept is not None:
        base.weight.data, b = kept
        if b is not None:
            base.bias.data = b


def orient(dW, base):
    """dW (out, in) in the base weight's storage layout ((in, out) for GPT-2's Conv1D; an Embedding's (V, d) as is)."""
    return backend.xp_of(dW).matrix_transpose(dW) if getattr(base, "fan_in_fan_out", False) else dW


def check_peft_linear(base, path: str, peft_name: str, ours: str) -> None:
    """A target of a PEFT tuner that takes torch.nn.Linear only: GPT-2's Conv1D (which PEFT refuses) and a 4-bit layer
    (which minipeft does not adapt for it) are ConfigErrors naming the layer."""
    check(not getattr(base, "fan_in_fan_out", False), f"target_modules (for {path})", "Conv1D",
          f"PEFT's {peft_name} adapts torch.nn.Linear only (not GPT-2's Conv1D), so the file could not be read there")
    from ..nn.layers import Linear
    check(isinstance(base, Linear), f"target_modules (for {path})", type(base).__name__,
          f"{ours} needs a float Linear base; load the model unquantized")


def trainable(array) -> Tensor:
    return Tensor(array, requires_grad=True)


def fan_in_uniform(rng, shape, fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) of `shape`: torch's nn.Linear default and kaiming_uniform(a=sqrt 5),
    the init PEFT's A matrices, LyCORIS leaves and prompt encoders start from."""
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(shape, -bound, bound)
