"""PEFT's `convert_to_lora` / `save_as_lora` on a model in memory (spec/audit.md AUDIT-22..24, as
`minipeft audit convert` does it on files): each layer's dW of adapter `name`, made by the method's own
merge on a float64 copy of W0, cut to its best rank-k fit by SVD (audit/convert.py's `factor`), written as a
plain LoRA with r = lora_alpha (scale 1). The trained copies of modules_to_save come along.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..autograd import no_grad
from ..errors import ConfigError
from ..quant.linear4bit import Linear4bit
from . import inject
from .modules_to_save import TrainedCopy
from .peft_io import PREFIX, write_adapter_folder


def layer_dW(layer, delta):
    """dW (out, in) of one delta on its layer, by its own merge_into on a float64 copy of W0 and b0, and whether
    the merge changes the bias."""
    base = layer.base_layer
    if isinstance(base, Linear4bit):
        raise ConfigError("convert_to_lora reads W0 to merge into; this layer is 4-bit. Dequantize first "
                          "(merge_and_unload() does) or convert the adapter folder: minipeft audit convert")
    from ..audit.layers import _stub
    stub = _stub(base, base.weight.data, None if base.bias is None else base.bias.data)
    with no_grad():
        delta.merge_into(stub)
    dW = backend.to_host(stub.weight.data) - np.asarray(backend.to_host(base.weight.data), dtype=np.float64)
    bias_changed = base.bias is not None and bool(np.any(backend.to_host(stub.bias.data)
                                                         != np.asarray(backend.to_host(base.bias.data), np.float64)))
    return (dW.T if getattr(base, "fan_in_fan_out", False) else dW), bias_changed


def convert_to_lora(model, rank, name: str = "default", show_progress: bool = False):
    """(adapter_config.json dict, {saved key: float32 array}, [ConvertRow]) of adapter `name` as a plain LoRA:
    rank an integer, or a float in (0, 1] (the share of ||dW||_F^2 each layer keeps), as PEFT's."""
    from ..audit.convert import add_layer, check_convertible, check_rank, lora_fields, refuse_embedding
    from ..audit.report import progress
    check_rank(rank)
    if name not in model.peft_configs:
        raise ConfigError(f"no adapter named {name!r}; the model has {sorted(model.peft_configs) or 'none'}")
    cfg = model.peft_configs[name]
    if getattr(cfg, "is_prompt_learning", False) or getattr(cfg, "TARGET_TYPES", None):
        raise ConfigError(f"adapter {name!r} ({type(cfg).__name__}) changes no weight matrix: nothing to convert")
    check_convertible(cfg, f"adapter {name!r}")
    layers = [(p, m) for p, m in inject.adapted_layers(model.net) if name in m.adapters]
    for path, layer in layers:
        refuse_embedding(layer.base_layer, path, f"adapter {name!r}")
    weights, rows = {}, []
    for path, layer in progress(layers, len(layers), "convert to LoRA", show_progress, "layer"):
        dW, bias_changed = layer_dW(layer, layer.adapters[name])
        rows.append(add_layer(weights, path, dW, rank, bias_changed, f"adapter {name!r}"))
    if not rows:
        raise ConfigError(f"adapter {name!r} adapts no layer")
    for path, m in model.net.named_modules():  # modules_to_save: the trained copy, as PEFT keeps it
        if isinstance(m, TrainedCopy) and name in m.modules_to_save:
            for pname, p in m.modules_to_save[name].named_parameters():
                weights[f"{PREFIX}{path}.{pname}"] = np.ascontiguousarray(backend.to_host(p.data), dtype=np.float32)
    config = lora_fields({r.path: r.rank for r in rows}, cfg.modules_to_save, model.config.model_type,
                         model.name_or_path)
    return config, weights, rows


def save_as_lora(model, path: str, rank, name: str = "default", show_progress: bool = True) -> list:
    """convert_to_lora written to `path` (PEFT's layout, one atomic folder write); returns each layer's
    ConvertRow (its rank and relative error)."""
    config, weights, rows = convert_to_lora(model, rank, name, show_progress)
    write_adapter_folder(path, weights, config)
    return rows
