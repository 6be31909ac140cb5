"""The benchmarks' memory rows measure the child's own peak (issue 15: ru_maxrss of a fork + exec child
starts at its parent's peak, so every minipeft row of a first run read the parent's 342-359 MB)."""
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = ("import sys; sys.path.insert(0, {bench!r}); from peak_memory import peak_rss_mb; import numpy as np; "
         "a = np.ones({n} // 8); a += 1; print(peak_rss_mb())")


def child_peak(n_bytes: int) -> float:
    code = CHILD.format(bench=os.path.join(ROOT, "benchmarks"), n=n_bytes)
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_a_child_reports_its_own_peak_not_its_parents():
    held = np.ones(400_000_000 // 8)
    held += 1  # the parent's resident set is now above 400 MB
    small, big = child_peak(1_000_000), child_peak(200_000_000)
    assert small < 150, small  # numpy's import and the interpreter: tens of MB, not the parent's 400
    assert 200_000_000 / 2**20 <= big - small + 5 < 200_000_000 / 2**20 + 60, (small, big)
    del held
