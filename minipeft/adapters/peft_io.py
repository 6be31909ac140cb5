"""PEFT's on-disk adapter format (spec/peft-format.md PEFT-1..PEFT-7).

A folder holds adapter_config.json and adapter_model.safetensors (float32, metadata format=pt).
The adapter named "default" is saved at the top, every other one in <folder>/<name>/; loading finds
them the same way (and a training checkpoint's in its adapter/ folder).
Keys: "base_model.model." + module path + "." + parameter path inside the delta module, which are
PEFT's leaf names (lora_A.weight, ...): one generic walk, no per-method table. modules_to_save
copies are saved under the original module path. Loading is strict: a key the model lacks, a
parameter the file lacks, a shape that differs or a NaN is an error naming the keys (PEFT only
warns, and loads nothing when the prefix is missing); strict=False returns them as a report.
"""
from __future__ import annotations

import os

import numpy as np

from .. import backend
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_save_dir, atomic_write_json, read_json
from ..models.io import refuse_pickled
from ..safetensors_io import read_safetensors, write_safetensors
from ..nn.layers import Embedding, Linear
from .base import COMMON_FIELDS, NAME_RE, AdaptedLayer
from .modules_to_save import TrainedCopy
from .prompt_learning import check_loaded, fit_to_file, prompt_of
from .registry import config_class

PREFIX = "base_model.model."
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
TASK_TYPES = {"bert": "FEATURE_EXTRACTION"}  # every other family is a causal LM
ADAPTER_CONVERSION = "PEFT's PeftModel.from_pretrained(base_model, folder).save_pretrained(folder, safe_serialization=True)"


def adapter_tensors(model, name: str) -> dict:
    """{saved key: Tensor} of one adapter (PEFT-2)."""
    if prompt_of(model.net, name) is not None:  # prompt learning: bare keys (adapters/prompt_learning.py)
        return prompt_of(model.net, name).saved_tensors()
    out = {}
    for path, m in model.net.named_modules():
        if isinstance(m, AdaptedLayer) and name in m.adapters:
            delta = m.adapters[name]  # a delta may save a layout of its own (AdaLoRA prunes by rank_pattern)
            for pname, p in getattr(delta, "saved_parameters", delta.named_parameters)():
                out[f"{PREFIX}{path}.{pname}"] = p
        if isinstance(m, TrainedCopy) and name in m.modules_to_save:
            for pname, p in m.modules_to_save[name].named_parameters():
                out[f"{PREFIX}{path}.{pname}"] = p
    for key, p in _bias_tensors(model, model.peft_configs[name]).items():
        out.setdefault(key, p)
    shared = getattr(model, "shared_tensors", {}).get(name, {})  # VeRA's projections: base_model.<name>
    out.update({f"base_model.{k}": t for k, t in shared.items()})
    return out


def _bias_tensors(model, cfg) -> dict:
    """Base biases trained under bias="all" / "lora_only", saved under their module path as PEFT does:
    an adapted layer's bias is `<layer>.base_layer.bias` (PEFT-5)."""
    mode = getattr(cfg, "bias", "none")
    out = {}
    if mode == "none":
        return out
    for path, m in model.net.named_modules():
        b = getattr(m, "bias", None)
        if b is None or ".adapters." in path or ".modules_to_save." in path or not hasattr(b, "requires_grad"):
            continue
        if mode == "all" or path.endswith(".base_layer"):
            out[f"{PREFIX}{path}.bias"] = b
    return out


def config_dict(model, cfg) -> dict:
    return config_fields(cfg, model.config.model_type, model.name_or_path)


def config_fields(cfg, model_type: str | None, name_or_path) -> dict:
    """adapter_config.json of `cfg` on a model of `model_type` named `name_or_path` (PEFT-2)."""
    d = {"peft_type": cfg.peft_type, "task_type": TASK_TYPES.get(model_type, "CAUSAL_LM"),
         "base_model_name_or_path": name_or_path, "inference_mode": True,
         "target_modules": cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules),
         "layers_to_transform": _list_or_none(cfg.layers_to_transform), "layers_pattern": cfg.layers_pattern,
         "modules_to_save": list(cfg.modules_to_save) or None, "exclude_modules": list(cfg.exclude_modules) or None,
         "fan_in_fan_out": model_type == "gpt2"}
    d = {k: v for k, v in d.items() if k not in COMMON_FIELDS + ("fan_in_fan_out",) or k in cfg.PEFT_COMMON}
    if getattr(cfg, "is_prompt_learning", False):  # PEFT's PromptLearningConfig has no target fields
        d = {k: d[k] for k in ("peft_type", "task_type", "base_model_name_or_path", "inference_mode")}
    d.update(cfg.to_peft())
    return d


def _list_or_none(v):
    return None if v is None else ([v] if isinstance(v, int) else list(v))


def kept_dtype(t):
    """float32 for weights; positions (SHiRA's shira_indices, VB-LoRA's top-k indices) keep their integer dtype (IO-8)."""
    return backend.dtype_name(t.data) if backend.dtype_name(t.data).startswith(("int", "uint")) else np.float32


def save_adapters(model, path: str, names=None) -> None:
    names = list(model.peft_configs) if names is None else ([names] if isinstance(names, str) else list(names))
    if not names:
        raise ConfigError("the model has no adapters to save; apply_adapter() or load_adapters() first")
    for name in names:
        if name not in model.peft_configs:
            raise ConfigError(f"no adapter named {name!r}; the model has {sorted(model.peft_configs)}")
        folder = path if name == "default" else os.path.join(path, name)
        os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
        weights = {k: np.ascontiguousarray(backend.to_host(t.data), dtype=kept_dtype(t))
                   for k, t in adapter_tensors(model, name).items()}
        write_adapter_folder(folder, weights, config_dict(model, model.peft_configs[name]))


def write_adapter_folder(folder: str, weights: dict, config: dict) -> None:
    """An adapter folder in PEFT's layout ({key: host array}, adapter_config.json's dict), written to a temporary
    folder that is renamed into place (fileio.atomic_save_dir): a crash leaves no half adapter."""
    with atomic_save_dir(folder) as tmp:
        write_safetensors(os.path.join(tmp, WEIGHTS_NAME), weights, {"format": "pt"})
        atomic_write_json(os.path.join(tmp, CONFIG_NAME), config)


def read_adapter_config(folder: str):
    path = os.path.join(folder, CONFIG_NAME)
    d = read_json(path, f"{folder}: no {CONFIG_NAME}; is this an adapter folder (saved by PEFT or minipeft)?")
    if not isinstance(d, dict) or not isinstance(d.get("peft_type"), str):
        raise CheckpointError(f"{path}: field 'peft_type' is missing or not a string")
    cls = config_class(d["peft_type"], path, d)
    try:
        return cls.from_peft(d)
    except (ConfigError, TypeError, ValueError) as e:  # read as the peft_type's config: say which one
        raise CheckpointError(f"{path}: {e} (read as peft_type {d['peft_type']!r}, {cls.__name__})") from e


def load_adapters(model, path: str, name: str = "default", strict: bool = True, subfolder: str | None = None):
    """Add the adapters found from `path` (PEFT-7): one folder's as `name`, sub-folders' under their names.
    Returns {"missing": [...], "unexpected": [...]} for one adapter, {name: that} for several."""
    found = adapter_folders(path, name, subfolder)
    clash = [n for n, _ in found if n in model.peft_configs]
    if clash:
        raise ConfigError(f"{path}: the model has adapters named {clash} already; delete_adapter() them first"
                          + (" or pass another name=" if clash == [name] else ""))
    reports = {}
    try:
        for n, folder in found:
            reports[n] = load_adapter_folder(model, folder, n, strict)
    except Exception:
        for n in reports:  # all or none: the ones this call loaded go again
            model.delete_adapter(n)
        raise
    return reports[name] if list(reports) == [name] else reports


def adapter_folders(path: str, name: str, subfolder: str | None = None) -> list:
    """[(adapter name, folder)]: `path` (or path/subfolder) itself when it holds adapter_config.json, each
    sub-folder that holds one, under its name; a training checkpoint-N (trainer_state.json) is read through
    its adapter/ folder. Nothing found: a CheckpointError listing what is there."""
    root = os.path.join(path, subfolder) if subfolder else path
    if not os.path.isdir(root):
        raise CheckpointError(f"{root}: no such adapter folder ({os.path.abspath(root)})")
    holds = lambda *parts: os.path.isfile(os.path.join(root, *parts))  # noqa: E731
    if not holds(CONFIG_NAME) and holds("trainer_state.json") and os.path.isdir(os.path.join(root, "adapter")):
        root = os.path.join(root, "adapter")  # a training checkpoint-N (minipeft/checkpoints.py)
    subs = [d for d in sorted(os.listdir(root)) if not d.startswith(".") and holds(d, CONFIG_NAME)]  # .x: killed
    for d in subs:
        if not NAME_RE.match(d):
            raise CheckpointError(f"{os.path.join(root, d)}: the sub-folder's name {d!r} is not an adapter name "
                                  f"(letters, digits, '_', '-'); load it alone with subfolder={d!r} and a name=")
    found = ([(name, root)] if holds(CONFIG_NAME) else []) + [(d, os.path.join(root, d)) for d in subs]
    if found:
        return found
    refuse_pickled(root, WEIGHTS_NAME, ADAPTER_CONVERSION)  # IO-5: only pickled weights here
    entries = sorted(d + "/" * os.path.isdir(os.path.join(root, d)) for d in os.listdir(root) if not d.startswith("."))
    runs = [e.rstrip("/") for e in entries if e.startswith("checkpoint-") and e.endswith("/")]
    hint = f"; training checkpoints here: pass one, e.g. {os.path.join(root, runs[-1])}" if runs else ""
    raise CheckpointError(f"{root}: no adapter found. load_adapters reads a folder with {CONFIG_NAME}, a folder "
                          f"whose sub-folders hold one each (loaded under the sub-folders' names), a training "
                          f"checkpoint-N folder (its adapter/), or path with subfolder=. Found: "
                          f"{', '.join(entries[:12]) + (' ...' if len(entries) > 12 else '') or 'an empty folder'}"
                          f"{hint}")


def load_adapter_folder(model, path: str, name: str, strict: bool) -> dict:
    """Add adapter `name` from one PEFT folder. Returns {"missing": [...], "unexpected": [...]}."""
    refuse_pickled(path, WEIGHTS_NAME, ADAPTER_CONVERSION)  # IO-5, before any file is read
    cfg = read_adapter_config(path)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME} (minipeft never reads pickled adapter_model.bin)")
    loaded, _ = read_safetensors(weights_path)
    check_sizes(cfg, loaded, os.path.join(path, CONFIG_NAME))
    try:
        model.apply_adapter(cfg, name, init_weights=False)
    except ConfigError as e:
        raise CheckpointError(f"{path}: this adapter does not fit the model: {e} (read as peft_type "
                              f"{cfg.peft_type!r}, {type(cfg).__name__})") from e
    try:
        fit_to_file(model, name, loaded)  # a PEFT prompt file has no encoder tensors
        for path, check_shapes in deltas_with(model, name, "check_shapes"):  # a delta explains a misfit (BOFT-9)
            check_shapes(loaded, f"{PREFIX}{path}.", weights_path)
        report = _assign(model, name, loaded, weights_path, strict)
        check_loaded(model, name, loaded, weights_path)
        for _, from_file in deltas_with(model, name, "from_file"):  # a delta holding positions checks them (SHIRA-8),
            from_file(weights_path)  # or builds its tensors from the file's form (VB-LoRA's top-k logits, VBLORA-8)
    except Exception:
        model.delete_adapter(name)  # leave no half-loaded adapter behind
        raise
    return report


def deltas_with(model, name: str, hook: str) -> list:
    """[(layer path, the bound method `hook`)] of adapter `name`'s deltas that have one."""
    return [(path, getattr(m.adapters[name], hook)) for path, m in model.net.named_modules()
            if isinstance(m, AdaptedLayer) and name in m.adapters and hasattr(m.adapters[name], hook)]


# IO-7: sizes a stranger's adapter_config.json sets, checked before anything is allocated. A rank or a
# number of virtual tokens n makes at least n values of the file; an encoder's width is not saved by PEFT. A config
# whose file is not that big (UniLoRA's: theta alone, whatever r) names its own FILE_ROWS and FILE_WIDTHS
ROW_FIELDS, WIDTH_FIELDS, MAX_WIDTH = ("rank", "initial_rank", "target_rank", "num_virtual_tokens", "num_vectors",
                                      "vector_length", "num_basis_a", "num_basis_b"), \
    ("encoder_hidden_size", "projection_dim"), 65_536


def check_sizes(cfg, loaded: dict, where: str) -> None:
    held = sum(int(np.prod(a.shape)) for a in loaded.values())
    patterns = getattr(cfg, "rank_pattern", None) or {}
    rows, widths = getattr(cfg, "FILE_ROWS", ROW_FIELDS), WIDTH_FIELDS + getattr(cfg, "FILE_WIDTHS", ())
    sizes = [(f, getattr(cfg, f), held, "the weights file holds") for f in rows if hasattr(cfg, f)]
    sizes += [(f"rank_pattern[{k!r}]", v, held, "the weights file holds") for k, v in patterns.items()
              if isinstance(v, int) and not isinstance(v, bool)]  # AdaLoRA's are lists of booleans
    sizes += [(f, getattr(cfg, f), MAX_WIDTH, "minipeft allows") for f in widths if hasattr(cfg, f)]
    for field, v, limit, what in sizes:
        if isinstance(v, int) and v > limit:
            raise CheckpointError(f"{where}: field {field}={v} is larger than the {limit:,} values {what}; "
                                  "refused before allocating the adapter")


def base_tables(model, name: str, loaded: dict) -> dict:
    """{key: base weight Tensor} of the adapted layers whose whole base weight the file holds as
    `<path>.base_layer.weight`: PEFT's save_embedding_layers="auto" writes a targeted embed_tokens or lm_head so
    (LORA-18), and loading puts it in the base layer, as PEFT's load_state_dict does."""
    return {f"{PREFIX}{path}.base_layer.weight": m.base_layer.weight for path, m in model.net.named_modules()
            if isinstance(m, AdaptedLayer) and name in m.adapters and isinstance(m.base_layer, (Embedding, Linear))
            and f"{PREFIX}{path}.base_layer.weight" in loaded}


def _assign(model, name, loaded: dict, where: str, strict: bool) -> dict:
    expected = adapter_tensors(model, name)
    tables = base_tables(model, name, loaded)
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected and k not in tables]
    if strict and unexpected and not any(k.startswith("base_model.") for k in loaded):
        raise CheckpointError(f"{where}: no key starts with 'base_model.model.' (e.g. {unexpected[0]!r}); PEFT "
                              "would load nothing here. Prefix the keys with 'base_model.model.'")
    if strict and (missing or unexpected):
        raise CheckpointError(f"{where}: keys do not match the model: missing {missing[:4]} "
                              f"({len(missing)} in all), unexpected {unexpected[:4]} ({len(unexpected)} in all)")
    first = {}  # id of a tensor saved under several keys (RandLoRA's per-layer copies of its shared bases) -> key
    for key, t in expected.items():
        if key not in loaded:
            continue
        if id(t) in first and not np.array_equal(loaded[key].astype(np.float32), loaded[first[id(t)]].astype(np.float32)):
            raise CheckpointError(f"{where}: tensors {first[id(t)]!r} and {key!r} are copies of one shared tensor "
                                  "but differ; the file was edited or mixes adapters (IO-8)")
        first.setdefault(id(t), key)
        fill(t, loaded[key], key, where)
    for key, t in tables.items():  # last: a file refused above leaves the base as it was
        fill(t, loaded[key], key, where)
    return {"missing": missing, "unexpected": unexpected}


def fill(t, arr, key: str, where: str, dtype: str = "float32") -> None:
    """IO-8: the file's tensor `arr` saved under `key` into Tensor t, as `dtype`: the same shape, a float
    type, finite values, or a CheckpointError naming the file and key."""
    if tuple(arr.shape) != t.shape:
        raise CheckpointError(f"{where}: tensor {key!r} has shape {tuple(arr.shape)}, the model expects "
                              f"{t.shape}; was this adapter trained on another base model?")
    if kept_dtype(t) is not np.float32:  # positions (SHiRA's shira_indices): integers, kept so (IO-8)
        if not np.issubdtype(arr.dtype, np.integer):
            raise CheckpointError(f"{where}: tensor {key!r} has dtype {arr.dtype}, expected an integer type")
        t.data = backend.asarray(arr, kept_dtype(t))
        return
    if not np.issubdtype(arr.dtype, np.floating):  # an integer or boolean tensor is not a weight (IO-8)
        raise CheckpointError(f"{where}: tensor {key!r} has dtype {arr.dtype}, expected a float type")
    if not np.all(np.isfinite(arr)):
        raise CheckpointError(f"{where}: tensor {key!r} holds NaN or Inf values")
    t.data = backend.asarray(arr, dtype)
