"""The training loop (spec/training.md): AdamW on the trainable parameters, warmup then linear or
cosine decay, gradient accumulation equal to the larger batch (TRAIN-3), clipping by global norm,
seeded shuffling, per-epoch evaluation, checkpoints and an exact resume (TRAIN-4), a progress bar.

One optimizer step takes batch_size * gradient_accumulation_steps examples. Each micro-batch's
mean loss is weighted by its share of the step's target tokens, so accumulating 4 micro-batches
of 1 gives the same gradient as one batch of 4 (HF's num_items_in_batch rule).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np

from . import backend
from . import hooks as H
from .autograd import no_grad
from .data import collate, count_targets, prepare
from .adapters.peft_io import config_dict
from .errors import ConfigError, TrainingError
from .fileio import atomic_save_dir, atomic_write_json
from .memory import check_budget
from .models.blocks import causal_lm_loss
from .nn.optim import AdamW, clip_grad_norm, lr_at
from .safetensors_io import read_safetensors, write_safetensors


@dataclasses.dataclass
class TrainingConfig:
    learning_rate: float = 1e-4
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    warmup_steps: int = 0
    schedule: str = "linear"  # "linear" | "cosine" | "constant"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    eval_data: object = None
    seed: int = 0
    shuffle: bool = True
    max_length: int | None = None  # truncate examples to this many tokens
    output_dir: str | None = None  # where checkpoints go
    save_steps: int | None = None  # a checkpoint every N optimizer steps (needs output_dir)
    resume_from: str | None = None  # a checkpoint folder, or an output_dir (its latest checkpoint)
    progress: bool = True
    plot_path: str | None = None  # write the loss curve as PNG (needs matplotlib)
    memory_budget_gb: float | None = None  # refuse a run memory.estimate puts above this many GiB (TRAIN-9)
    hooks: tuple = ()  # TrainingHook objects of procedures (minipeft/hooks.py), after the adapters' own
    optimizer: object = None  # None/"adamw", or an optimiser's name or options: "loraplus", LoraFAConfig(...)

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"TrainingConfig.{name}={v!r} must be a positive integer")
        if not self.learning_rate > 0:
            raise ConfigError(f"TrainingConfig.learning_rate={self.learning_rate!r} must be > 0")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ConfigError(f"TrainingConfig.schedule={self.schedule!r}: use linear, cosine or constant")
        if self.save_steps and not self.output_dir:
            raise ConfigError("TrainingConfig.save_steps needs output_dir")
        budget = self.memory_budget_gb
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0):
            raise ConfigError(f"TrainingConfig.memory_budget_gb={budget!r} must be a positive number of GiB")


def _order(n: int, epoch: int, cfg) -> np.ndarray:
    """The example order of one epoch: a permutation seeded by (seed, epoch), so a resumed run
    sees the same order without storing it."""
    return backend.RNG([cfg.seed, epoch]).permutation(n) if cfg.shuffle else np.arange(n)


def _steps(examples, epoch, cfg):
    """The optimizer steps of one epoch, each a list of micro-batches (lists of examples)."""
    order = _order(len(examples), epoch, cfg)
    micro = [[examples[i] for i in order[j:j + cfg.batch_size]] for j in range(0, len(order), cfg.batch_size)]
    ga = cfg.gradient_accumulation_steps
    return [micro[j:j + ga] for j in range(0, len(micro), ga)]


def evaluate(model, examples, batch_size: int, pad_id: int) -> float:
    """Token-weighted mean loss over examples (no gradient, eval mode)."""
    total, n = 0.0, 0
    was = model.net.training
    model.net.eval()
    with no_grad():
        for j in range(0, len(examples), batch_size):
            ids, mask, labels = collate(examples[j:j + batch_size], pad_id)
            k = count_targets(labels)
            if k:
                total += _loss(model, ids, mask, labels).item() * k
                n += k
    model.net.train(was)
    return total / max(n, 1)


def _loss(model, ids, mask, labels):
    logits = model.net(backend.asarray(ids), attention_mask=backend.asarray(mask))
    return causal_lm_loss(logits, backend.asarray(labels))


def train(model, train_data, cfg: TrainingConfig) -> dict:
    from .optimizers import training_hook
    optimiser = training_hook(model, cfg.optimizer)  # before `named`: LoRA-FA freezes lora_A
    try:
        return _train(model, train_data, cfg, [optimiser] if optimiser else [])
    finally:
        if optimiser:
            optimiser.end()


def _train(model, train_data, cfg: TrainingConfig, optimiser: list) -> dict:
    named = model.net.named_trainable_parameters()
    if not named:
        raise ConfigError("the model has no trainable parameters: apply an adapter first (apply_lora), "
                          "or call model.net.requires_grad_(True) for full fine-tuning")
    ctx_len = model.config.max_position_embeddings
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else (eos or 0)
    limit = min(cfg.max_length or ctx_len, ctx_len)
    examples = prepare(train_data, model.tokenizer, eos, model.config.vocab_size, limit,
                       truncate=cfg.max_length is not None)
    evals = prepare(cfg.eval_data, model.tokenizer, eos, model.config.vocab_size, limit, "eval_data",
                    truncate=cfg.max_length is not None) if cfg.eval_data is not None else None
    if cfg.memory_budget_gb is not None:  # TRAIN-9: before any work
        check_budget(model, max(len(ids) for ids, _ in examples), cfg.batch_size, cfg.gradient_checkpointing,
                     cfg.memory_budget_gb)
    per_epoch = math.ceil(len(examples) / (cfg.batch_size * cfg.gradient_accumulation_steps))
    total = cfg.max_steps or per_epoch * cfg.epochs
    hooks = model.training_hooks() + optimiser + list(cfg.hooks)  # TRAIN-10: the methods' and procedures' part
    H.check_hooks(hooks)
    groups = H.param_groups(hooks, named)
    opt = H.optimizer(hooks, named, groups, cfg) or AdamW(named, lr=cfg.learning_rate,
                                                          weight_decay=cfg.weight_decay, groups=groups)
    H.attach(hooks, opt)  # TRAIN-16: procedures that prune or reset the moments keep it
    history = {"step": [], "loss": [], "lr": [], "grad_norm": [], "eval_loss": [], "tokens_per_s": []}
    step = 0
    if cfg.resume_from:
        step, history = load_checkpoint(model, opt, named, hooks, cfg.resume_from)
    model.net.gradient_checkpointing = cfg.gradient_checkpointing
    model.net.train()
    bar = _progress(total, step, cfg.progress)
    last_ckpt = None
    try:
        for epoch in range(step // per_epoch, math.ceil(total / per_epoch)):
            for group in _steps(examples, epoch, cfg)[step - epoch * per_epoch:]:
                if step >= total:
                    break
                t0 = time.perf_counter()
                lr = opt.lr = lr_at(step, cfg.learning_rate, cfg.warmup_steps, total, cfg.schedule) * H.lr_scale(hooks, step)
                batches = [collate(mb, pad_id) for mb in group]
                n_total = max(sum(count_targets(b[2]) for b in batches), 1)
                loss_value, tokens = 0.0, 0
                for ids, mask, labels in batches:
                    share = count_targets(labels) / n_total
                    loss = _loss(model, ids, mask, labels)
                    reg = H.regularization(hooks)  # the methods' own loss terms (AdaLoRA's penalty), or None
                    if reg is not None:
                        loss = loss + reg
                    lv = loss.item()
                    if not math.isfinite(lv):
                        raise TrainingError(f"step {step}: the loss is {lv}; training stopped. "
                                            f"Last good checkpoint: {last_ckpt or 'none'}")
                    (loss * share).backward()
                    loss_value += lv * share
                    tokens += int(mask.sum())
                norm = clip_grad_norm(list(named.values()), cfg.max_grad_norm)
                if not math.isfinite(norm):
                    raise TrainingError(f"step {step}: the gradient norm is {norm}; training stopped. "
                                        f"Last good checkpoint: {last_ckpt or 'none'}")
                opt.step()
                for h in hooks:  # per-step updates (AdaLoRA's rank allocation), gradients still there
                    h.after_step(step)
                opt.zero_grad()
                step += 1
                rate = tokens / max(time.perf_counter() - t0, 1e-9)
                for k, v in (("step", step), ("loss", loss_value), ("lr", lr), ("grad_norm", norm),
                             ("tokens_per_s", rate)):
                    history[k].append(v)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{rate:.0f}")
                if cfg.save_steps and step % cfg.save_steps == 0:
                    last_ckpt = save_checkpoint(model, opt, named, hooks, cfg.output_dir, step, history)
            if evals is not None and (step % per_epoch == 0 or step >= total):
                history["eval_loss"].append((step, evaluate(model, evals, cfg.batch_size, pad_id)))
            if step >= total:
                break
    finally:
        for h in hooks:
            if h not in optimiser:  # train() ends it, also when training never started
                h.end()
        bar.close()
        model.net.gradient_checkpointing = False
        model.net.eval()
        backend.release_host_memory()  # BACKEND-7: the steps' freed buffers go back to the OS
    if cfg.plot_path:
        plot_history(history, cfg.plot_path)
    return history


def _progress(total, start, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, desc="training", unit="step")


# ---- checkpoints (TRAIN-4) -----------------------------------------------------------------
def save_checkpoint(model, opt, named, hooks, output_dir, step, history) -> str:
    """output_dir/checkpoint-<step>: trainable weights, optimizer moments, step, RNG state, history,
    and the adapters in PEFT format. Written to a temporary folder and renamed into place."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
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
    found = [d for d in os.listdir(path) if d.startswith("checkpoint-") and d[11:].isdigit()] \
        if os.path.isdir(path) else []
    if not found:
        raise ConfigError(f"resume_from={path!r}: no checkpoint there (expected trainer_state.json or checkpoint-N/)")
    return os.path.join(path, max(found, key=lambda d: int(d[11:])))


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


def plot_history(history: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("plot_path needs matplotlib: pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["step"], history["loss"], label="train loss")
    if history["eval_loss"]:
        ax.plot(*zip(*history["eval_loss"]), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
