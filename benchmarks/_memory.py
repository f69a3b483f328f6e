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


def _status_kb(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


class AnonymousPeak:
    """Peak anonymous memory (``RssAnon``: the process's own arrays, not the pages of files it maps), in MiB.

    ``VmHWM`` counts the pages of a memory-mapped file that were read (features on disk) although the kernel
    can drop them at any time; this samples ``RssAnon`` every ``interval`` seconds in a thread while in use::

        with AnonymousPeak() as peak:
            ...
        peak.mb
    """

    def __init__(self, interval: float = 0.05) -> None:
        import threading

        self.interval, self.kb = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.kb = max(self.kb, _status_kb("RssAnon") or 0)
            self._stop.wait(self.interval)

    def __enter__(self) -> AnonymousPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.kb = max(self.kb, _status_kb("RssAnon") or 0)

    @property
    def mb(self) -> float:
        return self.kb / 1024
