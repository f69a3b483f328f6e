"""Disk cache of image features: one ``.npy`` per (slide content, spot centres, encoder spec)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

#: Bump when the way features are computed changes, so that old cache files are not reused.
CACHE_VERSION = 1


def cache_dir() -> Path:
    """``stexp.settings.cachedir / "features"``."""
    from stexp._settings import settings

    return Path(settings.cachedir) / "features"


def cache_key(fingerprint: str, centres: np.ndarray, spec: dict[str, Any]) -> str:
    """SHA-256 of the slide fingerprint, the spot centres (full-res px, float64) and the spec (canonical JSON)."""
    h = hashlib.sha256()
    h.update(f"stexp-features-v{CACHE_VERSION}\n{fingerprint}\n".encode())
    c = np.ascontiguousarray(np.asarray(centres, dtype=np.float64))
    h.update(f"{c.shape}".encode())
    h.update(memoryview(c).cast("B"))
    h.update(json.dumps(spec, sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_path(key: str) -> Path:
    """Where the features of ``key`` live."""
    return cache_dir() / f"{key}.npy"


def load_features(key: str, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached features of ``key`` when present and of the expected ``shape``, else ``None``.

    An unreadable or mis-shaped file is reported (debug log) and ignored; it is overwritten by the next save.
    """
    from stexp._settings import logger

    path = cache_path(key)
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        logger.debug(f"ignoring unreadable feature cache {path}: {err}")
        return None
    if arr.shape != tuple(shape) or arr.dtype != np.float32:
        logger.debug(f"ignoring feature cache {path}: shape {arr.shape} {arr.dtype}, expected {shape} float32")
        return None
    return arr


def save_features(key: str, features: np.ndarray) -> Path | None:
    """Write features atomically (temporary file + ``os.replace``); a failure only logs a warning."""
    from stexp._settings import logger

    path = cache_path(key)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
        os.replace(tmp, path)
    except OSError as err:
        logger.warning(f"could not write the feature cache {path}: {err}")
        tmp.unlink(missing_ok=True)
        return None
    return path
