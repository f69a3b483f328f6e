"""The model-folder format: ``model.json`` + ``weights.safetensors``, written atomically, read with checks.

A model folder holds

- ``weights.safetensors``: every learnt array by name (:mod:`safetensors.numpy`; nothing is pickled);
- ``model.json``: the configuration (model name, genes, encoder spec, hyper-parameters, ...) and, under
  ``"files"``, the SHA-256 checksum and byte size of each weight file.

:func:`write_model_dir` writes both into a temporary sibling folder and renames it into place, so an
interrupted save (an exception or Ctrl-C in the middle) never leaves a half-written model, and with
``overwrite=True`` the old model stays intact until the new one is complete. :func:`read_model_dir`
verifies size and checksum before decoding the weights and names the file at fault on any damage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
#: Key of ``model.json`` with ``{file name: {"sha256": ..., "bytes": ...}}``.
FILES_KEY = "files"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in {CONFIG_FILE}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _sibling(path: Path, tag: str) -> Path:
    """A hidden sibling name unique to this process, thread and call."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}")


def write_model_dir(path: str | os.PathLike, config: dict, state: dict[str, np.ndarray], *, overwrite: bool) -> Path:
    """Write a model folder atomically: ``model.json`` (``config`` + weight checksums) and ``weights.safetensors``.

    Parameters
    ----------
    path
        The model folder. Its parent is created when missing.
    config
        JSON-serialisable configuration (numpy scalars and arrays and paths are converted). Its
        ``"files"`` key is set here.
    state
        Every learnt array by name.
    overwrite
        Replace an existing non-empty folder. The old folder is moved aside only once the new one is
        complete, and removed after the new one is in place.

    Returns
    -------
    The folder's path.

    Raises
    ------
    FileExistsError
        If ``path`` is a non-empty folder and ``overwrite`` is False, or is a file.
    TypeError
        If ``config`` holds something JSON cannot store, or ``state`` something other than arrays.
    """
    import safetensors.numpy

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is a file, not a model folder.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it.")
    bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise TypeError(f"model state entries {bad[:5]} are not numpy arrays.")
    arrays = {str(k): np.ascontiguousarray(v) for k, v in state.items()}
    json.dumps(config, default=_json_default)  # content errors surface before anything is written

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        tmp.mkdir()
        weights = tmp / WEIGHTS_FILE
        safetensors.numpy.save_file(arrays, str(weights))
        data = weights.read_bytes()
        full = {**config, FILES_KEY: {WEIGHTS_FILE: {"sha256": _sha256(data), "bytes": len(data)}}}
        del data
        _write_bytes(tmp / CONFIG_FILE, json.dumps(full, indent=2, default=_json_default).encode())
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the complete ``tmp`` folder to ``path``; an existing ``path`` is moved aside first and removed after."""
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if not path.exists():
        os.rename(tmp, path)
        return
    old = _sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)  # put the old model back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _read_config(file: Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {file.parent} is not a saved stexp model folder.")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is damaged: not UTF-8 text ({err}).") from err
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{file} is damaged: invalid JSON ({err.msg} at line {err.lineno}, column {err.colno})."
        ) from err
    if not isinstance(config, dict):
        raise ValueError(f"{file} is damaged: it holds a JSON {type(config).__name__}, not an object.")
    return config


def read_model_dir(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a model folder written by :func:`write_model_dir`, checking the weights against ``model.json``.

    Returns
    -------
    The configuration (with its ``"files"`` entry) and the arrays by name.

    Raises
    ------
    FileNotFoundError
        If the folder, ``model.json`` or the weight file is missing (named).
    ValueError
        If ``model.json`` is not valid JSON (the message names the path and the problem), or the weight
        file's size or SHA-256 differs from the one recorded (truncated or replaced), or it cannot be
        decoded; the message names the file. Folders saved before checksums were recorded are read
        without that check (a debug message says so).
    """
    from safetensors.numpy import load

    from stexp._settings import logger

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist (or is not a folder).")
    config = _read_config(path / CONFIG_FILE)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the model folder {path} has no weights.")
    data = weights.read_bytes()
    record = (config.get(FILES_KEY) or {}).get(WEIGHTS_FILE)
    if record is None:
        logger.debug(f"{path / CONFIG_FILE} records no checksum of {WEIGHTS_FILE} (older stexp): not verified.")
    else:
        if not isinstance(record, dict) or "sha256" not in record or "bytes" not in record:
            raise ValueError(
                f"{path / CONFIG_FILE} is damaged: its {FILES_KEY!r} entry of {WEIGHTS_FILE} is {record!r}."
            )
        if len(data) != record["bytes"]:
            raise ValueError(
                f"{weights} has {len(data)} bytes, {CONFIG_FILE} records {record['bytes']}: the file is truncated "
                "or was replaced; save the model again."
            )
        digest = _sha256(data)
        if digest != record["sha256"]:
            raise ValueError(
                f"{weights} is damaged: its SHA-256 {digest[:12]}... differs from the {record['sha256'][:12]}... "
                f"recorded in {CONFIG_FILE}; save the model again."
            )
    try:
        state = load(data)
    except Exception as err:  # safetensors raises its own SafetensorError (and others) on a damaged file
        raise ValueError(f"{weights} cannot be decoded as safetensors: {err}") from err
    return config, dict(state)
