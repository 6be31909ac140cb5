"""`audit convert ADAPTER OUT --rank K`: any mergeable adapter as a plain LoRA (spec/audit.md AUDIT-22..24),
PEFT's `convert_to_lora` / `save_as_lora`.

Per adapted layer, dW (out, in) by the method's own merge (layers.py), with its thin SVD dW = U S V^T:
    k        = K                      (an integer rank), or
             = min { j : s_1^2 + ... + s_j^2 >= t ||dW||_F^2 }    (K = t a float in (0, 1], PEFT's threshold)
    lora_B   = U_k S_k  (out, k),  lora_A = V_k^T  (k, in),  r = alpha = k  (scale 1)
    error    = ||dW - lora_B lora_A||_F / ||dW||_F = sqrt(s_{k+1}^2 + ... ) / ||dW||_F    (Eckart-Young)
"""
from __future__ import annotations

import collections
import dataclasses
import re
import warnings

import numpy as np

from ..adapters.lora import LoRAConfig
from ..adapters.peft_io import PREFIX, config_fields, write_adapter_folder
from ..nn.layers import Embedding
from ..errors import ConfigError
from .adapter import open_base
from .files import read_adapter
from .layers import AdapterLayers
from .report import Report, fmt, progress


@dataclasses.dataclass
class ConvertRow:
    path: str
    shape: tuple  # dW's (out, in)
    rank: int  # k, the LoRA's rank here
    rel_error: float  # ||dW - B A||_F / ||dW||_F (0 for dW = 0)
    energy: float  # the share of ||dW||_F^2 the k kept singular values hold (1 for dW = 0)


@dataclasses.dataclass
class ConvertReport(Report):
    adapter: str
    base: str
    method: str
    out: str | None  # the folder written (None: nothing written, see findings)
    rank_rule: str
    layers: list
    findings: list
    parameters: int = 0  # the LoRA's r (in + out) summed over the layers

    command = "audit convert"

    def lines(self) -> list[str]:
        out = [f"adapter {self.adapter} ({self.method})", f"base {self.base}", f"rank: {self.rank_rule}",
               f"{len(self.layers)} layer(s):", f"  {'layer':<56} {'shape':>12} {'r':>4} {'rel err':>9} {'energy':>7}"]
        for row in self.layers:
            out.append(f"  {row.path:<56} {'x'.join(map(str, row.shape)):>12} {row.rank:>4} {fmt(row.rel_error):>9} "
                       f"{row.energy:7.4f}")
        if self.layers:
            worst = max(self.layers, key=lambda r: r.rel_error)
            out.append(f"worst relative error {fmt(worst.rel_error)} ({worst.path})")
        if self.out:
            out.append(f"wrote {self.out}: a LoRA with {self.parameters} trainable parameters (r = lora_alpha per "
                       "layer, so the scale is 1)")
        return out

    def heat(self):
        return "relative error of the LoRA", {r.path: r.rel_error for r in self.layers}


def check_rank(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise ConfigError(f"--rank {rank!r} must be an integer rank or an energy share in (0, 1]")
    if isinstance(rank, int) and rank <= 0:
        raise ConfigError(f"--rank {rank} must be a positive integer (a rank) or a number in (0, 1] (an energy share)")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ConfigError(f"--rank {rank!r}: a float is the share of ||dW||_F^2 to keep and must lie in (0, 1]")


def kept_rank(s, rank) -> int:
    """AUDIT-22: k for singular values s (descending): the rank given, or the smallest j whose leading j values hold
    a share >= rank of sum s^2 (PEFT's searchsorted rule; 1 for dW = 0)."""
    if isinstance(rank, int):
        return rank
    cs = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    return int(np.searchsorted(cs, rank * cs[-1], side="left")) + 1


def factor(dW, rank, path: str):
    """AUDIT-22/23: (lora_A (k, in), lora_B (out, k), ConvertRow) of one layer's dW (out, in)."""
    U, S, Vt = np.linalg.svd(dW, full_matrices=False)
    k = kept_rank(S, rank)
    if k > S.size:
        raise ConfigError(f"{path}: --rank {k} exceeds min(out, in) = {S.size} of its dW {dW.shape}; choose a "
                          f"rank <= {S.size} (or an energy share)")
    total = float(np.sum(S * S))
    tail = float(np.sum(S[k:] ** 2))
    row = ConvertRow(path, tuple(dW.shape), k, float(np.sqrt(tail / total)) if total > 0 else 0.0,
                     1.0 - tail / total if total > 0 else 1.0)
    return Vt[:k], U[:, :k] * S[:k], row


def check_convertible(cfg, where: str) -> None:
    """AUDIT-22: what a plain LoRA of this conversion cannot carry, refused before anything is read: trained biases
    (PEFT's convert_to_lora refuses them too), trained embedding rows, and a method that is not mergeable (aLoRA)."""
    from ..adapters.registry import method_of
    if not method_of(cfg).mergeable:
        raise ConfigError(f"{where}: {method_of(cfg).name} is not a mergeable method (its update is not one weight matrix), so "
                          "no LoRA can stand for it")
    if getattr(cfg, "bias", "none") != "none" or getattr(cfg, "lora_bias", False):
        raise ConfigError(f"{where}: the adapter trains biases (bias={getattr(cfg, 'bias', 'none')!r}, "
                          f"lora_bias={getattr(cfg, 'lora_bias', False)}), which a plain LoRA cannot carry; PEFT's "
                          "convert_to_lora refuses them too")
    if getattr(cfg, "trainable_token_indices", None):
        raise ConfigError(f"{where}: the adapter trains embedding rows (trainable_token_indices), which this "
                          "conversion does not carry; convert an adapter without them")


def refuse_embedding(layer, path: str, where: str) -> None:
    """AUDIT-22: an adapted embedding (LORA-15, keys lora_embedding_A/B) is not carried by this conversion's
    lora_A, lora_B of linear layers: a ConfigError before anything is written."""
    if isinstance(layer, Embedding):
        raise ConfigError(f"{where}: it adapts the embedding {path}, which this conversion (lora_A, lora_B of linear "
                          "layers) does not carry; convert an adapter without embedding targets")


def add_layer(weights: dict, path: str, dW, rank, bias_changed: bool, where: str) -> ConvertRow:
    """AUDIT-22/23: the layer's lora_A, lora_B (float32) into weights; its row. A layer whose bias the method
    changes cannot be carried by a plain LoRA (a ConfigError)."""
    if bias_changed:
        raise ConfigError(f"{where}: it changes the bias of {path}, which a plain LoRA cannot carry; it cannot be "
                          "converted")
    lora_A, lora_B, row = factor(dW, rank, path)
    weights[f"{PREFIX}{path}.lora_A.weight"] = np.ascontiguousarray(lora_A, dtype=np.float32)
    weights[f"{PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(lora_B, dtype=np.float32)
    return row


def audit_convert(adapter: str, rank, out: str, base: str | None = None, show_progress: bool = True) -> ConvertReport:
    check_rank(rank)
    A = read_adapter(adapter)
    check_convertible(A.cfg, A.config_path)
    B = open_base(A, base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = AdapterLayers(A, B)
    rows, weights = [], {}
    for path in layers.paths:
        refuse_embedding(layers.net.get_submodule(path), path, f"{A.folder} ({A.method.title})")
    for path in progress(layers.paths, len(layers.paths), "audit convert", show_progress, "layer"):
        layer = layers.layer(path)
        if layer is None:  # its tensors' problem is in layers.problems
            continue
        changed = layer.bias is not None and not np.array_equal(layer.bias, layer.b0)
        rows.append(add_layer(weights, path, layer.dW, rank, changed, f"{A.folder} ({A.method.title})"))
        del layer
    rule = (f"{rank} at every layer" if isinstance(rank, int) else
            f"per layer the smallest k keeping a share >= {rank:g} of ||dW||_F^2")
    report = ConvertReport(A.folder, B.folder, A.method.title, None, rule, rows, list(layers.problems))
    if report.findings:  # a layer could not be read: write nothing rather than a LoRA without it
        return report
    for saved in layers.replaced.values():  # modules_to_save copies, as PEFT keeps them
        weights[saved] = np.ascontiguousarray(A.tensors[saved], dtype=np.float32)
    write_adapter_folder(out, weights, lora_config(A, B, {r.path: r.rank for r in rows}))
    report.out = out
    report.parameters = sum(r.rank * (r.shape[0] + r.shape[1]) for r in rows)
    return report


def lora_config(A, B, ranks: dict) -> dict:
    """AUDIT-24: adapter_config.json of the LoRA converted from adapter file A on base B."""
    model_type = B.config.get("model_type") or ("gpt2" if A.raw.get("fan_in_fan_out") else None)
    d = lora_fields(ranks, getattr(A.cfg, "modules_to_save", ()), model_type, A.raw.get("base_model_name_or_path"))
    d["task_type"] = A.raw.get("task_type", d["task_type"])
    return d


def lora_fields(ranks: dict, modules_to_save, model_type, name_or_path) -> dict:
    """AUDIT-24: a LoRA's adapter_config.json for {layer path: k}: the layers by full path, r = lora_alpha = the
    most common k, the other layers' k in rank_pattern = alpha_pattern (escaped full paths), modules_to_save."""
    counts = collections.Counter(ranks.values())
    r = max(counts, key=lambda v: (counts[v], v))
    pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
    cfg = LoRAConfig(rank=r, alpha=r, target_modules=tuple(ranks), rank_pattern=pattern, alpha_pattern=dict(pattern),
                     modules_to_save=tuple(modules_to_save or ()))
    return config_fields(cfg, model_type, name_or_path)
