"""Training checkpoints (spec/training.md TRAIN-4, TRAIN-8, TRAIN-13, TRAIN-14, TRAIN-17).

output_dir/checkpoint-<step>/ holds what an exact resume needs: the trainable weights, the optimizer's
moments, the step, the dropout RNG state, the loss history, the hooks' state, and the adapters in PEFT
format (adapter/). `rotate` keeps the newest `save_total_limit` of them and never the best one by eval loss.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from . import backend
from .adapters.peft_io import config_dict
from .errors import ConfigError
from .fileio import atomic_save_dir, atomic_write_json
from .safetensors_io import read_safetensors, write_safetensors

PREFIX = "checkpoint-"


def save_checkpoint(model, opt, named, hooks, output_dir, step, history) -> str:
    """output_dir/checkpoint-<step>: trainable weights, optimizer moments, step, RNG state, history,
    and the adapters in PEFT format. Written to a temporary folder and renamed into place."""
    path = os.path.join(output_dir, f"{PREFIX}{step}")
    os.makedirs(output_dir, exist_ok=True)
    with atomic_save_dir(path) as tmp:
        write_safetensors(os.path.join(tmp, "trainable.safetensors"),
                          {n: np.ascontiguousarray(backend.to_host(p.data)) for n, p in named.items()})
        write_safetensors(os.path.join(tmp, "optimizer.safetensors"), opt.state_dict())
        method = {h.key: h.state() for h in hooks}  # {key: (arrays, json)}: the hooks' state (AdaLoRA's allocator)
        write_safetensors(os.path.join(tmp, "method_state.safetensors"),
                          {f"{a}/{k}": np.ascontiguousarray(v) for a, (arrays, _) in method.items()
                           for k, v in arrays.items()})
        state = {"step": step, "adam_t": opt.t, "rng": model.rng.get_state(), "history": history,
                 "method_state": {a: info for a, (_, info) in method.items()}}
        atomic_write_json(os.path.join(tmp, "trainer_state.json"), _jsonable(state))
        if model.peft_configs:  # inside the folder that appears whole (TRAIN-8)
            model.save_adapters(os.path.join(tmp, "adapter"))
    return path


def latest_checkpoint(path: str) -> str:
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return path
    found = checkpoints(path)
    if not found:
        raise ConfigError(f"resume_from={path!r}: no checkpoint there (expected trainer_state.json or checkpoint-N/)")
    return found[-1]


def checkpoints(output_dir: str) -> list:
    """The checkpoint-N folders in output_dir, oldest (smallest N) first."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(int(d[len(PREFIX):]) for d in os.listdir(output_dir)
                   if d.startswith(PREFIX) and d[len(PREFIX):].isdigit())
    return [os.path.join(output_dir, f"{PREFIX}{s}") for s in steps]


def best_checkpoint(output_dir: str, history: dict):
    """TRAIN-17: the checkpoint whose step has the lowest eval loss (the earliest on a tie), or None."""
    at = {int(os.path.basename(p)[len(PREFIX):]): p for p in checkpoints(output_dir)}
    scored = [(loss, s) for s, loss in history.get("eval_loss", []) if s in at]
    return at[min(scored)[1]] if scored else None


def rotate(output_dir: str, limit, keep=None) -> list:
    """TRAIN-17: delete the oldest checkpoints beyond `limit` (None: keep all), never `keep` (the best) and
    never the newest: as transformers' save_total_limit, the best counts as the newest, and a limit of 1 with
    an older best keeps two. The paths deleted."""
    found = checkpoints(output_dir)
    if limit is None:
        return []
    order = [p for p in found if p != keep] + [p for p in found if p == keep]
    if limit == 1 and keep in found and keep != found[-1]:
        limit = 2
    doomed = order[:max(len(order) - limit, 0)]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


def load_checkpoint(model, opt, named, hooks, path):
    path = latest_checkpoint(path)
    check_same_adapters(model, path)
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    weights, _ = read_safetensors(os.path.join(path, "trainable.safetensors"))
    if set(weights) != set(named):
        raise ConfigError(f"{path}: its trainable parameters differ from the model's "
                          f"(e.g. {sorted(set(weights) ^ set(named))[:3]}); resume with the same adapters")
    for n, p in named.items():
        p.data = backend.asarray(weights[n], "float32")
    moments, _ = read_safetensors(os.path.join(path, "optimizer.safetensors"))
    opt.load_state_dict(moments, state["adam_t"])
    model.rng.set_state(state["rng"])
    if "method_state" in state:
        arrays, _ = read_safetensors(os.path.join(path, "method_state.safetensors"))
        for h in hooks:
            if h.key in state["method_state"]:
                h.load_state({k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(h.key + "/")},
                             state["method_state"][h.key])
    history = state["history"]
    history["eval_loss"] = [tuple(e) for e in history.get("eval_loss", [])]
    return state["step"], history


RESUME_FIELDS = ("peft_type", "r", "target_modules", "base_model_name_or_path")  # method, rank, targets, base


def check_same_adapters(model, path: str) -> None:
    """TRAIN-14: a checkpoint's adapter/adapter_config.json must agree with the model's adapters on
    method, rank, targets and base model, or the resumed run would write an unloadable adapter."""
    for name, cfg in model.peft_configs.items():
        file = os.path.join(path, "adapter", "" if name == "default" else name, "adapter_config.json")
        if not os.path.isfile(file):
            continue
        with open(file, encoding="utf-8") as f:
            old = json.load(f)
        new = config_dict(model, cfg)
        for k in RESUME_FIELDS:
            a, b = old.get(k), new.get(k)
            if isinstance(a, list) and isinstance(b, list):
                a, b = sorted(a), sorted(b)
            if a != b:
                raise ConfigError(f"{file}: field {k!r} of adapter {name!r} is {old.get(k)!r} in the checkpoint but "
                                  f"{new.get(k)!r} now; resume with the checkpoint's settings or start a new output_dir")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj
