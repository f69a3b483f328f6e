"""Writing outputs safely: build under a hidden sibling name, then move into place keeping the old until done.

Used by model folders (``models._format``) and the command line's outputs (``cli``).
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from pathlib import Path


def hidden_sibling(path: Path, tag: str) -> Path:
    """A hidden name beside ``path``, unique to this process, thread and call (``.name.<tag>-...``)."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}")


def remove_path(path: Path) -> None:
    """Remove a file, link or folder if it exists (errors ignored)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the complete ``tmp`` (a file or folder) to ``path``.

    An existing ``path`` is moved aside first, put back if the rename fails, and removed once ``tmp`` is in
    place, so ``path`` is never missing nor half-written. A file over a file is one atomic ``os.replace``.
    """
    if tmp.is_file() and path.is_file() and not path.is_symlink():
        os.replace(tmp, path)
        return
    if not (path.exists() or path.is_symlink()):
        os.rename(tmp, path)
        return
    old = hidden_sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the old one back
        raise
    remove_path(old)
