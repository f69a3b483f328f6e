"""Peak memory of a benchmark process, shared by the benchmark scripts."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident memory of this process (``VmHWM``), in MiB.

    ``ru_maxrss`` would not do for the benchmarks' child processes: Linux carries the parent's peak
    across fork+exec, so every child would report at least the parent's memory when it was started.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best available
