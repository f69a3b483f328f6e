"""glibc malloc settings for the ``stexp`` command's own process: CPU inference without page-fault churn.

A CNN's forward pass on a CPU allocates activation buffers of tens of MB and frees them at every batch.
glibc serves blocks above its mmap threshold (at most 32 MB by default) with fresh ``mmap`` pages and gives
them back at ``free``, so every batch faults its activations in again: in ``benchmarks/cold_start.py`` the
process spent more system time than user time (462 M minor page faults for 21,070 patches). Raising the
mmap and trim thresholds keeps those buffers in the heap and reuses them.

Only the console script calls :func:`tune_for_inference` (``stexp.cli.console_main``), on its own process
at start: a library call never changes the caller's allocator (``stexp.cli.main`` called from Python does
not either). The same effect for a Python session: start it with ``MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment (``docs/distributed.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

#: ``mallopt`` parameters (glibc ``malloc.h``).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Blocks below this are served from the heap and kept for reuse (1 GiB: any activation buffer).
THRESHOLD_BYTES = 1 << 30
#: Environment variables with which a user has already chosen glibc's behaviour (then nothing is changed).
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def tune_for_inference() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; ``True`` if both were set.

    Nothing happens off Linux, without glibc, or when the environment already sets a ``MALLOC_*_``
    variable (the user's choice stands).
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES))
