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


def readme_block(first_line: str) -> str:
    """The README's python code from `first_line` to the end of its block."""
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md"), encoding="utf-8").read()
    start = text.index(first_line)
    return text[start:text.index("```", start)]


@pytest.mark.spec("LORA-8")
def test_the_readme_merge_snippet_runs_and_merges_the_mix(tmp_path, monkeypatch, capsys):
    """The README's merge snippet, run as written on the carried model (its placeholder path replaced): the
    saved model's logits are those of the active "mix" adapter. Before, the snippet activated "translation",
    so merge_and_unload merged that adapter alone and "mix" was made for nothing (shown by dropping the line)."""
    import numpy as np

    import minipeft as mp
    monkeypatch.chdir(tmp_path)
    for folder, targets, seed in (("my-lora", ["q_proj", "v_proj"], 1), ("other", ["k_proj", "o_proj"], 2)):
        m = mp.load_model(mp.DEMO_MODEL).apply_lora(target_modules=targets)
        rng = np.random.default_rng(seed)
        for _, p in m.net.named_parameters():
            if p.requires_grad:
                p.data = (p.data + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)
        m.save_adapters(folder)
    snippet = readme_block('base = mp.load_model("path/or/repo-id")').replace('"path/or/repo-id"', "mp.DEMO_MODEL")
    ids = [[1, 3, 4, 5, 6, 7]]
    ref = mp.load_model(mp.DEMO_MODEL)
    ref.load_adapters("my-lora", name="translation")
    ref.load_adapters("other", name="grammar")
    ref.merge_adapters({"translation": 0.7, "grammar": 0.3}, name="mix", combination="cat")
    ref.set_active_adapter("mix")
    want = ref(ids).numpy()
    exec(snippet, {"mp": mp})
    assert capsys.readouterr().out.strip() != ""
    got = mp.load_model("merged-model")(ids).numpy()
    print(f"\n  README merge snippet: max abs diff to the mix adapter {np.abs(got - want).max():.1e}")
    assert np.allclose(got, want, atol=1e-5)
    exec(snippet.replace('base.set_active_adapter("mix")', "").replace('"merged-model"', '"old"'), {"mp": mp})
    assert not np.allclose(mp.load_model("old")(ids).numpy(), want, atol=1e-3)
