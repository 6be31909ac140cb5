"""Training data: strings, {"text"} or {"prompt", "completion"} dicts, pre-tokenized
{"input_ids"[, "labels"]} dicts, or a .jsonl file of them -> padded batches (spec/training.md TRAIN-5).

Prompt tokens get label -100 so the loss covers only the completion (HF semantics); pads get
label -100 and attention 0. Padding is on the right, so with causal attention the real positions
see exactly what they would see unpadded.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .errors import ConfigError


def read_records(data) -> list:
    if isinstance(data, (str, os.PathLike)) and str(data).endswith(".jsonl"):
        if not os.path.isfile(data):
            raise ConfigError(f"training data file {data} does not exist")
        out = []
        with open(data, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{data}:{i}: not a JSON line ({e})") from e
        return out
    if isinstance(data, (str, bytes)) or not hasattr(data, "__len__"):
        raise ConfigError("training data must be a list of strings or dicts, or a path to a .jsonl file")
    return list(data)


def tokenize(record, tokenizer, eos_id, where: str):
    """(input_ids, labels) of one record."""
    if isinstance(record, dict) and "input_ids" in record:
        ids = [int(i) for i in record["input_ids"]]
        return ids, [int(i) for i in record.get("labels", ids)]
    if isinstance(record, str):
        record = {"text": record}
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a string or a dict, got {type(record).__name__}")
    if not ("text" in record or ("prompt" in record and "completion" in record)):
        raise ConfigError(f"{where}: a record needs 'text', 'prompt' and 'completion', or 'input_ids'; "
                          f"got keys {sorted(record)}")
    if tokenizer is None:
        raise ConfigError(f"{where}: text was given but the model folder has no tokenizer.json; "
                          "give {'input_ids': [...]} records instead")
    tail = [eos_id] if eos_id is not None else []
    if "prompt" in record and "completion" in record:
        p = tokenizer.encode(record["prompt"])
        c = tokenizer.encode(record["completion"], add_special_tokens=False) + tail
        return p + c, [-100] * len(p) + c
    ids = tokenizer.encode(record["text"]) + tail
    return ids, list(ids)


def prepare(data, tokenizer, eos_id, vocab_size: int, max_length: int, name="train_data",
            truncate: bool = False) -> list:
    """Every record tokenized and checked before any training starts; longer than max_length is
    an error, or cut to max_length with truncate=True."""
    examples = []
    for i, rec in enumerate(read_records(data)):
        ids, labels = tokenize(rec, tokenizer, eos_id, f"{name}[{i}]")
        if truncate:
            ids, labels = ids[:max_length], labels[:max_length]
        if not ids or len(ids) != len(labels):
            raise ConfigError(f"{name}[{i}]: empty example or labels of another length than input_ids")
        if len(ids) > max_length:
            raise ConfigError(f"{name}[{i}]: {len(ids)} tokens, longer than the model's context of "
                              f"{max_length}; shorten it or set TrainingConfig(max_length=...) to truncate")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise ConfigError(f"{name}[{i}]: token ids must lie in [0, {vocab_size})")
        examples.append((ids, labels))
    if not examples:
        raise ConfigError(f"{name} is empty")
    return examples


def collate(examples, pad_id: int):
    """(input_ids, attention_mask, labels) arrays (B, T), right-padded to the longest example."""
    T = max(len(ids) for ids, _ in examples)
    B = len(examples)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.int64)
    labels = np.full((B, T), -100, dtype=np.int64)
    for b, (x, y) in enumerate(examples):
        ids[b, :len(x)], mask[b, :len(x)], labels[b, :len(y)] = x, 1, y
    return ids, mask, labels


def count_targets(labels: np.ndarray) -> int:
    """Tokens that carry loss: the shifted labels that are not -100."""
    return int((labels[:, 1:] != -100).sum())
