"""Worker for the concurrent feature-cache test (a module of its own so that a spawned process can import it)."""

from __future__ import annotations

import numpy as np


def write_many(cachedir: str, key: str, value: float, shape: tuple[int, int], n: int, start) -> int:
    """Wait for ``start``, then save features filled with ``value`` under ``key`` ``n`` times; returns the count."""
    import stexp
    from stexp.images._cache import save_features

    stexp.settings.cachedir = cachedir
    start.wait(60)
    written = 0
    for _ in range(n):
        written += save_features(key, np.full(shape, value, dtype=np.float32)) is not None
    return written
