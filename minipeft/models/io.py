"""HF checkpoint folders in and out (spec/transformer.md MODEL-7..MODEL-9, MODEL-11).

A folder holds config.json, model.safetensors (or shards listed in model.safetensors.index.json)
and optionally tokenizer.json and the other tokenizer files, which save() copies. A Hub repo id is resolved through huggingface_hub's local cache
(offline works once downloaded). Only safetensors and JSON are ever read: nothing is unpickled.
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil

import numpy as np

from .. import backend
from ..errors import CheckpointError
from ..fileio import atomic_save_dir, atomic_write_json
from ..safetensors_io import TensorFile, read_header, write_safetensors
from .config import read_config

# buffers transformers writes that are not parameters here (recomputed instead)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias", "embeddings.position_ids")
# heads a checkpoint may carry that the minipeft model does not use (BERT's MLM/NSP heads)
IGNORED_PREFIXES = ("cls.",)
# what transformers' AutoTokenizer and GenerationConfig read from a model folder (MODEL-11): fetched with
# a Hub model and copied by save() as they are
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                   "spiece.model", "sentencepiece*.model", "*.tiktoken", "chat_template*", "generation_config.json")


def resolve(path_or_id: str) -> str:
    """IO-11: the absolute folder of a path that exists (relative to the current folder, ~ expanded); else
    the snapshot folder of a Hub repo id, from the local cache, then the Hub. Neither: a CheckpointError
    saying what was tried and what to do offline."""
    path = os.path.abspath(os.path.expanduser(path_or_id))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path}: expected a model folder (config.json + model.safetensors), got a file")
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise CheckpointError(f"{path}: no such folder, and huggingface_hub is not installed") from e
    patterns = ["*.json", "*.safetensors", *TOKENIZER_FILES]
    tried = []
    for offline, where in ((True, "in the local Hugging Face cache"), (False, "on the Hub")):
        try:
            return snapshot_download(repo_id=path_or_id, allow_patterns=patterns, local_files_only=offline)
        except Exception as e:  # the hub client raises many types; each is reported whole
            said = f"{type(e).__name__}: {' '.join(str(e).split()).rstrip('.')}"
            if type(e).__name__ == "HFValidationError":  # not an id at all: the Hub is not asked
                tried.append(f"as a Hub repo id: it is not one ({said})")
                break
            tried.append(f"as a Hub repo id {where}: {said}")
    offline_now = " HF_HUB_OFFLINE is set, so the Hub was not asked." if constants.HF_HUB_OFFLINE else ""
    raise CheckpointError(
        f"{path_or_id!r} is neither a model folder nor a Hub model found. Tried: as a folder: {path} does not "
        f"exist (a relative path is taken from the current folder, {os.getcwd()}); " + "; ".join(tried) + ". "
        "What to do: pass the folder holding config.json and model.safetensors (absolute, or relative to the "
        "current folder), or a Hub id ('name' or 'org/name'). Offline (HF_HUB_OFFLINE=1) only the cache is "
        "read: download the model first while online (load_model(id) once, or `huggingface-cli download "
        f"<id>`).{offline_now} The model minipeft carries is at minipeft.DEMO_MODEL.")


def weight_files(folder: str) -> list[str]:
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index}: malformed shard index ({e}); it needs a 'weight_map' object") from e
        for s in shards:
            if not isinstance(s, str) or os.path.basename(s) != s or not os.path.isfile(os.path.join(folder, s)):
                keys = [k for k, v in weight_map.items() if v == s]
                raise CheckpointError(f"{index}: shard {s!r} (holding key {keys[0]!r} and {len(keys) - 1} more) "
                                      f"is missing from {folder}")
        return [os.path.join(folder, s) for s in shards]
    if os.path.isfile(single):
        return [single]
    refuse_pickled(folder, "model.safetensors", MODEL_CONVERSION)
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MODEL_CONVERSION = ("transformers' AutoModelForCausalLM.from_pretrained(folder)"
                    ".save_pretrained(folder, safe_serialization=True)")


def refuse_pickled(folder: str, wanted: str, conversion: str) -> None:
    """IO-5: a folder whose weights are only pickled files (pytorch_model.bin, adapter_model.bin) is
    refused before anything in it is opened, with the one-time conversion that makes `wanted`."""
    pickled = sorted(n for n in os.listdir(folder) if n.endswith(PICKLED)) if os.path.isdir(folder) else []
    if pickled and not os.path.isfile(os.path.join(folder, wanted)):
        raise CheckpointError(
            f"{folder}: holds only pickled weights ({', '.join(pickled[:3])}) and no {wanted}; minipeft never "
            f"unpickles files (loading a pickle can run code). Convert it once, where you trust the file: "
            f"{conversion}")


def read_weights(folder: str) -> dict:
    """{key: (TensorFile, path)} over the folder's shards: headers validated, no tensor read yet, so
    load_state holds one file-mapped tensor at a time (MODEL-12), not a second copy of the model."""
    tensors = {}
    for path in weight_files(folder):
        part = TensorFile(path)
        for k in part.infos:
            if k in tensors:
                raise CheckpointError(f"{path}: key {k!r} appears in more than one shard")
        tensors.update({k: (part, path) for k in part.infos})
    return tensors


def load_state(net, tensors: dict, dtype: str, folder: str) -> None:
    """Copy checkpoint arrays into the model's parameters, checking names and shapes."""
    params = dict(net.named_parameters())
    tied = {"lm_head.weight"} if getattr(net.config, "tie_word_embeddings", False) else set()
    base = getattr(net, "base_name", "")
    assigned, unexpected = set(), []
    for key, (part, path) in tensors.items():
        name = key
        if name not in params and base and f"{base}.{key}" in params:
            name = f"{base}.{key}"  # a bare base-model checkpoint (LlamaModel, GPT2Model)
        elif name not in params and "." in key and key.split(".", 1)[1] in params:
            name = key.split(".", 1)[1]  # a task-model checkpoint (bert.*)
        if name not in params:
            if name in tied or key.endswith(IGNORED_SUFFIXES) or key.startswith(IGNORED_PREFIXES):
                continue
            unexpected.append((key, path))
            continue
        p = params[name]
        arr = part.get(key)  # a read-only mapping of the file's bytes (a float32 copy for BF16)
        if tuple(arr.shape) != p.shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {tuple(arr.shape)}, the model "
                                  f"({net.config.model_type}, config.json) expects {p.shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {arr.dtype}, expected a float type")
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))  # IO-10: one pass per tensor
        if bad:
            first = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
            raise CheckpointError(f"{path}: tensor {key!r} holds {bad} NaN/Inf value(s) (first at index {first}); "
                                  f"every output would be NaN. The checkpoint is damaged: download or save it again")
        p.data = backend.asarray(np.array(arr, dtype=dtype))  # the one copy the model keeps
        del arr  # unmapped: the next tensor's pages replace this one's
        assigned.add(name)
    missing = [n for n in params if n not in assigned and n not in tied]
    for opt in getattr(net, "optional_modules", ()):  # BERT's pooler: BertForMaskedLM checkpoints lack it
        under = [n for n in params if n.startswith(opt + ".")]
        if under and not any(n in assigned for n in under):
            setattr(net, opt, None)  # dropped, as transformers' BertModel(add_pooling_layer=False)
            missing = [n for n in missing if n not in under]
    if missing:
        raise CheckpointError(f"{folder}: checkpoint lacks {len(missing)} parameter(s) of the "
                              f"{net.config.model_type} model, e.g. {', '.join(missing[:4])}")
    if unexpected:
        (key, path), n = unexpected[0], len(unexpected)
        raise CheckpointError(f"{path}: key {key!r} (and {n - 1} more) is not a parameter of the "
                              f"{net.config.model_type} model that config.json describes")


def check_sizes(cfg, folder: str) -> None:
    """IO-6: before the model is allocated, config.json's sizes must fit the weights the folder holds
    (read from the safetensors headers): every architecture has a vocab_size x hidden_size embedding and at
    least hidden_size parameters per layer, so a config claiming more is refused at the cost of a header."""
    need = cfg.vocab_size * cfg.hidden_size + cfg.num_hidden_layers * cfg.hidden_size
    held = sum(math.prod(info.shape) for f in weight_files(folder) for info in read_header(f)[0].values())
    if need > held:
        raise CheckpointError(f"{os.path.join(folder, 'config.json')}: fields vocab_size={cfg.vocab_size}, "
                              f"hidden_size={cfg.hidden_size}, num_hidden_layers={cfg.num_hidden_layers} need at "
                              f"least {need:,} parameters, but the weight files hold {held:,} values; refused before "
                              f"allocating the model. Does config.json belong to these weights?")


def build(cfg):
    from . import model_class
    return model_class(cfg.model_type)(cfg)


def load_net(path_or_id: str, dtype: str = "float32"):
    """(net, folder): the model built from config.json with the checkpoint's weights."""
    if dtype not in ("float32", "float64", "float16"):
        raise CheckpointError(f"dtype {dtype!r} is not supported for loading; use float32, float64 or float16")
    folder = resolve(path_or_id)
    if not os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        refuse_pickled(folder, "model.safetensors", MODEL_CONVERSION)
    cfg = read_config(folder)
    check_sizes(cfg, folder)
    net = build(cfg)
    load_state(net, read_weights(folder), dtype, folder)
    return net, folder


def tokenizer_files(folder: str | None) -> list[str]:
    """The files of `folder` named as TOKENIZER_FILES, sorted (none without a folder)."""
    if not folder or not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))
                  and any(fnmatch.fnmatch(n, pat) for pat in TOKENIZER_FILES))


def save_net(net, path: str, source_folder: str | None = None) -> None:
    """Write an HF folder transformers loads: config.json, model.safetensors (float32), and every tokenizer
    and generation file of the folder the model came from (MODEL-11)."""
    from . import HF_CLASS_NAMES
    cfg = dict(net.config.raw)
    cfg.update(model_type=net.config.model_type, architectures=[HF_CLASS_NAMES[net.config.model_type]])
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = "float32"  # the weights below are written in float32
    weights = {name: np.ascontiguousarray(backend.to_host(p.data)) for name, p in net.named_parameters()}
    with atomic_save_dir(path) as tmp:
        write_safetensors(os.path.join(tmp, "model.safetensors"), weights, {"format": "pt"})
        atomic_write_json(os.path.join(tmp, "config.json"), cfg)
        for f in tokenizer_files(source_folder):
            shutil.copyfile(f, os.path.join(tmp, os.path.basename(f)))
