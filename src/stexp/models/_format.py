"""The model-folder format: ``model.json`` + ``weights.safetensors``, written atomically, read with checks.

A model folder holds

- ``weights.safetensors``: every learnt array by name (:mod:`safetensors.numpy`; nothing is pickled);
- ``model.json``: the configuration (model name, genes, encoder spec, hyper-parameters, calibration, ...),
  its ``"format_version"``, under ``"files"`` the SHA-256 checksum and byte size of every other file of
  the folder, and under ``"content_sha256"`` the SHA-256 of its own content: the canonical JSON
  (:func:`content_sha256`) of everything in it but that field. Every file of the folder is covered.

:func:`write_model_dir` writes both into a temporary sibling folder and renames it into place, so an
interrupted save (an exception or Ctrl-C in the middle) never leaves a half-written model, and with
``overwrite=True`` the old model stays intact until the new one is complete. :func:`read_model_dir`
checks the format version first (a folder of a newer stexp is refused as such, before anything else is
read), then ``model.json``'s own checksum, then each file's size and checksum, and names the file at
fault on any damage.

Format history: 1, a checksum of the weights only (``model.json`` not covered; still read, with a
warning); 2, every file covered.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from stexp._files import hidden_sibling, move_into_place

CONFIG_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
#: Key of ``model.json`` with ``{file name: {"sha256": ..., "bytes": ...}}``.
FILES_KEY = "files"
#: Key of ``model.json`` with the SHA-256 of its own canonical JSON without this key (format 2 on).
CONTENT_KEY = "content_sha256"
#: The model-folder format this stexp writes, and the newest it reads (see the module's format history).
FORMAT_VERSION = 2


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


def content_sha256(config: dict) -> str:
    """SHA-256 of ``config``'s canonical JSON, without its ``"content_sha256"`` entry.

    Canonical: keys sorted, no whitespace, ASCII escapes, floats as Python writes them (they read back
    exactly), so the hash depends on the values only, not on how ``model.json`` is laid out.
    """
    body = {k: v for k, v in config.items() if k != CONTENT_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default)
    return _sha256(text.encode())


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_model_dir(path: str | os.PathLike, config: dict, state: dict[str, np.ndarray], *, overwrite: bool) -> Path:
    """Write a model folder atomically: ``model.json`` (``config`` + checksums) and ``weights.safetensors``.

    Parameters
    ----------
    path
        The model folder. Its parent is created when missing.
    config
        JSON-serialisable configuration (numpy scalars and arrays and paths are converted). Its
        ``"format_version"``, ``"files"`` and ``"content_sha256"`` keys are set here.
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
    tmp = hidden_sibling(path, "tmp")
    try:
        tmp.mkdir()
        weights = tmp / WEIGHTS_FILE
        safetensors.numpy.save_file(arrays, str(weights))
        data = weights.read_bytes()
        files = {WEIGHTS_FILE: {"sha256": _sha256(data), "bytes": len(data)}}
        del data
        full = {**config, "format_version": FORMAT_VERSION, FILES_KEY: files}
        full = json.loads(json.dumps(full, default=_json_default))  # hashed as it will be read back
        full[CONTENT_KEY] = content_sha256(full)
        _write_bytes(tmp / CONFIG_FILE, json.dumps(full, indent=2).encode())
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the complete ``tmp`` folder to ``path`` (an empty folder there first removed; see :func:`move_into_place`)."""
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    move_into_place(tmp, path)


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


def _check_format(config: dict, file: Path) -> int:
    """The folder's format version, checked before anything else: a newer one is refused as such."""
    from stexp import __version__

    version = config.get("format_version")
    if version is None:
        raise ValueError(
            f"{file} records no format_version: it is not the model.json of a stexp model folder, or it is damaged."
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"{file} is damaged: its format_version is {version!r}, not a positive integer.")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"this model folder ({file.parent}) was written by a newer stexp (format {version}); this stexp "
            f"({__version__}) reads up to format {FORMAT_VERSION}: upgrade stexp (pip install -U stexp)."
        )
    return version


def _check_content(config: dict, file: Path, version: int) -> None:
    """Verify ``model.json`` against its own checksum (format 2 on); warn that a format-1 file is not covered."""
    from stexp._settings import logger

    recorded = config.get(CONTENT_KEY)
    if recorded is None and version < 2:
        logger.warning(
            f"{file}: a model folder of format {version} (an older stexp) checksums its weights only, so the values "
            "in model.json (hyper-parameters, calibration, ...) are not verified; save the model again to cover "
            "them (stexp.models.load(path).save(path, overwrite=True))."
        )
        return
    if not isinstance(recorded, str):
        raise ValueError(f"{file} is damaged: its {CONTENT_KEY!r} (its own checksum) is {recorded!r}.")
    digest = content_sha256(config)
    if digest != recorded:
        raise ValueError(
            f"{file} is damaged or was edited: the SHA-256 of its content {digest[:12]}... differs from the "
            f"{recorded[:12]}... it records, so its values (genes, hyper-parameters, calibration, ...) cannot be "
            "trusted; save the model again, or restore the folder from a copy."
        )


def _file_records(config: dict, file: Path, version: int) -> dict[str, dict]:
    """The ``{name: {"sha256", "bytes"}}`` records of ``model.json``, checked to be well formed."""
    records = config.get(FILES_KEY)
    if records is None and version < 2:
        return {}  # folders saved before checksums were recorded
    if not isinstance(records, dict) or (version >= 2 and WEIGHTS_FILE not in records):
        raise ValueError(f"{file} is damaged: its {FILES_KEY!r} entry is {records!r}.")
    for name, record in records.items():
        if not isinstance(record, dict) or "sha256" not in record or "bytes" not in record:
            raise ValueError(f"{file} is damaged: its {FILES_KEY!r} entry of {name} is {record!r}.")
        if Path(name).name != name or name in (".", "..", CONFIG_FILE):
            raise ValueError(f"{file} is damaged: its {FILES_KEY!r} names {name!r}, not a file of the folder.")
    return records


def _verify(target: Path, data: bytes, record: dict) -> None:
    if len(data) != record["bytes"]:
        raise ValueError(
            f"{target} has {len(data)} bytes, {CONFIG_FILE} records {record['bytes']}: the file is truncated "
            "or was replaced; save the model again."
        )
    digest = _sha256(data)
    if digest != record["sha256"]:
        raise ValueError(
            f"{target} is damaged: its SHA-256 {digest[:12]}... differs from the {str(record['sha256'])[:12]}... "
            f"recorded in {CONFIG_FILE}; save the model again."
        )


def read_model_dir(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a model folder written by :func:`write_model_dir`, checking every file against ``model.json``.

    The format version is checked first; then ``model.json`` against its own checksum; then every file
    it lists (the weights) against its recorded size and SHA-256, before the weights are decoded.

    Returns
    -------
    The configuration (with its ``"files"`` and ``"content_sha256"`` entries) and the arrays by name.

    Raises
    ------
    FileNotFoundError
        If the folder, ``model.json`` or a file it lists is missing (named).
    ValueError
        If the folder was written by a newer stexp (its format version is newer than
        :data:`FORMAT_VERSION`: upgrade stexp); if ``model.json`` is not valid JSON, records no or a
        malformed format version, or its content differs from its own checksum (one edited value); if a
        file's size or SHA-256 differs from the one recorded (truncated or replaced), or the weights
        cannot be decoded. The message names the file. Folders of format 1 (``model.json`` not covered)
        are read with a warning that says so; the oldest, without any checksum, with a debug message.
    """
    from safetensors.numpy import load

    from stexp._settings import logger

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist (or is not a folder).")
    file = path / CONFIG_FILE
    config = _read_config(file)
    version = _check_format(config, file)  # first: a newer folder is not read as a damaged one
    _check_content(config, file, version)
    records = _file_records(config, file, version)
    weights = path / WEIGHTS_FILE
    contents = {}
    for name in dict.fromkeys([*records, WEIGHTS_FILE]):
        target = path / name
        if not target.is_file():
            what = "has no weights" if name == WEIGHTS_FILE else f"lacks a file that {CONFIG_FILE} lists"
            raise FileNotFoundError(f"{target} not found: the model folder {path} {what}.")
        contents[name] = target.read_bytes()
        if name in records:
            _verify(target, contents[name], records[name])
    if WEIGHTS_FILE not in records:
        logger.debug(f"{file} records no checksum of {WEIGHTS_FILE} (older stexp): not verified.")
    try:
        state = load(contents[WEIGHTS_FILE])
    except Exception as err:  # safetensors raises its own SafetensorError (and others) on a damaged file
        raise ValueError(f"{weights} cannot be decoded as safetensors: {err}") from err
    return config, dict(state)
