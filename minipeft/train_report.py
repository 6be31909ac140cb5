"""What a training run shows and records (spec/training.md TRAIN-18, TRAIN-19): the progress bar, the
JSONL log in output_dir, the loss-curve plot, and Ctrl-C caught at a step boundary.

Nothing here changes what is trained; a reporting step that fails after training warns and loses nothing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import warnings

from .errors import ConfigError
from .fileio import atomic_write

LOG_NAME = "log.jsonl"  # one JSON record per optimizer step or evaluation, in output_dir


def check_plot(plot_path) -> None:
    """TRAIN-18: --plot without matplotlib is an error before training, not after."""
    if plot_path and importlib.util.find_spec("matplotlib") is None:
        raise ConfigError(f"plot_path={plot_path!r} needs matplotlib, which is not installed: "
                          "pip install matplotlib, or leave plot_path unset")


def run_header(n_examples: int, per_epoch: int, total: int, cfg, trainable: int) -> dict:
    """TRAIN-19: the run's shape, as the log's first record and the line printed above the bar (what
    transformers' Trainer prints as "Running training"): one optimizer step takes batch_size x
    gradient_accumulation_steps examples; gradients are clipped to max_grad_norm (None: not clipped)."""
    return {"event": "start", "examples": n_examples, "steps": total, "steps_per_epoch": per_epoch,
            "batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "examples_per_step": cfg.batch_size * cfg.gradient_accumulation_steps,
            "max_grad_norm": cfg.max_grad_norm, "learning_rate": cfg.learning_rate, "schedule": cfg.schedule,
            "warmup_steps": cfg.warmup_steps, "trainable_parameters": trainable}


def header_line(h: dict) -> str:
    clip = f"gradients clipped to norm {h['max_grad_norm']:g}" if h["max_grad_norm"] is not None else "no clipping"
    return (f"training: {h['examples']:,d} examples, {h['steps']:,d} steps ({h['steps_per_epoch']:,d} per epoch) of "
            f"{h['batch_size']} x {h['gradient_accumulation_steps']} accumulated = {h['examples_per_step']} examples; "
            f"lr {h['learning_rate']:g} {h['schedule']}, warmup {h['warmup_steps']}; {clip}; "
            f"{h['trainable_parameters']:,d} trainable parameters")


def progress(total, start, enabled):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, desc="training", unit="step")


def postfix(history: dict, per_epoch: int) -> dict:
    """The bar's fields: loss, lr, gradient norm (before clipping), epoch, the last eval loss, tokens/s."""
    step = history["step"][-1]
    out = {"loss": f"{history['loss'][-1]:.4f}", "lr": f"{history['lr'][-1]:.2e}",
           "grad_norm": f"{history['grad_norm'][-1]:.3g}", "epoch": f"{step / per_epoch:.2f}"}
    if history["eval_loss"]:
        out["eval_loss"] = f"{history['eval_loss'][-1][1]:.4f}"
    out["tok_s"] = f"{history['tokens_per_s'][-1]:.0f}"
    return out


STEP_FIELDS = ("loss", "lr", "grad_norm", "tokens_per_s")


def records(history: dict, per_epoch: int) -> list:
    """TRAIN-19: the log's records from the history, in order: one per step, an eval record after its step."""
    evals = {}
    for s, loss in history["eval_loss"]:
        evals.setdefault(s, []).append(loss)
    out = []
    for i, s in enumerate(history["step"]):
        out.append({"step": s, "epoch": round(s / per_epoch, 4), **{k: history[k][i] for k in STEP_FIELDS}})
        out += [{"step": s, "epoch": round(s / per_epoch, 4), "eval_loss": e} for e in evals.pop(s, [])]
    out += [{"step": s, "epoch": round(s / per_epoch, 4), "eval_loss": e} for s, es in sorted(evals.items()) for e in es]
    return out


class JsonlLog:
    """output_dir/log.jsonl: the run header first, then the step and eval records. It is rewritten from the
    history when training starts (so a resumed run's log holds the checkpoint's steps, not those of the run
    that died after it), then appended line by line."""

    def __init__(self, output_dir, history: dict, per_epoch: int, header: dict):
        self.path = os.path.join(output_dir, LOG_NAME) if output_dir else None
        self.per_epoch = per_epoch
        if self.path:
            os.makedirs(output_dir, exist_ok=True)
            with atomic_write(self.path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in [header, *records(history, per_epoch)])

    def write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": record["step"], "epoch": round(record["step"] / self.per_epoch, 4),
                                    **record}) + "\n")


class InterruptAtStep:
    """TRAIN-20: the first Ctrl-C (SIGINT) only sets `requested`; the loop finishes the step it is in, saves a
    checkpoint and raises TrainingInterrupted. A second Ctrl-C interrupts at once (Python's default).
    Installed only in the main thread (signal handlers can be set nowhere else)."""

    def __init__(self, enabled: bool = True):
        self.requested = False
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._old = None

    def __enter__(self):
        if self.enabled:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, self._old)  # the second Ctrl-C is a plain KeyboardInterrupt
        sys.stderr.write("\ninterrupt: finishing this step, then saving a checkpoint (Ctrl-C again to stop at once)\n")

    def __exit__(self, *exc):
        if self.enabled:
            signal.signal(signal.SIGINT, self._old)
        return False


def plot_history(history: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


def try_plot(history: dict, path) -> None:
    """The plot as the run's last act: a failure warns; the adapter and checkpoints are already saved."""
    if not path:
        return
    try:
        plot_history(history, path)
    except Exception as e:  # noqa: BLE001 - a report must never lose a trained model
        warnings.warn(f"the loss curve could not be written to {path}: {type(e).__name__}: {e}", stacklevel=2)
