"""Findings and reports, as text and JSON (spec/audit.md AUDIT-1).

Every audit returns a dataclass report holding its rows and its `findings`. A finding names the file and
the tensor, says what is wrong and what to do; `breaks` tells a finding that breaks the claim audited
(exit status 1) from a note (the claim stands). `status` is the exit status of the command: 0 verified,
1 a breaking finding; bad input never makes a report (a MiniPeftError, status 2).
"""
from __future__ import annotations

import dataclasses
import json
import math


@dataclasses.dataclass
class Finding:
    kind: str  # a short tag: wrong-merge, missing-tensor, untouched-changed, adapter-nonfinite, ...
    file: str
    tensor: str | None
    message: str  # what is wrong and what to do
    breaks: bool = True  # False: a note; the claim still holds

    def line(self) -> str:
        where = f"{self.file}: {self.tensor}" if self.tensor else self.file
        return f"{'FAIL' if self.breaks else 'note'} [{self.kind}] {where}: {self.message}"


class Report:
    """Base of the audit reports (each a dataclass with a `findings` list)."""

    command = ""

    @property
    def status(self) -> int:
        return 1 if any(f.breaks for f in self.findings) else 0

    def verdict(self) -> str:
        broken = sum(f.breaks for f in self.findings)
        notes = len(self.findings) - broken
        head = f"{self.command}: {'FAIL' if broken else 'OK'}"
        return head + (f" ({broken} finding(s) break the claim" + (f", {notes} note(s))" if notes else ")")
                       if broken else f" ({notes} note(s))" if notes else " (no findings)")

    def to_dict(self) -> dict:
        return {"command": self.command, "status": self.status, **_plain(dataclasses.asdict(self))}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def text(self) -> str:
        return "\n".join([*self.lines(), *(f.line() for f in self.findings), self.verdict()])

    def lines(self) -> list[str]:
        raise NotImplementedError

    def heat(self):
        """(quantity, {layer path: value}) for the --html heat map (AUDIT-25), or None."""
        return None


def _plain(v):
    """JSON-safe: a NaN or infinity becomes null (JSON has neither), tuples lists."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def progress(items, total: int, desc: str, enabled: bool = True, unit: str = "tensor"):
    """A tqdm bar on stderr over `items` (shown on a terminal only, as train's)."""
    from tqdm.auto import tqdm
    return tqdm(items, total=total, desc=desc, unit=unit, disable=None if enabled else True, leave=False)


def fmt(x: float) -> str:
    return "-" if x is None else f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
