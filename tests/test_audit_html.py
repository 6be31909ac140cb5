"""`minipeft audit ... --html FILE` (spec/audit.md AUDIT-25): one self-contained page per report, with the verdict,
every finding, the text report and embedded PNG plots when matplotlib is installed, none fetched from elsewhere."""
import base64
import os
import re
import sys

import numpy as np
import pytest

from minipeft.audit.html import grid, page
from minipeft.cli import main
from tests.test_audit_merged import base, rewrite, written  # noqa: F401

Q = "model.layers.0.self_attn.q_proj.weight"


def images(text):
    return re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)


def self_contained(text):
    assert "<script" not in text and "<link" not in text
    assert not re.search(r"(src|href)=['\"](?!data:)", text)  # nothing fetched: every image is inline data


@pytest.mark.spec("AUDIT-25")
def test_grid_places_each_layer_in_its_row_and_module_column():
    rows, cols, cells = grid({"model.layers.0.self_attn.q_proj": 1.0, "model.layers.1.self_attn.q_proj": 2.0,
                              "model.layers.1.mlp.up_proj": 3.0, "lm_head": 4.0})
    assert rows == ["model.layers.0", "model.layers.1", "lm_head"]
    assert cols == ["self_attn.q_proj", "mlp.up_proj", ""]
    assert cells == {("model.layers.0", "self_attn.q_proj"): 1.0, ("model.layers.1", "self_attn.q_proj"): 2.0,
                     ("model.layers.1", "mlp.up_proj"): 3.0, ("lm_head", ""): 4.0}


@pytest.mark.spec("AUDIT-25", "AUDIT-1")
def test_every_command_writes_a_self_contained_page_with_its_plots(base, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    adapter, merged = written(base, tmp_path)
    other, _ = written(base, tmp_path / "b", "lora", rank=4)
    runs = {"adapter": (["adapter", adapter, "--base", base], 2),
            "merged": (["merged", base, adapter, merged], 1),
            "diff": (["diff", adapter, other], 1),
            "convert": (["convert", adapter, str(tmp_path / "c"), "--rank", "2"], 1)}
    for name, (argv, plots) in runs.items():
        out = str(tmp_path / f"{name}.html")
        assert main(["audit", *argv, "--no-progress", "--html", out]) == 0
        text = open(out, encoding="utf-8").read()
        self_contained(text)
        assert f"<h1>minipeft audit {name}</h1>" in text and f"audit {name}: OK (no findings)" in text
        shots = images(text)
        assert len(shots) == plots, name
        assert all(base64.b64decode(s)[:8] == b"\x89PNG\r\n\x1a\n" for s in shots)
        assert text.count("<pre>") == 1
    capsys.readouterr()


@pytest.mark.spec("AUDIT-25")
def test_a_finding_is_on_the_page_and_the_exit_status_is_kept(base, tmp_path, capsys):
    adapter, merged = written(base, tmp_path)
    rewrite(merged, lambda t: t[Q].__setitem__((3, 5), t[Q][3, 5] + np.float32(1e-3)))
    out = str(tmp_path / "r.html")
    assert main(["audit", "merged", base, adapter, merged, "--no-progress", "--html", out]) == 1
    text = open(out, encoding="utf-8").read()
    assert "<li class='FAIL'>FAIL [wrong-merge]" in text and "(exit status 1)" in text
    capsys.readouterr()


@pytest.mark.spec("AUDIT-25")
def test_without_matplotlib_the_page_has_no_plots_and_says_why(base, tmp_path, monkeypatch):
    from minipeft.audit import audit_adapter
    adapter, _ = written(base, tmp_path)
    report = audit_adapter(adapter, base, show_progress=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    text = page(report)
    self_contained(text)
    assert images(text) == [] and "matplotlib is not installed" in text
    assert report.layers[0].path in text  # the text report is all there


@pytest.mark.spec("AUDIT-25")
def test_an_unwritable_page_leaves_no_file(base, tmp_path, monkeypatch):
    from minipeft.audit import audit_adapter, html
    adapter, _ = written(base, tmp_path)
    report = audit_adapter(adapter, base, show_progress=False)
    before = set(os.listdir(tmp_path))
    monkeypatch.setattr(html, "page", lambda r: 123)  # the write itself fails (TypeError) half way
    with pytest.raises(TypeError):
        html.write_html(report, str(tmp_path / "r.html"))
    assert set(os.listdir(tmp_path)) == before  # no page and no temporary file left
