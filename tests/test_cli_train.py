"""`minipeft train`'s options (spec/cli.md CLI-1..CLI-4): defaults shown and working on the carried model, a
--config file under the command line, Ctrl-C that saves and prints the resume command, one-line errors."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

import minipeft
from minipeft.cli import build_parser, main
from minipeft.cli_train import CONFIG_NAME, DEFAULT_LR
from tests.test_cli import data  # noqa: F401 - the fixture: 8 `next` records

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from tasks import examples  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def log_of(out):
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def train_help():
    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    return sub.choices["train"].format_help()


@pytest.mark.spec("CLI-1")
def test_every_train_option_shows_its_default_in_help():
    """Issue 21 item 6: before, --help showed no defaults, and --eval-data, --max-length, --eval-steps did not exist."""
    text = " ".join(train_help().split())
    for flag in ("--eval-data", "--max-length", "--eval-steps", "--save-total-limit", "--schedule", "--config",
                 "--early-stopping-patience", "--load-best", "--weight-decay", "--max-grad-norm"):
        assert flag in text
    assert f"peak learning rate (default: {DEFAULT_LR})" in text and "(default: 3)" in text
    sub = next(a for a in build_parser()._actions if a.dest == "cmd").choices["train"]
    assert all(a.help for a in sub._actions)  # the defaults formatter shows the default of every option with help
    assert text.count("(default:") == len(sub._actions) - 1  # all but -h


@pytest.mark.spec("CLI-1")
@pytest.mark.slow
def test_the_default_options_teach_the_carried_model_next(tmp_path, capsys):
    """Issue 21 item 6: with the old defaults (lr 1e-4, 1 epoch, batch 4) exact match stayed at 2%."""
    held = examples("next", 40, seed=123)
    train = write_jsonl(tmp_path / "train.jsonl", examples("next", 2000, seed=7, exclude={e["prompt"] for e in held}))
    out = tmp_path / "out"
    assert main(["train", "--model", minipeft.DEMO_MODEL, "--data", train, "--output", str(out)]) == 0
    model = minipeft.load_model(minipeft.DEMO_MODEL)
    model.load_adapters(str(out))
    right = sum(model.generate(e["prompt"], max_new_tokens=8).strip() == e["completion"].strip() for e in held)
    assert right / len(held) >= 0.8


@pytest.mark.spec("CLI-1", "TRAIN-19")
def test_eval_data_max_length_and_eval_steps_reach_the_run(data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert main(["train", "--model", minipeft.DEMO_MODEL, "--data", data, "--output", str(out), "--eval-data", data,
                 "--eval-steps", "2", "--max-steps", "4", "--batch-size", "2", "--max-length", "6"]) == 0
    printed = capsys.readouterr()
    log = log_of(out)
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4] and f"eval loss {evals[-1]['eval_loss']:.4f}" in printed.out
    assert f"eval_loss={evals[-1]['eval_loss']:.4f}" in printed.err  # on the progress bar
    args = json.loads((out / "training_args.json").read_text())
    assert args["max_length"] == 6 and args["eval_steps"] == 2 and args["learning_rate"] == DEFAULT_LR


@pytest.mark.spec("CLI-2")
@pytest.mark.parametrize("kind", ["json", "yaml"])
def test_a_config_file_sets_options_and_the_command_line_overrides_it(data, tmp_path, kind, capsys):  # noqa: F811
    out = tmp_path / "out"
    values = {"model": minipeft.DEMO_MODEL, "data": data, "output": str(out), "max_steps": 3, "batch-size": 2,
              "lr": 0.01, "rank": 2, "set": {"bias": "all"}, "target_modules": ["q_proj", "k_proj"]}
    path = tmp_path / f"run.{kind}"
    if kind == "json":
        path.write_text(json.dumps(values))
    else:
        import yaml
        path.write_text(yaml.safe_dump(values) + "schedule: cosine\n")
    assert main(["train", "--config", str(path), "--lr", "0.005"]) == 0
    log = log_of(out)
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 3 and steps[0]["lr"] == 0.005 and log[0]["learning_rate"] == 0.005  # the command line won
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 2 and sorted(saved["target_modules"]) == ["k_proj", "q_proj"] and saved["bias"] == "all"
    resolved = json.loads((out / CONFIG_NAME).read_text())
    assert resolved["lr"] == 0.005 and resolved["batch_size"] == 2 and resolved["schedule"] == (
        "cosine" if kind == "yaml" else "linear")
    # the resolved file repeats the run: the same losses
    again = tmp_path / "again"
    assert main(["train", "--config", str(out / CONFIG_NAME), "--output", str(again)]) == 0
    assert [r["loss"] for r in log_of(again) if "loss" in r] == [r["loss"] for r in log if "loss" in r]


@pytest.mark.spec("CLI-2", "CLI-4")
@pytest.mark.parametrize("content, message", [
    ('{"model": "m", "data": "d", "output": "o", "learning_rate": 1}', "unknown option 'learning_rate'"),
    ('{"model": "m", "data": "d", "output": "o", "batchsize": 1}', "did you mean batch_size"),
    ('{"model": "m", "data": "d", "output": "o", "epochs": "three"}', "epochs='three' is not a int"),
    ('{"model": "m", "data": "d", "output": "o", "epochs": 1.5}', "epochs=1.5 must be an int"),
    ('{"model": "m", "data": "d", "output": "o", "schedule": "step"}', "choose one of linear, cosine, constant"),
    ('{"model": "m"}', "needs --data and --output"),
    ('[1, 2]', "one mapping of option names"),
    ('{"model": ', "not valid JSON at line 1"),
])
def test_bad_config_files_are_one_line_errors_that_write_nothing(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["bad.json"]


def test_a_config_file_that_is_missing_is_an_error(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.spec("CLI-3", "TRAIN-20")
@pytest.mark.slow
def test_ctrl_c_saves_prints_the_resume_command_and_exits_130(tmp_path):
    """Issue 21 item 3: before, Ctrl-C printed a traceback, saved nothing and said nothing of resuming."""
    rows = examples("next", 64, seed=7)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    run = ["--model", minipeft.DEMO_MODEL, "--data", train, "--batch-size", "1", "--max-steps", "1500"]
    full = tmp_path / "full"
    assert main(["train", *run, "--output", str(full)]) == 0
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ROOT}
    child = subprocess.Popen([sys.executable, "-m", "minipeft", "train", *run, "--output", str(out)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not ((out / "log.jsonl").exists() and  # 20 step records (the run
                                                (out / "log.jsonl").read_text().count('"loss"') >= 20):  # header has none)
        time.sleep(0.002)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    line = next(x for x in stderr.splitlines() if x.startswith("resume with: "))
    cmd = shlex.split(line[len("resume with: "):])
    assert cmd[:2] == ["minipeft", "train"] and cmd[-2:] == ["--resume-from", str(out)]
    stopped = [r["step"] for r in log_of(out) if "loss" in r][-1]
    assert 20 <= stopped < 1500 and (out / f"checkpoint-{stopped}").is_dir()
    assert main(cmd[1:]) == 0  # the printed command, run as printed
    losses = lambda o: [r["loss"] for r in log_of(o) if "loss" in r]  # noqa: E731
    assert losses(out) == losses(full)  # bit for bit, across the interrupt


@pytest.mark.spec("CLI-4")
def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(data, tmp_path, capsys, monkeypatch):  # noqa: F811
    def broken(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr("minipeft.model.load_model", broken)
    argv = ["train", "--model", minipeft.DEMO_MODEL, "--data", data, "--output", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == "minipeft: error: RuntimeError: disk on fire (run again with --debug for the traceback)\n"
    with pytest.raises(RuntimeError, match="disk on fire"):
        main([*argv, "--debug"])

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("minipeft.model.load_model", interrupted)
    assert main(argv) == 130 and capsys.readouterr().err == "minipeft: interrupted\n"
    assert not (tmp_path / "o").exists()


def readme_walkthrough() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = text.split("<!-- walkthrough -->\n```bash\n", 1)[1]
    return block.split("```", 1)[0]


@pytest.mark.oracle
@pytest.mark.slow
@pytest.mark.spec("CLI-3", "CLI-1")
def test_the_readme_walkthrough_runs_as_written(tmp_path):
    """Issue 21: train -> interrupt -> resume -> eval -> merge -> load in transformers, from the README."""
    pytest.importorskip("transformers")
    import shutil
    shutil.copytree(os.path.join(ROOT, "examples"), tmp_path / "examples")
    shutil.copytree(minipeft.DEMO_MODEL, tmp_path / "minipeft" / "data" / "tiny-llama-chars")
    bin_dir = tmp_path / "bin"  # `minipeft` is this checkout's, whatever else is installed
    bin_dir.mkdir()
    (bin_dir / "minipeft").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m minipeft "$@"\n')
    (bin_dir / "minipeft").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": ROOT, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", "-e", "-c", readme_walkthrough()], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "merged model saved to runs/walk-merged" in out
    match = float(next(x for x in out.splitlines() if x.startswith("exact match ")).split()[2].rstrip("%"))
    assert match >= 80.0
    assert out.strip().splitlines()[-1].strip() == "dbu"  # transformers' greedy answer to "next cat ="
    steps = [r["step"] for r in log_of(tmp_path / "runs" / "walk") if "loss" in r]
    assert steps == list(range(1, 751))
