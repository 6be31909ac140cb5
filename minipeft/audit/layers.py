"""An adapter's layers over a base checkpoint, one at a time, through the method's own code (spec/audit.md AUDIT-2).

Which layers it adapts is inject.find_targets on the base's skeleton (PEFT's matching rules). Each layer's
delta module is made by the method's registered layer class (create_all, as load_adapters makes it) and
filled with the file's tensors; then the method's own merge_into runs on a float64 copy of the layer's
W0, so every mergeable method is audited by the code that defines it, an init that rewrites W0 on load
(PiSSA, OLoRA, LoftQ) included. A method whose deltas share tensors (its own create_all: VeRA, DVoRA,
Tied-LoRA) is created once over the skeleton's stubs, every other method layer by layer with W0 in place.

    merged = merge_into(W0)         (storage layout, GPT-2's Conv1D transposed)
    dW     = merged - W0            (out, in)   the change the adapter makes to the model (AUDIT-2)
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .. import backend
from ..adapters import peft_io
from ..adapters.base import Delta
from ..adapters.inject import find_targets, kind_of
from ..adapters.registry import layer_class
from ..autograd import Tensor, no_grad
from ..errors import ConfigError
from .files import AdapterFile, Checkpoint, natural
from .report import Finding

PREFIX = peft_io.PREFIX


def base_key(saved_key: str) -> str | None:
    """The base tensor a saved non-delta key replaces: a trained bias (`<layer>.base_layer.bias`) or a
    modules_to_save copy (`<module>.weight`), as PEFT saves them (PEFT-5)."""
    if not saved_key.startswith(PREFIX):
        return None
    return saved_key[len(PREFIX):].replace(".base_layer.", ".")


@dataclasses.dataclass
class Layer:
    path: str
    W0: np.ndarray  # (out, in), float64
    merged: np.ndarray  # (out, in): merge_into(W0)
    b0: np.ndarray | None  # the bias before the merge (a trained bias already in it), (out,)
    bias: np.ndarray | None  # the bias after it
    delta: Delta

    @property
    def dW(self) -> np.ndarray:
        return self.merged - self.W0  # (out, in)


def check_auditable(adapter: AdapterFile) -> None:
    """Only a method that changes weight matrices has a dW to audit (not prompt learning, not LN tuning's norms)."""
    cfg = adapter.cfg
    if not adapter.method.mergeable or getattr(cfg, "is_prompt_learning", False):
        raise ConfigError(f"{adapter.folder}: {adapter.method.title} is not a mergeable method (it changes no "
                          "weight), so it has no dW to audit")
    if cfg.TARGET_TYPES:
        raise ConfigError(f"{adapter.folder}: {adapter.method.title} changes {kind_of(cfg.TARGET_TYPES)} layers, "
                          f"not weight matrices, so it has no dW to audit")


def _stub(like, W0, b0):
    """A float Linear of like's class holding float64 copies of W0 (storage layout) and b0, on their backend."""
    layer = type(like).__new__(type(like))
    layer.in_features, layer.out_features = like.in_features, like.out_features
    copy = (lambda a: backend.xp_of(a).asarray(a, dtype=backend.xp_of(a).float64, copy=True))
    layer.weight = Tensor(copy(W0))
    layer.bias = None if b0 is None else Tensor(copy(b0))
    return layer


class AdapterLayers:
    """The layers `adapter` adapts on `base`, its tensors accounted for: `claimed` (read into a delta),
    `replaced` {base key: saved key} (trained biases, modules_to_save copies), `problems` (Findings about
    the adapter file: a tensor missing, of another shape than its config gives, or not finite)."""

    def __init__(self, adapter: AdapterFile, base: Checkpoint):
        cfg = adapter.cfg
        check_auditable(adapter)
        self.adapter, self.base, self.cfg = adapter, base, cfg
        self.net = base.skeleton()
        self.cls = layer_class(cfg)
        try:
            self.paths = sorted(find_targets(self.net, cfg), key=natural)
        except ConfigError as e:
            raise ConfigError(f"{adapter.config_path}: on {base.folder}: {e}") from None
        self.replaced = {base_key(k): k for k in adapter.tensors if base_key(k) in base}
        self.claimed: set = set()
        self.problems: list[Finding] = []
        self.rng = backend.RNG(0)
        self.shared_deltas, self.shared_ok = None, {}
        if self.shares(self.cls):
            stubs = {p: self.net.get_submodule(p) for p in self.paths}
            if getattr(self.cls, "CREATE_READS_W0", False):  # its shared tensors are built from every W0 (FRoD's V)
                stubs = {p: _stub(s, self.base.read(f"{p}.weight"), None) for p, s in stubs.items()}
            deltas, shared = self.cls.create_all(stubs, cfg, self.rng, False)
            ok = self._fill({f"base_model.{k}": t for k, t in shared.items()}, "the layers' shared tensors")
            self.shared_ok = {p: self._fill(self.saved(p, d), p) and ok for p, d in deltas.items()}
            for p, d in deltas.items():
                if self.shared_ok[p]:
                    self.from_file(d)
            self.shared_deltas = deltas

    @staticmethod
    def shares(cls) -> bool:
        """The method makes its deltas together (they share tensors): its own create_all, unless that only
        rewrites each base layer (QA-LoRA quantizes W0 there: it is built per layer, from the real W0)."""
        return (getattr(cls.create_all, "__func__", None) is not Delta.create_all.__func__
                and not getattr(cls, "REWRITES_BASE", False))

    @staticmethod
    def saved(path: str, delta) -> dict:
        """{saved key: Tensor} of one delta, as peft_io.adapter_tensors walks it."""
        return {f"{PREFIX}{path}.{n}": t for n, t in getattr(delta, "saved_parameters", delta.named_parameters)()}

    def _fill(self, expected: dict, where: str) -> bool:
        """Read the file's tensors into `expected`; a problem with one is a Finding, and False."""
        ok, file = True, self.adapter.weights_path
        for key, t in expected.items():
            arr = self.adapter.tensors.get(key)
            if arr is None:
                self.problems.append(Finding("adapter-missing", file, key,
                                             f"{where} needs {key}, which the file lacks; PEFT would leave it at its "
                                             "init (a warning only). Save the adapter again from the trained model"))
                ok = False
            elif tuple(arr.shape) != tuple(t.shape):
                self.problems.append(Finding("adapter-shape", file, key,
                                             f"shape {tuple(arr.shape)} in the file, {tuple(t.shape)} from "
                                             f"{self.rank_rule(where)}; PEFT refuses to load it (size mismatch). Fix "
                                             "r / rank_pattern in adapter_config.json to the shapes saved"))
                ok = False
            elif not np.all(np.isfinite(arr)):
                bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
                self.problems.append(Finding("adapter-nonfinite", file, key,
                                             f"{bad} NaN/Inf value(s) of {arr.size}: every output through this layer "
                                             "would be NaN. Retrain from the last finite checkpoint (lower the "
                                             "learning rate, clip gradients)"))
                ok = False
            else:
                peft_io.fill(t, arr, key, file, "float64")
            self.claimed.add(key)
        return ok

    def from_file(self, delta) -> None:
        """The delta's own step after its tensors are read, as load_adapters runs it (peft_io: SHiRA checks its
        positions, VB-LoRA builds its logits from a top-k file, FRoD rebuilds U from the file's V and W0)."""
        hook = getattr(delta, "from_file", None)
        if hook is not None:
            hook(self.adapter.weights_path)

    def rank_rule(self, where: str) -> str:
        rule = getattr(self.cfg, "rank_alpha_for", None)
        if rule is None or where not in self.paths:
            return "adapter_config.json"
        r, alpha = rule(where)
        return f"adapter_config.json (r={r}, lora_alpha={alpha} for {where} by r and rank_pattern)"

    def layer(self, path: str) -> Layer | None:
        """The layer at `path` merged by the method's own code, or None when the file's tensors for it have a
        problem (in self.problems)."""
        stub = self.net.get_submodule(path)
        W0 = self.base.read(f"{path}.weight")
        b0 = self.base.read(f"{path}.bias") if getattr(stub, "bias", None) is not None else None  # (an embedding has none)
        if b0 is not None and f"{path}.bias" in self.replaced:  # bias="all"/"lora_only": the trained bias
            b0 = self.adapter.tensors[self.replaced[f"{path}.bias"]]
        base = _stub(stub, W0, b0)
        with no_grad():
            if self.shared_deltas is not None:
                delta, ok = self.shared_deltas[path], self.shared_ok[path]
            else:
                delta = self.cls.create_all({path: base}, self.cfg, self.rng, False)[0][path]
                ok = self._fill(self.saved(path, delta), path)
                if ok:
                    self.from_file(delta)
            if not ok:
                return None
            delta.merge_into(base)
        out_in = (lambda a: a.T) if getattr(stub, "fan_in_fan_out", False) else (lambda a: a)  # an embedding: (V, d)
        bias = getattr(base, "bias", None)
        return Layer(path, out_in(W0), out_in(np.asarray(base.weight.data)), b0,
                     None if bias is None else np.asarray(bias.data), delta)

    def unexplained(self) -> list[str]:
        """Saved keys that no targeted layer, shared tensor or replaced base tensor accounts for (after every
        layer was read)."""
        return [k for k in sorted(self.adapter.tensors, key=natural)
                if k not in self.claimed and k not in self.replaced.values()]
