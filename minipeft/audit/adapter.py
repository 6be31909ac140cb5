"""`audit adapter ADAPTER [--base BASE]`: what did this adapter learn, and is it what its config says?
(spec/audit.md AUDIT-8..AUDIT-10)

Per adapted layer, from dW (out, in) made by the method's own merge (layers.py), with s_1 >= s_2 >= ... its
singular values (AUDIT-9):
    ||dW||_F, ||dW||_2 = s_1
    stable rank      = ||dW||_F^2 / ||dW||_2^2
    effective rank   = exp(-sum_k p_k log p_k),  p_k = s_k / sum_j s_j      (Roy & Vetterli 2007)
    ||dW||_F / ||W0||_F                                                      (with a base)
    scale            = alpha / r, or alpha / sqrt(r) with use_rslora       (LoRA-family configs)
Checks (AUDIT-10): target_modules entries that match no linear layer of BASE, tensors of the file that are
missing, misshapen or hold NaN/Inf, and saved tensors the config does not explain.
"""
from __future__ import annotations

import dataclasses
import re
import warnings

import numpy as np

from ..adapters.inject import find_targets, kind_of, leaf_names, linear_paths, target_types, unmatched_entries
from ..adapters.lora import lora_scaling
from ..errors import ConfigError, MiniPeftError
from ..adapters.peft_io import PREFIX, write_adapter_folder
from .files import Checkpoint, ImpliedBase, base_for, read_adapter
from .intruders import intruders, reduce_layer
from .layers import AdapterLayers, check_auditable
from .report import Finding, Report, fmt, progress

SHOWN = 64  # singular values kept per row (the statistics use them all)


@dataclasses.dataclass
class Spectrum:
    fro: float  # ||dW||_F
    spectral: float  # ||dW||_2 = s_1
    stable_rank: float  # ||dW||_F^2 / ||dW||_2^2 (0 for dW = 0)
    effective_rank: float  # exp(entropy of s / sum s) (0 for dW = 0)
    singular_values: list  # the largest SHOWN, descending


def spectrum(s) -> Spectrum:
    """AUDIT-9: the statistics of singular values s (any order, >= 0)."""
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1]
    top = float(s[0]) if s.size else 0.0
    fro = float(np.sqrt(np.sum(s * s)))
    if top == 0.0:
        return Spectrum(0.0, 0.0, 0.0, 0.0, s[:SHOWN].tolist())
    p = s[s > 0] / np.sum(s)
    return Spectrum(fro, top, fro * fro / (top * top), float(np.exp(-np.sum(p * np.log(p)))), s[:SHOWN].tolist())


@dataclasses.dataclass
class LayerRow:
    path: str
    shape: tuple  # dW's (out, in)
    r: int | None  # the config's rank for this layer (LoRA family)
    alpha: float | None
    scale: float | None  # alpha / r, or alpha / sqrt(r) with use_rslora
    spectrum: Spectrum
    rel_fro: float | None  # ||dW||_F / ||W0||_F, with a base
    intruders: int | None = None  # intruder dimensions among W0 + dW's top k (AUDIT-19), with a base


@dataclasses.dataclass
class AdapterReport(Report):
    adapter: str
    base: str
    method: str
    scale_rule: str | None
    layers: list
    findings: list
    intruder_rule: str | None = None  # k and epsilon of AUDIT-19, with a base
    reduced: str | None = None  # the folder --reduce-intruders wrote (AUDIT-20)
    reduced_layers: list = dataclasses.field(default_factory=list)  # the layers whose factors it changed
    reduced_rule: str | None = None  # mitigation lambda

    command = "audit adapter"

    def lines(self) -> list[str]:
        out = [f"adapter {self.adapter} ({self.method})", f"base {self.base}"]
        if self.scale_rule:
            out.append(f"scale: {self.scale_rule}")
        if self.intruder_rule:
            out.append(f"intruders: {self.intruder_rule}")
        out.append(f"{len(self.layers)} layer(s):")
        out.append(f"  {'layer':<56} {'r':>3} {'scale':>7} {'|dW|_F':>9} {'|dW|_2':>9} "
                   f"{'srank':>6} {'erank':>6} {'|dW|/|W|':>9} {'intr':>4}  top singular values")
        for row in self.layers:
            sp = row.spectrum
            out.append(f"  {row.path:<56} {row.r if row.r is not None else '-':>3} "
                       f"{fmt(row.scale) if row.scale is not None else '-':>7} {fmt(sp.fro):>9} {fmt(sp.spectral):>9} "
                       f"{sp.stable_rank:6.2f} {sp.effective_rank:6.2f} "
                       f"{fmt(row.rel_fro) if row.rel_fro is not None else '-':>9} "
                       f"{row.intruders if row.intruders is not None else '-':>4}  "
                       + " ".join(fmt(v) for v in sp.singular_values[:4]))
        if self.reduced:
            out.append(f"wrote {self.reduced}: intruders reduced in {len(self.reduced_layers)} layer(s) "
                       f"({self.reduced_rule}), every other tensor copied")
        return out

    def heat(self):
        return "||dW||_F", {row.path: row.spectrum.fro for row in self.layers}

    def spectra(self) -> dict:
        return {row.path: row.spectrum.singular_values for row in self.layers}


def needs_base(adapter) -> str | None:
    """Why dW of this adapter depends on W0 or on base tensors (so BASE is needed), or None: a plain LoRA or
    rsLoRA whose file holds lora_A / lora_B weights only (AUDIT-8)."""
    cfg = adapter.cfg
    if adapter.method.name != "lora":
        return f"{adapter.method.title}'s dW depends on W0"
    if getattr(cfg, "init", "default") not in ("default", "gaussian"):
        return f"init_lora_weights={cfg.init!r} rewrites W0 on load"
    if cfg.bias != "none" or cfg.lora_bias or cfg.modules_to_save:
        return "it trains biases or saves whole modules, which are compared with the base's"
    other = [k for k in adapter.tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    return f"its file holds {other[0]!r}, which is not a LoRA factor" if other else None


def unmatched_targets(base: Checkpoint, adapter) -> list[Finding]:
    """AUDIT-10: targets that match no linear layer of BASE: all of them (one finding), else each target_modules
    list entry that matches none."""
    cfg, net = adapter.cfg, base.skeleton()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            find_targets(net, cfg)
    except ConfigError as e:
        return [Finding("target-unmatched", adapter.config_path, None, f"{e}; {NOTHING}")]
    types = target_types(cfg)
    paths, kind = linear_paths(net, types), kind_of(types)
    return [Finding("target-unmatched", adapter.config_path, None,
                    f"target_modules entry {e!r} matches no {kind} layer of {base.folder} (PEFT loads nothing there "
                    f"and says little); its {kind} layers are named {leaf_names(paths)}. Fix the entry or drop it")
            for e in unmatched_entries(paths, cfg.target_modules)]


NOTHING = "the adapter changes nothing on this base"


def pattern_findings(adapter, base: Checkpoint) -> list[Finding]:
    """AUDIT-21: rank_pattern / alpha_pattern entries PEFT cannot reload as meant: a key that is not a valid regular
    expression (PEFT's load raises), a rank that is not a positive integer (PEFT cannot build the layer), a key
    that matches no adapted layer (PEFT ignores it without a word, so the rank or alpha it names applies nowhere)."""
    cfg, out = adapter.cfg, []
    patterns = {f: getattr(cfg, f, None) or {} for f in ("rank_pattern", "alpha_pattern")}
    if not any(patterns.values()):
        return out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            paths = find_targets(base.skeleton(), cfg)
    except (ConfigError, re.error):
        paths = []
    for field, pattern in patterns.items():
        for key, value in pattern.items():
            try:
                rx = re.compile(rf"(.*\.)?({key})$")
            except re.error as e:
                out.append(Finding("pattern-invalid", adapter.config_path, None,
                                   f"{field} key {key!r} is not a regular expression ({e}): PEFT raises re.error on "
                                   "load. Escape it (re.escape) or write the module path plainly"))
                continue
            if field == "rank_pattern" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                out.append(Finding("pattern-invalid", adapter.config_path, None,
                                   f"rank_pattern[{key!r}] = {value!r} is not a positive integer: PEFT cannot build "
                                   "a layer of that rank. Write the rank the file's tensors have"))
            if paths and not any(rx.match(p) for p in paths):
                out.append(Finding("pattern-unmatched", adapter.config_path, None,
                                   f"{field} key {key!r} matches no adapted layer (PEFT's rule: the whole path or a "
                                   f"dotted suffix of it, e.g. {paths[0]!r}): PEFT ignores it silently, so the value "
                                   f"{value!r} applies nowhere. Fix the key or drop the entry"))
    return out


def open_base(A, base: str | None) -> Checkpoint:
    """AUDIT-8: BASE (given, else the config's), or for a plain LoRA without one the base its file implies."""
    check_auditable(A)  # a method with no dW (prompt learning, LN tuning) is refused before any base is read
    if base is not None:
        return base_for(A, base)
    try:
        return base_for(A, None)
    except MiniPeftError as e:
        reason = needs_base(A)
        if reason:
            raise ConfigError(f"{e}; BASE is needed here: {reason}") from None
        return ImpliedBase(A)  # a plain LoRA's dW needs no base


def open_layers(adapter: str, base: str | None):
    """(AdapterFile, its base Checkpoint, AdapterLayers) of an adapter folder (AUDIT-2, AUDIT-8)."""
    A = read_adapter(adapter)
    B = open_base(A, base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return A, B, AdapterLayers(A, B)


def audit_adapter(adapter: str, base: str | None = None, show_progress: bool = True, intruder_k: int = 10,
                  intruder_epsilon: float = 0.5, reduce_intruders: str | None = None,
                  mitigation_lambda: float = 0.75) -> AdapterReport:
    if isinstance(intruder_k, bool) or not isinstance(intruder_k, int) or intruder_k < 0:
        raise ConfigError(f"--intruder-k {intruder_k!r} must be an integer >= 0 (0: no intruder count)")
    if not 0 < intruder_epsilon <= 1:
        raise ConfigError(f"--intruder-epsilon {intruder_epsilon!r} must lie in (0, 1] (a cosine similarity)")
    A = read_adapter(adapter)
    B = open_base(A, base)
    real = not isinstance(B, ImpliedBase)
    if reduce_intruders is not None:
        check_reducible(A, real, intruder_k, mitigation_lambda)
    findings = unmatched_targets(B, A) if real else []
    findings += pattern_findings(A, B)
    if any(NOTHING in f.message or f.kind == "pattern-invalid" for f in findings):  # no layers to build
        return AdapterReport(A.folder, B.folder, A.method.title, None, [], findings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = AdapterLayers(A, B)
    cfg, rows, reduced = A.cfg, [], {}
    count = real and intruder_k > 0
    lora = hasattr(cfg, "rank_alpha_for") and hasattr(cfg, "use_rslora")
    for path in progress(layers.paths, len(layers.paths), "audit adapter", show_progress, "layer"):
        layer = layers.layer(path)
        if layer is None:  # its tensors' problem is in layers.problems
            continue
        dW = layer.dW
        sp = spectrum(np.linalg.svd(dW, compute_uv=False))
        r, alpha = cfg.rank_alpha_for(path) if lora else (None, None)
        scale = lora_scaling(alpha, r, cfg.use_rslora) if lora else None
        w0 = float(np.linalg.norm(layer.W0)) if real else 0.0
        n = intruders(layer.W0, layer.merged, intruder_k, intruder_epsilon) if count and not reduce_intruders else None
        if reduce_intruders is not None:  # (count is True: check_reducible)
            new = reduce_layer(layer.W0, dW, scale, r, intruder_k, intruder_epsilon, mitigation_lambda)
            n = 0 if new is None else new[2]
            if new is not None:
                reduced[path] = new[:2]
        rows.append(LayerRow(path, tuple(dW.shape), r, alpha, scale, sp, sp.fro / w0 if w0 > 0 else None, n))
        del layer, dW
    findings += layers.problems
    findings += [Finding("unexplained-tensor", A.weights_path, k,
                         "the config explains no such tensor (no targeted layer, shared tensor or base tensor it "
                         "replaces): PEFT ignores it on load. Check target_modules / the base model, or drop it")
                 for k in layers.unexplained()]
    rule = ("alpha / sqrt(r) (use_rslora)" if cfg.use_rslora else "alpha / r") if lora else None
    shown = (f"of the top {intruder_k} left singular vectors of W0 + dW, those whose |cos| with every left singular "
             f"vector of W0 is below {intruder_epsilon:g} (Shuttleworth et al. 2024)") if count else None
    report = AdapterReport(A.folder, B.folder, A.method.title, rule, rows, findings, shown)
    if reduce_intruders is not None and not findings:
        write_reduced(A, reduced, reduce_intruders)
        report.reduced, report.reduced_layers = reduce_intruders, sorted(reduced, key=list(layers.paths).index)
        report.reduced_rule = f"lambda {mitigation_lambda:g}"
    elif reduce_intruders is not None:
        report.findings.append(Finding("not-written", reduce_intruders, None,
                                       "--reduce-intruders wrote nothing: the adapter has the findings above; fix "
                                       "them first"))
    return report


def check_reducible(A, real: bool, k: int, lam: float) -> None:
    """AUDIT-20's preconditions: a plain LoRA (PEFT's reduce_intruder_dimension takes LoRA only), a real base,
    k > 0 and lambda in [0, 1]."""
    cfg = A.cfg
    if A.method.name != "lora":
        raise ConfigError(f"{A.config_path}: --reduce-intruders rewrites LoRA factors; this is a {A.method.title} "
                          "adapter (PEFT's reduce_intruder_dimension takes LoRA only). Convert it first: "
                          "minipeft audit convert ADAPTER --rank K OUT")
    if getattr(cfg, "init", "default") not in ("default", "gaussian"):
        raise ConfigError(f"{A.config_path}: init_lora_weights={cfg.init!r} rewrites W0 on load, so reduced factors "
                          "would not fit the base they are loaded on; --reduce-intruders takes adapters whose base "
                          "is W0 as stored")
    if not real:
        raise ConfigError("--reduce-intruders needs the base (W0's singular vectors): pass --base FOLDER")
    if k <= 0:
        raise ConfigError("--reduce-intruders needs --intruder-k > 0")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
        raise ConfigError(f"--mitigation-lambda {lam!r} must lie in [0, 1] (the part of each intruder kept)")


def write_reduced(A, reduced: dict, out: str) -> None:
    """AUDIT-20: the adapter with each reduced layer's lora_A / lora_B replaced, every other tensor and the config
    as they are (float32, written atomically)."""
    weights = {k: np.asarray(v, dtype=v.dtype if np.issubdtype(v.dtype, np.integer) else np.float32)
               for k, v in A.tensors.items()}
    for path, (lora_A, lora_B) in reduced.items():
        weights[f"{PREFIX}{path}.lora_A.weight"] = np.ascontiguousarray(lora_A, dtype=np.float32)
        weights[f"{PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(lora_B, dtype=np.float32)
    write_adapter_folder(out, weights, A.raw)
