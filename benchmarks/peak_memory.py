"""A process's own peak resident memory, for the benchmarks' memory rows.

`getrusage(RUSAGE_SELF).ru_maxrss` is not it on Linux: a child started by fork + exec begins with its
parent's high-water mark, so a child of a parent that had built a torch checkpoint read 342-359 MB
whatever it did itself (issue 15). /proc/self/status's VmHWM is the peak of the process's current
address space, which exec replaces; ru_maxrss is the fallback where /proc is missing (it is in KiB on
Linux, bytes on macOS).
"""
from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB, since its last exec."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024
