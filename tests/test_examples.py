"""The examples run as the README says: the main job teaches the carried model `next` (held-out exact match
up, the reloaded adapter gives the same answers), over a float and a 4-bit base, and every method's
example trains, saves and reloads."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import every_method  # noqa: E402
import finetune_lora  # noqa: E402
import finetune_qlora  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("example", [finetune_lora, finetune_qlora], ids=["lora", "qlora"])
def test_the_main_job_teaches_next_and_reloads(example, tmp_path, capsys):
    assert example.main(["--out", str(tmp_path / "adapter"), "--steps", "120"]) == 0
    out = capsys.readouterr().out
    before = int(out.split("exact match before")[1].split("%")[0].split(":")[-1])
    after = int(out.split("exact match after")[1].split("%")[0].split(":")[-1])
    assert before <= 10 and after >= 80, out  # the bar: from under 10% to over 80%
    assert "same answers: True" in out


def test_every_method_example_trains_saves_and_reloads(capsys):
    methods = ["lora", "adalora", "ia3", "prefix_tuning", "ptuning"]
    assert every_method.main(["--steps", "3", "--methods", *methods]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[0] for r in rows] == methods and all(r[-1] == "True" for r in rows)
