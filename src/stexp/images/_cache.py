"""Disk cache of image features: one ``.npy`` per (slide content, spot centres, encoder spec)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
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
    h.update(memoryview(c).cast("B"))  # type: ignore[arg-type]  # numpy arrays are buffers
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
    except (OSError, ValueError, EOFError) as err:
        logger.debug(f"ignoring unreadable feature cache {path}: {err}")
        return None
    if arr.shape != tuple(shape) or arr.dtype != np.float32:
        logger.debug(f"ignoring feature cache {path}: shape {arr.shape} {arr.dtype}, expected {shape} float32")
        return None
    return arr


def _temporary_name(path: Path) -> Path:
    """A hidden sibling of ``path`` unique to this process, thread and call (two writers never share one)."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:12]}.tmp.npy")


def save_features(key: str, features: np.ndarray) -> Path | None:
    """Write features atomically: a temporary file unique to this process and thread, then ``os.replace``.

    Two processes (or threads) embedding the same slide at once each write their own temporary file and
    the last rename wins; a reader sees the old complete file or the new complete file, never a partial
    one. The temporary file is removed on any exception, including ``KeyboardInterrupt`` between the
    write and the rename. A failure to write (``OSError``) only logs a warning.
    """
    from stexp._settings import logger

    path = cache_path(key)
    tmp = _temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        logger.warning(f"could not write the feature cache {path}: {err}")
        tmp.unlink(missing_ok=True)
        return None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
