"""`--html FILE`: an audit report as one self-contained HTML file (spec/audit.md AUDIT-25).

The page holds the verdict, every finding, the text report and, when matplotlib is installed (the `plots`
extra), PNG plots embedded as base64 data: a heat map of the report's per-layer quantity over layers x modules
(`Report.heat()`: ||dW||_F, the cosine of a diff, a merge's max |M - E|, ...) and, for `audit adapter`, each
layer's singular-value spectrum. No script, stylesheet or image is fetched: it opens from disk in a browser.
"""
from __future__ import annotations

import base64
import html
import io
import math
import re

from ..fileio import atomic_write

LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")  # model.layers.3.self_attn.q_proj -> (model.layers, 3, self_attn.q_proj)


def grid(values: dict):
    """(row labels, column labels, {(row, col): value}) of per-path values: a row per layer index, a column per
    module path inside the layer; a path without a layer index is a row of its own."""
    cells, rows, cols = {}, [], []
    for path, v in values.items():
        m = LAYER.match(path)
        row, col = (f"{m.group(1)}.{m.group(2)}", m.group(3)) if m else (path, "")
        rows += [row] if row not in rows else []
        cols += [col] if col not in cols else []
        cells[row, col] = v
    return rows, cols, cells


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plots(report) -> list[tuple[str, str]]:
    """[(caption, base64 PNG)] for the report; [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    import numpy as np
    out = []
    heat = report.heat()
    if heat and heat[1]:
        title, values = heat
        rows, cols, cells = grid(values)
        data = np.full((len(rows), len(cols)), np.nan)
        for (r, c), v in cells.items():
            data[rows.index(r), cols.index(c)] = v if v is not None and math.isfinite(v) else np.nan
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 1.0 + 0.32 * len(rows)))
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        fig.colorbar(im, ax=ax, label=title)
        ax.set_title(title)
        out.append((f"{title} per layer (rows) and module (columns); blank: not adapted", _png(fig)))
    spectra = getattr(report, "spectra", lambda: None)()
    if spectra:
        fig, ax = plt.subplots(figsize=(7, 4))
        for path, s in spectra.items():
            s = [v for v in s if s and v > 1e-9 * s[0]]  # below that: the SVD's rounding of an exact zero
            if s:
                ax.semilogy(range(1, len(s) + 1), s, lw=0.8, label=path if len(spectra) <= 12 else None)
        ax.set_xlabel("index k")
        ax.set_ylabel("singular value s_k of dW")
        ax.set_title("singular-value spectra")
        if len(spectra) <= 12:
            ax.legend(fontsize=6)
        out.append(("each layer's singular values of dW (the largest 64, those above 1e-9 s_1)", _png(fig)))
    return out


def page(report) -> str:
    e = html.escape
    figures = plots(report)
    parts = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>minipeft {e(report.command)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}pre{background:#f6f6f6;padding:1em;"
             "overflow-x:auto;font-size:12px}.FAIL{color:#b00}.note{color:#555}img{max-width:100%}</style>",
             "</head><body>", f"<h1>minipeft {e(report.command)}</h1>",
             f"<p><b>{e(report.verdict())}</b> (exit status {report.status})</p>"]
    if report.findings:
        parts.append("<h2>Findings</h2><ul>")
        parts += [f"<li class='{'FAIL' if f.breaks else 'note'}'>{e(f.line())}</li>" for f in report.findings]
        parts.append("</ul>")
    for caption, data in figures:
        parts.append(f"<figure><img alt='{e(caption)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    if not figures:
        parts.append("<p class='note'>No plots: matplotlib is not installed (pip install 'minipeft[plots]').</p>")
    parts.append("<h2>Report</h2><pre>" + e("\n".join(report.lines())) + "</pre></body></html>")
    return "\n".join(parts)


def write_html(report, path: str) -> None:
    """The report's page at `path`, written to a temporary file and renamed into place."""
    text = page(report)
    with atomic_write(path, "w") as f:
        f.write(text)
