"""A training run's checkpoints, reports and interruptions (spec/training.md TRAIN-6, TRAIN-17..TRAIN-20):
periodic and final checkpoints with rotation, the best one kept and loaded back, early stopping, the plot
checked first, the JSONL log and progress fields, and Ctrl-C that saves a checkpoint."""
import importlib.util
import json
import math
import os
import signal

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minipeft as mp
from minipeft import checkpoints as C
from minipeft import train_report as R
from minipeft.hooks import TrainingHook
from minipeft.safetensors_io import read_safetensors
from minipeft.train import TrainingConfig, should_stop_early
from tests.test_train import lora_model, token_data, trainable

RUN = dict(learning_rate=5e-3, batch_size=2, epochs=1, progress=False)  # 8 examples: 4 steps an epoch


def steps_in(out):
    return [int(os.path.basename(p)[len(C.PREFIX):]) for p in C.checkpoints(str(out))]


def scripted_evals(monkeypatch, losses):
    """evaluate() returns these losses in turn: the tests below choose when the eval loss improves."""
    it = iter(losses)
    monkeypatch.setattr("minipeft.train.evaluate", lambda *a, **k: next(it))


@pytest.mark.spec("TRAIN-17")
def test_an_output_dir_gets_a_final_checkpoint_without_save_steps(tmp_path):
    """Issue 21 item 3: before, output_dir without save_steps saved nothing at all."""
    lora_model().train(token_data(8), TrainingConfig(output_dir=str(tmp_path), **RUN))
    assert steps_in(tmp_path) == [4]
    assert (tmp_path / "checkpoint-4" / "adapter" / "adapter_config.json").is_file()
    assert TrainingConfig().save_every == 500  # transformers' default save_steps


@pytest.mark.spec("TRAIN-17")
@pytest.mark.parametrize("save_steps,limit,kept", [(1, 2, [7, 8]), (3, None, [3, 6, 8]), (3, 1, [8]), (2, 3, [4, 6, 8])])
def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path, save_steps, limit, kept):
    lora_model().train(token_data(8), TrainingConfig(output_dir=str(tmp_path), save_steps=save_steps,
                                                     save_total_limit=limit, **{**RUN, "epochs": 2}))
    assert steps_in(tmp_path) == kept


@pytest.mark.spec("TRAIN-17")
def test_the_best_checkpoint_survives_rotation_and_is_loaded_at_the_end(tmp_path, monkeypatch):
    scripted_evals(monkeypatch, [3.0, 1.0, 2.0, 2.5])  # evaluations at steps 2, 4, 6, 8: the best is step 4
    m = lora_model()
    h = m.train(token_data(8), TrainingConfig(output_dir=str(tmp_path), save_steps=2, eval_steps=2, save_total_limit=1,
                                              load_best_model_at_end=True, eval_data=token_data(2, seed=3),
                                              **{**RUN, "epochs": 2}))
    assert [e for _, e in h["eval_loss"]] == [3.0, 1.0, 2.0, 2.5]
    assert steps_in(tmp_path) == [4, 8]  # the newest, and the best
    assert h["best_checkpoint"] == str(tmp_path / "checkpoint-4")
    saved, _ = read_safetensors(str(tmp_path / "checkpoint-4" / "trainable.safetensors"))
    now = {n: p.numpy() for n, p in m.net.named_trainable_parameters().items()}
    assert all(np.array_equal(saved[n], now[n]) for n in saved)
    last, _ = read_safetensors(str(tmp_path / "checkpoint-8" / "trainable.safetensors"))
    assert not all(np.array_equal(last[n], now[n]) for n in last)


@pytest.mark.spec("TRAIN-17")
def test_early_stopping_stops_after_patience_evaluations_without_improvement(tmp_path, monkeypatch):
    scripted_evals(monkeypatch, [3.0, 2.0, 1.99, 2.5, 9.0, 9.0])
    h = lora_model().train(token_data(8), TrainingConfig(
        output_dir=str(tmp_path), eval_steps=1, early_stopping_patience=2, early_stopping_threshold=0.05,
        eval_data=token_data(2, seed=3), **{**RUN, "epochs": 3}))
    assert h["step"] == [1, 2, 3, 4] and h["stopped_early"] == 4  # 1.99 is no improvement beyond 0.05
    assert steps_in(tmp_path) == [4]  # the state it stopped in is saved


@pytest.mark.spec("TRAIN-17", "TRAIN-8")
def test_early_stopping_after_a_resume_stops_where_the_full_run_does(tmp_path, monkeypatch):
    losses = [3.0, 2.0, 2.5, 2.6, 2.7, 2.8]
    cfg = dict(eval_steps=1, early_stopping_patience=3, eval_data=token_data(2, seed=3), **{**RUN, "epochs": 3})
    scripted_evals(monkeypatch, losses)
    full = lora_model().train(token_data(8), TrainingConfig(output_dir=str(tmp_path / "a"), save_steps=3, **cfg))
    scripted_evals(monkeypatch, losses[3:])
    again = lora_model().train(token_data(8), TrainingConfig(resume_from=str(tmp_path / "a" / "checkpoint-3"), **cfg))
    assert full["stopped_early"] == again["stopped_early"] == 5 and again["loss"] == full["loss"]


@pytest.mark.spec("TRAIN-17")
@settings(max_examples=60, deadline=None)
@given(losses=st.lists(st.floats(0.0, 10.0), min_size=1, max_size=12), patience=st.integers(1, 4),
       threshold=st.sampled_from([0.0, 0.1]))
def test_early_stopping_rule(losses, patience, threshold):
    evals = list(enumerate(losses))
    best_before = [min(losses[:i]) if i else math.inf for i in range(len(losses))]
    improved = [i == 0 or x < b - threshold for i, (x, b) in enumerate(zip(losses, best_before))]
    tail = improved[-patience:]
    assert should_stop_early(evals, patience, threshold) == (len(improved) > patience - 1 and not any(tail)
                                                             and len(tail) == patience)
    # a run whose eval loss keeps falling by more than the threshold never stops
    falling = [(i, 10.0 - i) for i in range(12)]
    assert not should_stop_early(falling, patience, threshold)


@pytest.mark.spec("TRAIN-17")
@pytest.mark.parametrize("kw,match", [
    (dict(save_total_limit=2), "save_total_limit needs output_dir"),
    (dict(output_dir="x", eval_steps=2), "eval_steps needs eval_data"),
    (dict(output_dir="x", early_stopping_patience=2), "early_stopping_patience needs eval_data"),
    (dict(output_dir="x", load_best_model_at_end=True, eval_data=["a"]), "needs eval_steps set"),
    (dict(output_dir="x", load_best_model_at_end=True, eval_data=["a"], eval_steps=3, save_steps=4), "multiple of it"),
    (dict(save_total_limit=0, output_dir="x"), "save_total_limit=0 must be a positive integer"),
])
def test_run_options_that_cannot_work_are_refused(kw, match):
    with pytest.raises(mp.ConfigError, match=match):
        TrainingConfig(**kw)


@pytest.mark.spec("TRAIN-18")
def test_a_missing_plot_library_is_refused_before_any_step(tmp_path, monkeypatch):
    """Issue 21 item 2: before, --plot without matplotlib failed after training and the adapter was lost."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    m = lora_model()
    before = trainable(m)
    with pytest.raises(mp.ConfigError, match="needs matplotlib, which is not installed"):
        m.train(token_data(8), TrainingConfig(plot_path=str(tmp_path / "p.png"), output_dir=str(tmp_path), **RUN))
    assert all(np.array_equal(before[n], v) for n, v in trainable(m).items()) and not steps_in(tmp_path)


@pytest.mark.spec("TRAIN-18")
def test_a_plot_that_fails_after_training_warns_and_loses_nothing(tmp_path, monkeypatch):
    def broken(history, path):
        raise OSError("disk full")
    monkeypatch.setattr(R, "plot_history", broken)
    with pytest.warns(UserWarning, match="could not be written.*disk full"):
        h = lora_model().train(token_data(8), TrainingConfig(plot_path=str(tmp_path / "p.png"),
                                                             output_dir=str(tmp_path), **RUN))
    assert len(h["loss"]) == 4 and steps_in(tmp_path) == [4]


@pytest.mark.spec("TRAIN-19")
def test_the_log_holds_every_step_and_evaluation_and_a_resume_rewrites_it(tmp_path):
    cfg = dict(eval_steps=2, eval_data=token_data(2, seed=3), **{**RUN, "epochs": 2})
    h = lora_model().train(token_data(8), TrainingConfig(output_dir=str(tmp_path / "a"), save_steps=4, **cfg))
    lines = [json.loads(x) for x in (tmp_path / "a" / R.LOG_NAME).read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == h["step"] and [r["loss"] for r in steps] == h["loss"]
    assert [r["lr"] for r in steps] == h["lr"] and [r["grad_norm"] for r in steps] == h["grad_norm"]
    assert [(r["step"], r["eval_loss"]) for r in lines if "eval_loss" in r] == h["eval_loss"]
    assert [r["epoch"] for r in steps] == [s / 4 for s in h["step"]]
    assert set(json.loads((tmp_path / "a" / "training_args.json").read_text())) >= {"learning_rate", "eval_steps"}
    # a run that died after checkpoint-4 wrote lines past it; the resume's log is the full run's again
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / R.LOG_NAME).write_text("\n".join(json.dumps(r) for r in lines[:9]) + '\n{"step": 5, "lo')
    import shutil
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")
    lora_model().train(token_data(8), TrainingConfig(output_dir=str(tmp_path / "b"), resume_from=str(tmp_path / "b"),
                                                     save_steps=4, **cfg))
    again = [json.loads(x) for x in (tmp_path / "b" / R.LOG_NAME).read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(again) == strip(lines)


@pytest.mark.spec("TRAIN-19")
def test_the_progress_bar_shows_loss_lr_epoch_and_eval_loss(capsys):
    """Issue 21 item 7: before, the bar showed loss and tokens/s only; the eval loss was never printed."""
    h = lora_model().train(token_data(8), TrainingConfig(eval_data=token_data(2, seed=3), **{**RUN, "progress": True}))
    err = capsys.readouterr().err
    assert f"eval_loss={h['eval_loss'][-1][1]:.4f}" in err and f"loss={h['loss'][-1]:.4f}" in err
    assert "lr=" in err and "epoch=1.00" in err and "tok_s=" in err
    assert f"grad_norm={h['grad_norm'][-1]:.3g}" in err


@pytest.mark.spec("TRAIN-19")
def test_the_log_and_the_console_state_accumulation_and_clipping(tmp_path, capsys):
    """Issue 21: gradient accumulation and clipping shown in the log. Before, log.jsonl held the steps only and
    nothing said that one step took batch_size x gradient_accumulation_steps examples or where norms were clipped."""
    cfg = TrainingConfig(output_dir=str(tmp_path), gradient_accumulation_steps=2, max_grad_norm=0.5,
                         **{**RUN, "progress": True})
    model = lora_model()
    h = model.train(token_data(8), cfg)
    head = json.loads((tmp_path / R.LOG_NAME).read_text().splitlines()[0])
    assert head == {"event": "start", "examples": 8, "steps": 2, "steps_per_epoch": 2, "batch_size": RUN["batch_size"],
                    "gradient_accumulation_steps": 2, "examples_per_step": 2 * RUN["batch_size"],
                    "max_grad_norm": 0.5, "learning_rate": cfg.learning_rate, "schedule": cfg.schedule,
                    "warmup_steps": cfg.warmup_steps, "trainable_parameters": model.parameter_counts()[0]}
    assert len(h["step"]) == 2 and max(h["grad_norm"]) > 0.5  # norms are logged before clipping
    err = capsys.readouterr().err
    assert f"{RUN['batch_size']} x 2 accumulated = {2 * RUN['batch_size']} examples" in err
    assert "gradients clipped to norm 0.5" in err


class CtrlCAt(TrainingHook):
    """Sends this process SIGINT during optimizer step `at` (0-based), as a Ctrl-C from the terminal would."""
    key = "ctrl-c"

    def __init__(self, at):
        self.at = at

    def after_step(self, step):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.spec("TRAIN-20", "TRAIN-8")
def test_ctrl_c_finishes_the_step_saves_a_checkpoint_and_the_resume_is_exact(tmp_path, capsys):
    """Issue 21 item 3: before, Ctrl-C printed a traceback and saved nothing."""
    data, cfg = token_data(8), dict(**{**RUN, "epochs": 2})
    full = lora_model().train(data, TrainingConfig(**cfg))
    with pytest.raises(mp.errors.TrainingInterrupted) as caught:
        lora_model().train(data, TrainingConfig(output_dir=str(tmp_path), hooks=(CtrlCAt(2),), **cfg))
    assert "interrupt: finishing this step, then saving a checkpoint" in capsys.readouterr().err
    e = caught.value
    assert isinstance(e, KeyboardInterrupt) and e.step == 3 and e.checkpoint == str(tmp_path / "checkpoint-3")
    assert e.history["loss"] == full["loss"][:3] and steps_in(tmp_path) == [3]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    resumed = lora_model().train(data, TrainingConfig(resume_from=e.checkpoint, **cfg))
    assert resumed["loss"] == full["loss"]


@pytest.mark.spec("TRAIN-6")
def test_a_diverging_run_keeps_the_last_good_checkpoint_and_says_what_to_do(tmp_path):
    """Issue 21 item 13: before, the error gave the step only; now it names the last good checkpoint (left as it
    was: the diverged weights are not saved over it or rotated past it), the lr, the last losses, and the fix."""
    class PoisonAt(TrainingHook):  # the weights blow up in step 3, as a huge learning rate makes them
        key = "poison"

        def __init__(self, model):
            self.model = model

        def after_step(self, step):
            if step == 2:
                B = self.model.net.get_submodule("model.layers.0.self_attn.q_proj").adapters["default"].lora_B.weight
                B.data = B.data * np.inf

    m = lora_model()
    with pytest.raises(mp.TrainingError, match=r"step 4: the loss is nan, so training stopped with no update.*"
                                               r"learning rate 0.003\d+; the last losses: .*, .*, .*\). Last good "
                                               r"checkpoint: .*checkpoint-2; resume_from=.* \(step 2\) with a lower"):
        m.train(token_data(8), TrainingConfig(output_dir=str(tmp_path), save_steps=2, save_total_limit=1,
                                              hooks=(PoisonAt(m),), **{**RUN, "epochs": 2}))
    assert steps_in(tmp_path) == [2]
    saved, _ = read_safetensors(str(tmp_path / "checkpoint-2" / "trainable.safetensors"))
    assert all(np.isfinite(v).all() for v in saved.values())
    h = lora_model().train(token_data(8), TrainingConfig(resume_from=str(tmp_path / "checkpoint-2"),
                                                         **{**RUN, "epochs": 2, "learning_rate": 1e-3}))
    assert len(h["loss"]) == 8 and all(math.isfinite(x) for x in h["loss"])
