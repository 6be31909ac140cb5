"""The training loop (spec/training.md): AdamW on the trainable parameters, warmup then linear or
cosine decay, gradient accumulation equal to the larger batch (TRAIN-3), clipping by global norm,
seeded shuffling, evaluation per epoch or every eval_steps, checkpoints with rotation, the best one kept
and loaded back, early stopping, an exact resume (TRAIN-4, TRAIN-17), a progress bar and a JSONL log, and
Ctrl-C that saves a checkpoint (TRAIN-20).

One optimizer step takes batch_size * gradient_accumulation_steps examples. Each micro-batch's
mean loss is weighted by its share of the step's target tokens, so accumulating 4 micro-batches
of 1 gives the same gradient as one batch of 4 (HF's num_items_in_batch rule).
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import numpy as np

from . import backend
from . import checkpoints as C
from . import hooks as H
from . import train_report as R
from .adapters import alora
from .autograd import no_grad
from .data import collate, count_targets, prepare
from .errors import ConfigError, TrainingError, TrainingInterrupted
from .fileio import atomic_write_json
from .memory import check_budget
from .nn.optim import AdamW, clip_grad_norm, lr_at

DEFAULT_SAVE_STEPS = 500  # transformers' default: with an output_dir, a checkpoint every 500 steps and at the end
CONFIG_NAME = "training_args.json"  # the resolved TrainingConfig, written to output_dir when training starts


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
    output_dir: str | None = None  # where checkpoints, log.jsonl and training_args.json go
    save_steps: int | None = None  # a checkpoint every N optimizer steps (needs output_dir; default 500)
    save_total_limit: int | None = None  # keep the newest N checkpoints (and the best); None: all
    eval_steps: int | None = None  # evaluate every N steps (None: at each epoch's end), and at the end
    load_best_model_at_end: bool = False  # load the checkpoint with the lowest eval loss when training ends
    early_stopping_patience: int | None = None  # stop after N evaluations without an improvement
    early_stopping_threshold: float = 0.0  # an improvement is an eval loss lower than the best by more than this
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
        for name in ("save_steps", "save_total_limit", "eval_steps", "early_stopping_patience"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ConfigError(f"TrainingConfig.{name}={v!r} must be a positive integer or None")
        for name in ("save_steps", "save_total_limit", "load_best_model_at_end"):
            if getattr(self, name) and not self.output_dir:
                raise ConfigError(f"TrainingConfig.{name} needs output_dir (where the checkpoints go)")
        for name in ("eval_steps", "load_best_model_at_end", "early_stopping_patience"):
            if getattr(self, name) and self.eval_data is None:
                raise ConfigError(f"TrainingConfig.{name} needs eval_data (it works from the eval loss)")
        if self.load_best_model_at_end and (not self.eval_steps or self.save_every % self.eval_steps):
            raise ConfigError(f"TrainingConfig.load_best_model_at_end needs eval_steps set and save_steps "
                              f"({self.save_every}) a multiple of it (eval_steps={self.eval_steps!r}), so that "
                              f"every checkpoint has an eval loss to compare")
        if not self.early_stopping_threshold >= 0:
            raise ConfigError(f"TrainingConfig.early_stopping_threshold={self.early_stopping_threshold!r} must be >= 0")
        budget = self.memory_budget_gb
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0):
            raise ConfigError(f"TrainingConfig.memory_budget_gb={budget!r} must be a positive number of GiB")

    @property
    def save_every(self) -> int:
        return self.save_steps or DEFAULT_SAVE_STEPS

    def to_json(self) -> dict:
        """The resolved config as training_args.json stores it (data and hooks by description, not by value)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "eval_data" and v is not None and not isinstance(v, str):
                v = f"<{len(v)} records>" if hasattr(v, "__len__") else repr(v)
            elif f.name == "hooks":
                v = [type(h).__name__ for h in v]
            elif not isinstance(v, (str, int, float, bool, type(None))):
                v = repr(v)
            out[f.name] = v
        return out


def should_stop_early(evals: list, patience, threshold: float) -> bool:
    """TRAIN-17: True when the last `patience` evaluations each failed to beat the best eval loss before them
    by more than `threshold` (worked out from the history, so a resumed run stops where the full one would)."""
    if not patience:
        return False
    best, bad = math.inf, 0
    for _, loss in evals:
        bad = 0 if best == math.inf or loss < best - threshold else bad + 1
        best = min(best, loss)
    return bad >= patience


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


def evaluate(model, examples, batch_size: int, pad_id: int, hooks=None) -> float:
    """Token-weighted mean loss over examples (no gradient, eval mode); hooks: the run's (None: the active
    adapters'), whose lm_loss (CPT's) replaces causal_lm_loss."""
    hooks = model.training_hooks() if hooks is None else hooks
    total, n = 0.0, 0
    was = model.net.training
    model.net.eval()
    with no_grad():
        for j in range(0, len(examples), batch_size):
            ids, mask, labels = collate(examples[j:j + batch_size], pad_id)
            k = count_targets(labels)
            if k:
                with alora.activated(model, ids):
                    total += _loss(model, ids, mask, labels, hooks).item() * k
                n += k
    model.net.train(was)
    return total / max(n, 1)


def tokenized(model, data, max_length=None, name="train_data"):
    """(examples, pad id): every record of `data` tokenized and checked against the model (TRAIN-5);
    max_length truncates, else a record longer than the context is an error."""
    ctx_len = model.config.max_position_embeddings
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else (eos or 0)
    limit = min(max_length or ctx_len, ctx_len)
    return prepare(data, model.tokenizer, eos, model.config.vocab_size, limit, name,
                   truncate=max_length is not None), pad_id


def evaluate_data(model, data, batch_size: int = 8, max_length=None) -> tuple[float, int]:
    """(token-weighted mean loss, number of target tokens) of the model over `data` (records or a .jsonl),
    as training evaluates eval_data."""
    examples, pad_id = tokenized(model, data, max_length, "data")
    return evaluate(model, examples, batch_size, pad_id), sum(count_targets(collate([e], pad_id)[2]) for e in examples)


def _loss(model, ids, mask, labels, hooks=()):
    logits = model.net(backend.asarray(ids), attention_mask=backend.asarray(mask))
    return H.lm_loss(hooks, logits, backend.asarray(labels))


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
    examples, pad_id = tokenized(model, train_data, cfg.max_length)
    evals = tokenized(model, cfg.eval_data, cfg.max_length, "eval_data")[0] if cfg.eval_data is not None else None
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
    R.check_plot(cfg.plot_path)  # TRAIN-18: an optional extra is checked before any step
    history = {"step": [], "loss": [], "lr": [], "grad_norm": [], "eval_loss": [], "tokens_per_s": []}
    step = 0
    if cfg.resume_from:
        step, history = C.load_checkpoint(model, opt, named, hooks, cfg.resume_from)
    run = _Run(model, opt, named, hooks, cfg, history, step)
    header = R.run_header(len(examples), per_epoch, total, cfg, sum(math.prod(p.shape) for p in named.values()))
    log = R.JsonlLog(cfg.output_dir, history, per_epoch, header)
    if cfg.output_dir:
        atomic_write_json(os.path.join(cfg.output_dir, CONFIG_NAME), cfg.to_json())
    model.net.gradient_checkpointing = cfg.gradient_checkpointing
    model.net.train()
    if cfg.progress:
        print(R.header_line(header), file=sys.stderr)
    bar = R.progress(total, step, cfg.progress)
    try:
        with R.InterruptAtStep() as interrupt:
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
                        with alora.activated(model, ids):  # held through backward (gradient checkpointing reruns)
                            loss = _loss(model, ids, mask, labels, hooks)
                            reg = H.regularization(hooks)  # the methods' own loss terms (AdaLoRA's penalty), or None
                            if reg is not None:
                                loss = loss + reg
                            lv = loss.item()
                            if not math.isfinite(lv):
                                run.diverged(step, "loss", lv, lr)
                            (loss * share).backward()
                        loss_value += lv * share
                        tokens += int(mask.sum())
                    norm = clip_grad_norm(list(named.values()), cfg.max_grad_norm)
                    if not math.isfinite(norm):
                        run.diverged(step, "gradient norm", norm, lr)
                    opt.step()
                    for h in hooks:  # per-step updates (AdaLoRA's rank allocation), gradients still there
                        h.after_step(step)
                    opt.zero_grad()
                    step += 1
                    rate = tokens / max(time.perf_counter() - t0, 1e-9)
                    record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm, "tokens_per_s": rate}
                    for k, v in record.items():
                        history[k].append(v)
                    log.write(record)
                    if evals is not None and (step % (cfg.eval_steps or per_epoch) == 0 or step >= total):
                        history["eval_loss"].append((step, evaluate(model, evals, cfg.batch_size, pad_id, hooks)))
                        log.write({"step": step, "eval_loss": history["eval_loss"][-1][1]})
                    bar.update(1)
                    bar.set_postfix(R.postfix(history, per_epoch))
                    stop = should_stop_early(history["eval_loss"], cfg.early_stopping_patience,
                                             cfg.early_stopping_threshold)
                    if step % cfg.save_every == 0 or step >= total or stop or interrupt.requested:
                        run.save(step)
                    if interrupt.requested:
                        raise TrainingInterrupted(step, run.saved, history)
                    if stop:
                        history["stopped_early"] = step
                        break
                if step >= total or "stopped_early" in history:
                    break
            if cfg.load_best_model_at_end:
                run.load_best()
    finally:
        for h in hooks:
            if h not in optimiser:  # train() ends it, also when training never started
                h.end()
        bar.close()
        model.net.gradient_checkpointing = False
        model.net.eval()
        backend.release_host_memory()  # BACKEND-7: the steps' freed buffers go back to the OS
    R.try_plot(history, cfg.plot_path)  # TRAIN-18: last, and a failure only warns
    return history


class _Run:
    """The checkpoints of one training run: periodic saves with rotation (TRAIN-4, TRAIN-17), the state saved
    named when the loss diverges (TRAIN-6), and the best checkpoint loaded back at the end (TRAIN-17)."""

    def __init__(self, model, opt, named, hooks, cfg, history, step):
        self.model, self.opt, self.named, self.hooks, self.cfg, self.history = model, opt, named, hooks, cfg, history
        self.saved = C.latest_checkpoint(cfg.resume_from) if cfg.resume_from else None  # the last one written or resumed from
        self.saved_step = step  # no checkpoint is written again for the step a run resumed from

    def save(self, step: int) -> None:
        if not self.cfg.output_dir or step == self.saved_step and self.saved:
            return
        self.saved = C.save_checkpoint(self.model, self.opt, self.named, self.hooks, self.cfg.output_dir, step,
                                       self.history)
        self.saved_step = step
        best = C.best_checkpoint(self.cfg.output_dir, self.history) if self.cfg.load_best_model_at_end else None
        C.rotate(self.cfg.output_dir, self.cfg.save_total_limit, keep=best)

    def diverged(self, step: int, what: str, value: float, lr: float) -> None:
        """TRAIN-6: no update for this step and no new checkpoint (the weights that gave a non-finite loss are
        not good ones); the error names the last checkpoint, which rotation has not touched, and what to try."""
        self.opt.zero_grad()
        recent = ", ".join(f"{x:.4g}" for x in self.history["loss"][-3:]) or "none"
        hint = (f"resume_from={self.saved!r} (step {self.saved_step}) with a lower learning_rate" if self.saved else
                "no checkpoint was saved before it (set output_dir and save_steps to keep some); "
                "start again with a lower learning_rate")
        raise TrainingError(f"step {step + 1}: the {what} is {value}, so training stopped with no update for this "
                            f"step (learning rate {lr:.3g}; the last losses: {recent}). Last good checkpoint: "
                            f"{self.saved or 'none'}; {hint}")

    def load_best(self) -> None:
        """TRAIN-17: the checkpoint with the lowest eval loss (its weights, optimizer and hook state)."""
        best = C.best_checkpoint(self.cfg.output_dir, self.history)
        if best is not None:
            C.load_checkpoint(self.model, self.opt, self.named, self.hooks, best)
            self.history["best_checkpoint"] = best
