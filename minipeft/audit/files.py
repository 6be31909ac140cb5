"""What an audit reads (spec/audit.md AUDIT-1, AUDIT-2): model folders a tensor at a time, adapter folders whole.

A model folder (base or merged) is opened as a `Checkpoint`: every shard's header is validated once, and
`read(key)` maps that one tensor (safetensors_io.TensorFile), so an audit holds a few layers, never the model.
Its `skeleton()` is the module tree the header implies, with a stub Linear (a weight that takes no memory) at
every linear layer, which is all that target matching (adapters/inject.py) and a method's create_all look at.
An adapter folder is small: `read_adapter` loads its config and every tensor.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from ..adapters.inject import OUTPUT_HEADS
from ..adapters.peft_io import ADAPTER_CONVERSION, CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from ..adapters.registry import Method, method_of
from ..autograd.tensor import Tensor
from ..errors import CheckpointError
from ..fileio import read_json
from ..models.io import refuse_pickled, resolve, weight_files
from ..nn.layers import Conv1D, Embedding, Linear
from ..nn.module import Module
from ..safetensors_io import TensorFile, TensorInfo, read_safetensors

# the 2-d weights of minipeft's families that belong to an Embedding, not a Linear (tests/test_audit_merged.py
# checks the skeleton's linear layers against each family's real model)
EMBEDDINGS = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")
# machine epsilon of each stored float type (AUDIT-3)
EPSILON = {"F64": 2.0 ** -52, "F32": 2.0 ** -23, "F16": 2.0 ** -10, "BF16": 2.0 ** -7}


def natural(key: str):
    """Sort key: model.layers.2 before model.layers.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


class Checkpoint:
    """The tensors of a model folder (one file or shards) by name, each read on its own as float64."""

    def __init__(self, folder: str, role: str = "model"):
        self.folder = resolve(folder)
        self.role = role
        self.files: dict[str, TensorFile] = {}
        for path in weight_files(self.folder):
            f = TensorFile(path)
            for key in f.infos:
                if key in self.files:
                    raise CheckpointError(f"{path}: key {key!r} appears in more than one shard")
                self.files[key] = f
        cfg = os.path.join(self.folder, "config.json")
        self.config = read_json(cfg, "") if os.path.isfile(cfg) else {}

    def keys(self) -> list[str]:
        return sorted(self.files, key=natural)

    def __contains__(self, key) -> bool:
        return key in self.files

    def info(self, key):
        return self.files[key].infos[key]

    def dtype(self, key) -> str:
        return self.info(key).dtype

    def where(self, key) -> str:
        return self.files[key].path

    def read(self, key) -> np.ndarray:
        """The tensor as a float64 array of its own (the mapping is released)."""
        return np.array(self.view(key), dtype=np.float64)

    def view(self, key) -> np.ndarray:
        """The tensor as stored, mapped (no copy; BF16 as a float32 copy)."""
        return self.files[key].get(key)

    def block(self, key, start: int, count: int) -> np.ndarray:
        """Values start .. start + count - 1 of the tensor (C order) as float64, read from the file (not mapped:
        AUDIT-7, so going through an embedding keeps one block resident, not the tensor)."""
        return np.asarray(self.files[key].read_flat(key, start, count), dtype=np.float64)

    def nbytes(self) -> int:
        return sum(i.end - i.begin for f in set(self.files.values()) for i in f.infos.values())

    def skeleton(self) -> Module:
        """The module tree of the header: a stub Linear (Conv1D for GPT-2) per 2-d `.weight` outside EMBEDDINGS and
        a stub Embedding (V, d) per one of EMBEDDINGS (LoRA adapts those, LORA-15), with in/out features, a bias
        where the header has one, and a zero weight that holds no memory."""
        root = Module()
        transposed = self.config.get("model_type") == "gpt2"
        for key in self.keys():
            info = self.info(key)
            path, _, leaf = key.rpartition(".")
            name = path.rpartition(".")[2]
            if leaf != "weight" or len(info.shape) != 2 or not path:
                continue
            cls = Embedding if name in EMBEDDINGS else Conv1D if transposed and name not in OUTPUT_HEADS else Linear
            layer = cls.__new__(cls)
            layer.in_features, layer.out_features = info.shape if cls is not Linear else info.shape[::-1]
            layer.weight = Tensor(np.broadcast_to(np.float64(0), info.shape))
            if cls is not Embedding:
                layer.bias = Tensor(np.broadcast_to(np.float64(0), (layer.out_features,))) \
                    if f"{path}.bias" in self else None
            _place(root, path, layer)
        return root


def _place(root: Module, path: str, layer: Module) -> None:
    node = root
    *parents, name = path.split(".")
    for part in parents:
        child = vars(node).get(part)
        if not isinstance(child, Module):
            child = Module()
            setattr(node, part, child)
        node = child
    setattr(node, name, layer)


@dataclasses.dataclass
class AdapterFile:
    """An adapter folder (PEFT's layout, written by PEFT or minipeft), read whole."""

    folder: str
    cfg: object  # its AdapterConfig
    method: Method
    raw: dict  # adapter_config.json as written
    tensors: dict  # saved key -> float64 array (an integer array for positions: SHiRA's shira_indices)

    @property
    def config_path(self) -> str:
        return os.path.join(self.folder, CONFIG_NAME)

    @property
    def weights_path(self) -> str:
        return os.path.join(self.folder, WEIGHTS_NAME)


def read_adapter(folder: str) -> AdapterFile:
    refuse_pickled(folder, WEIGHTS_NAME, ADAPTER_CONVERSION)
    cfg = read_adapter_config(folder)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME}")
    tensors, _ = read_safetensors(weights)
    return AdapterFile(folder, cfg, method_of(cfg), read_json(os.path.join(folder, CONFIG_NAME), ""),
                       {k: v if np.issubdtype(v.dtype, np.integer) else np.asarray(v, dtype=np.float64)
                        for k, v in tensors.items()})  # positions (SHiRA's shira_indices) stay integers


class ImpliedBase(Checkpoint):
    """AUDIT-8: the base a plain LoRA file implies when none is given: a zero (out, in) weight at every layer
    with a lora_A (r, in) and lora_B (out, r), no biases. It serves where dW does not depend on W0."""

    def __init__(self, adapter: AdapterFile):
        self.folder, self.role, self.config, self.files = f"{adapter.folder} (no base: shapes from the file)", "base", {}, {}
        self.shapes = {}
        for key, a in adapter.tensors.items():
            if key.endswith(".lora_A.weight") and key.replace("lora_A", "lora_B") in adapter.tensors:
                path = key[len("base_model.model."):-len(".lora_A.weight")]
                self.shapes[f"{path}.weight"] = (adapter.tensors[key.replace("lora_A", "lora_B")].shape[0], a.shape[1])

    def keys(self) -> list[str]:
        return sorted(self.shapes, key=natural)

    def __contains__(self, key) -> bool:
        return key in self.shapes

    def info(self, key):
        return TensorInfo("F64", self.shapes[key], 0, 0)

    def view(self, key) -> np.ndarray:
        return np.zeros(self.shapes[key])


def base_for(adapter: AdapterFile, base: str | None) -> Checkpoint:
    """AUDIT-2: the base model of `adapter`: the folder given, else its adapter_config.json's
    base_model_name_or_path (a folder, or a Hub id in the local cache)."""
    if base is not None:
        return Checkpoint(base, "base")
    named = adapter.raw.get("base_model_name_or_path")
    if not named:
        raise CheckpointError(f"{adapter.config_path}: no base_model_name_or_path, and no --base was given; pass "
                              "--base FOLDER (the layer shapes and W0 come from it)")
    try:
        return Checkpoint(named, "base")
    except CheckpointError as e:
        raise CheckpointError(f"{adapter.config_path}: its base_model_name_or_path {named!r} cannot be read "
                              f"({str(e)[:200]}); pass --base FOLDER") from None
