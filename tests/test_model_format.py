"""The model folder: every file checksummed, the format version checked first, atomic saves, damage named at load."""

import json
import logging
import re

import numpy as np
import pytest

import stexp
from stexp.models._format import (
    CONFIG_FILE,
    CONTENT_KEY,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    content_sha256,
    read_model_dir,
    write_model_dir,
)

FEATURES = "X_random"


@pytest.fixture
def model(synth):
    rng = np.random.default_rng(0)
    synth.obsm[FEATURES] = rng.normal(size=(synth.n_obs, 8)).astype(np.float32)
    synth.uns.setdefault("stexp", {}).setdefault("features", {})[FEATURES] = {"encoder": "random"}
    return stexp.tl.fit(synth, model="ridge", features_key=FEATURES)


def _weights(model):
    return {k: np.asarray(v) for k, v in model._state().items()}


def _rewrite(path, edit, *, rehash=True):
    """Edit ``model.json`` with ``edit(config)``; with ``rehash``, record the edited content's checksum (a consistent file)."""
    config = json.loads((path / CONFIG_FILE).read_text())
    edit(config)
    if rehash and CONTENT_KEY in config:
        config[CONTENT_KEY] = content_sha256(config)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def _as_format_1(config):
    """What stexp wrote before model.json was covered: format 1, a checksum of the weights only."""
    config["format_version"] = 1
    del config[CONTENT_KEY]


def test_round_trip_records_checksum(model, tmp_path):
    path = model.save(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temporary left
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    config = json.loads((path / CONFIG_FILE).read_text())
    entry = config["files"][WEIGHTS_FILE]
    assert entry["bytes"] == (path / WEIGHTS_FILE).stat().st_size and len(entry["sha256"]) == 64
    assert config["format_version"] == FORMAT_VERSION == 2
    assert config[CONTENT_KEY] == content_sha256(config) and len(config[CONTENT_KEY]) == 64
    loaded = stexp.models.load(path, genes=model.genes)
    for k, v in _weights(model).items():
        np.testing.assert_array_equal(loaded._state()[k], v)


def test_truncated_weights_named(model, tmp_path):
    path = model.save(tmp_path / "m")
    w = path / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(
        ValueError, match=rf"{WEIGHTS_FILE} has \d+ bytes, {CONFIG_FILE} records \d+: the file is truncated"
    ):
        stexp.models.load(path)


def test_flipped_byte_fails_checksum(model, tmp_path):
    path = model.save(tmp_path / "m")
    w = path / WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE} is damaged: its SHA-256"):
        stexp.models.load(path)


def test_wrong_recorded_checksum(model, tmp_path):
    path = model.save(tmp_path / "m")
    _rewrite(path, lambda c: c["files"][WEIGHTS_FILE].update(sha256="0" * 64))  # model.json consistent with itself
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE} is damaged: .* differs from the 000000000000"):
        stexp.models.load(path)
    _rewrite(path, lambda c: c["files"][WEIGHTS_FILE].update(sha256="1" * 64), rehash=False)  # and not
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE} is damaged or was edited"):
        stexp.models.load(path)


def test_truncated_weights_without_checksum_still_named(model, tmp_path):
    """A folder from before checksums were recorded: safetensors' own error is re-raised naming the file."""
    path = model.save(tmp_path / "m")
    _rewrite(path, lambda c: (_as_format_1(c), c.pop("files")))
    assert stexp.models.load(path).genes == model.genes  # still readable
    w = path / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:50])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE} cannot be decoded as safetensors"):
        stexp.models.load(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"model": "ridge", ', r"invalid JSON \(Expecting property name enclosed in double quotes at line 1"),
        ("", r"invalid JSON \(Expecting value at line 1, column 1\)"),
        ("[1, 2]", "it holds a JSON list, not an object"),
    ],
)
def test_damaged_model_json_named(model, tmp_path, text, match):
    path = model.save(tmp_path / "m")
    (path / CONFIG_FILE).write_text(text)
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE} is damaged: {match}"):
        stexp.models.load(path)


def test_non_utf8_model_json(model, tmp_path):
    path = model.save(tmp_path / "m")
    (path / CONFIG_FILE).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=rf"{CONFIG_FILE} is damaged: not UTF-8"):
        stexp.models.load(path)


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
def test_missing_file_named(model, tmp_path, missing):
    path = model.save(tmp_path / "m")
    (path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        stexp.models.load(path)


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        stexp.models.load(tmp_path / "nowhere")


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_save_leaves_nothing(model, tmp_path, monkeypatch, exc):
    import safetensors.numpy

    def boom(*args, **kwargs):
        raise exc("interrupted")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(exc):
        model.save(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []  # no half model, no temporary folder


def test_interrupt_after_weights_before_rename(model, tmp_path, monkeypatch):
    """Ctrl-C between writing the files and renaming them into place."""
    from stexp.models import _format

    def boom(tmp, path):
        assert (tmp / WEIGHTS_FILE).is_file() and (tmp / CONFIG_FILE).is_file()
        raise KeyboardInterrupt

    monkeypatch.setattr(_format, "_move_into_place", boom)
    with pytest.raises(KeyboardInterrupt):
        model.save(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_keeps_old_model_on_failure(model, tmp_path, monkeypatch):
    import safetensors.numpy

    path = model.save(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(path)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        model.save(path, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert stexp.models.load(path).genes == model.genes


def test_overwrite_keeps_old_model_when_final_rename_fails(model, tmp_path, monkeypatch):
    import os

    from stexp.models import _format

    path = model.save(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real = os.rename
    calls = []

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old model moved aside; the new one fails to move in
            raise KeyboardInterrupt
        return real(src, dst)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(_format.os, "rename", rename)
        model.save(path, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_overwrite_replaces(model, tmp_path):
    path = model.save(tmp_path / "m")
    (path / "stale.txt").write_text("from an older save")
    model.save(path, overwrite=True)
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_write_model_dir_refuses_before_writing(tmp_path):
    with pytest.raises(TypeError, match="cannot store object"):
        write_model_dir(tmp_path / "a", {"x": object()}, {"w": np.zeros(2)}, overwrite=False)
    with pytest.raises(TypeError, match=r"\['w'\] are not numpy arrays"):
        write_model_dir(tmp_path / "b", {}, {"w": [1, 2]}, overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        write_model_dir(tmp_path / "file", {}, {"w": np.zeros(2)}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_write_read_round_trip(tmp_path):
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], dtype=np.int64)}
    path = write_model_dir(tmp_path / "x" / "m", {"genes": ["A"], "n": np.int64(3)}, state, overwrite=False)
    config, read = read_model_dir(path)
    assert config["genes"] == ["A"] and config["n"] == 3
    assert read.keys() == state.keys()
    for k in state:
        np.testing.assert_array_equal(read[k], state[k])
        assert read[k].dtype == state[k].dtype


def _flip_digit(text: str, start: int) -> str:
    """``text`` with the first digit after ``start`` that is part of a number changed (1 <-> 2, else -> 1)."""
    m = re.compile(r"\d").search(text, start)
    assert m is not None
    new = "2" if m.group() == "1" else "1"
    return text[: m.start()] + new + text[m.end() :]


@pytest.mark.parametrize("where", ['"calibration"', '"hparams"', '"genes"', '"n_features"', '"format_version"'])
def test_one_edited_value_in_model_json_is_refused(model, tmp_path, where):
    """One flipped digit anywhere in model.json (a calibration quantile moves interval bounds) fails its checksum."""
    path = model.save(tmp_path / "m")
    assert model.calibration is not None  # ridge calibrates by default: there is a calibration value to flip
    text = (path / CONFIG_FILE).read_text()
    edited = _flip_digit(text, text.index(where) + len(where))
    assert edited != text and json.loads(edited)  # still valid JSON: only the checksum can tell
    (path / CONFIG_FILE).write_text(edited)
    if where == '"format_version"':  # 2 -> 1: an older format does not skip the checksum the file carries
        assert json.loads(edited)["format_version"] == 1
    with pytest.raises(ValueError, match=rf"{re.escape(str(path / CONFIG_FILE))} is damaged or was edited"):
        stexp.models.load(path)


def test_layout_of_model_json_does_not_matter(model, tmp_path):
    """The checksum is over the values (canonical JSON), not the file's indentation or key order."""
    path = model.save(tmp_path / "m")
    config = json.loads((path / CONFIG_FILE).read_text())
    (path / CONFIG_FILE).write_text(json.dumps(dict(reversed(config.items())), indent=None))
    assert stexp.models.load(path).genes == model.genes


def test_newer_format_says_upgrade_before_anything_else(model, tmp_path):
    path = model.save(tmp_path / "m")
    _rewrite(path, lambda c: c.update(format_version=FORMAT_VERSION + 1, files={"weights.v3": {}}), rehash=False)
    (path / WEIGHTS_FILE).unlink()  # a newer layout: not reported as a missing or damaged file
    newer = (
        rf"written by a newer stexp \(format {FORMAT_VERSION + 1}\); this stexp .* reads up to format {FORMAT_VERSION}"
    )
    with pytest.raises(ValueError, match=newer + ": upgrade stexp"):
        stexp.models.load(path)


@pytest.mark.parametrize(
    ("version", "match"),
    [(None, "records no format_version"), ("2", "format_version is '2'"), (0, "format_version is 0"),
     (True, "format_version is True")],
)  # fmt: skip
def test_bad_format_version_named(model, tmp_path, version, match):
    path = model.save(tmp_path / "m")
    _rewrite(path, lambda c: c.pop("format_version") if version is None else c.update(format_version=version))
    with pytest.raises(ValueError, match=match):
        stexp.models.load(path)


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda c: c.pop(CONTENT_KEY), ValueError, rf"{CONFIG_FILE} is damaged: its '{CONTENT_KEY}'"),
        (lambda c: c.pop("files"), ValueError, rf"{CONFIG_FILE} is damaged: its 'files' entry is None"),
        (lambda c: c["files"].pop(WEIGHTS_FILE), ValueError, rf"{CONFIG_FILE} is damaged: its 'files' entry"),
        (lambda c: c["files"].update({"extra.bin": {"sha256": "0" * 64, "bytes": 1}}), FileNotFoundError,
         r"extra.bin not found: the model folder .* lacks a file that model.json lists"),
        (lambda c: c["files"].update({"../x": {"sha256": "0" * 64, "bytes": 1}}), ValueError, r"names '../x'"),
    ],
)  # fmt: skip
def test_damaged_manifest_named(model, tmp_path, edit, error, match):
    path = model.save(tmp_path / "m")
    _rewrite(path, edit, rehash=CONTENT_KEY in json.loads((path / CONFIG_FILE).read_text()))
    with pytest.raises(error, match=match):
        stexp.models.load(path)


def test_format_1_folder_still_loads_with_a_warning(model, synth, tmp_path, caplog):
    """Folders of the previous format (weights checksummed, model.json not) load, and the log says what is unchecked."""
    path = model.save(tmp_path / "m")
    _rewrite(path, _as_format_1, rehash=False)
    with caplog.at_level(logging.WARNING, logger="stexp"):
        old = stexp.models.load(path, genes=model.genes)
    assert "format 1 (an older stexp) checksums its weights only" in caplog.text and CONFIG_FILE in caplog.text
    a, b = synth.copy(), synth.copy()
    stexp.tl.predict(a, model, coverage=0.9)
    stexp.tl.predict(b, old, coverage=0.9)
    for key in ("stexp_pred", "stexp_pred_lo", "stexp_pred_hi"):
        np.testing.assert_array_equal(stexp.tl.get_prediction(a, key), stexp.tl.get_prediction(b, key))
    # its weights are still verified
    w = path / WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_FILE} has \d+ bytes"):
        stexp.models.load(path)
    # and saving it again covers model.json
    old.save(path, overwrite=True)
    assert CONTENT_KEY in json.loads((path / CONFIG_FILE).read_text())
