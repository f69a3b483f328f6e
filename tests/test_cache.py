"""The feature cache under concurrent writers and interrupts: a reader sees a complete file or none."""

import multiprocessing as mp
import threading

import numpy as np
import pytest

import stexp
from stexp.images import _cache
from stexp.images._cache import cache_path, load_features, save_features

SHAPE = (400, 64)  # ~100 kB per file: large enough that a write is not one syscall


def _leftovers():
    return sorted(p.name for p in _cache.cache_dir().iterdir() if p.name.startswith("."))


def test_two_processes_write_the_same_key(tmp_path):
    from _cache_worker import write_many

    stexp.settings.cachedir = tmp_path
    key = "k" * 64
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Event()
        with ctx.Pool(2) as pool:
            jobs = [pool.apply_async(write_many, (str(tmp_path), key, float(v), SHAPE, 40, start)) for v in (1, 2)]
            start.set()
            seen = set()
            while not all(j.ready() for j in jobs):  # read while they write: never a partial file
                arr = load_features(key, SHAPE)
                if arr is not None:
                    values = np.unique(arr)
                    assert len(values) == 1 and values[0] in (1.0, 2.0)
                    seen.add(float(values[0]))
            assert [j.get(60) for j in jobs] == [40, 40]
    final = load_features(key, SHAPE)
    assert final is not None and len(np.unique(final)) == 1 and final[0, 0] in (1.0, 2.0)
    assert _leftovers() == []


def test_threads_use_distinct_temporary_files(tmp_path, monkeypatch):
    stexp.settings.cachedir = tmp_path
    names = []
    real = _cache._temporary_name

    def record(path):
        name = real(path)
        names.append(name)
        return name

    monkeypatch.setattr(_cache, "_temporary_name", record)
    threads = [threading.Thread(target=save_features, args=("t" * 64, np.full(SHAPE, i, np.float32))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 8
    assert load_features("t" * 64, SHAPE) is not None and _leftovers() == []


def test_interrupt_between_write_and_rename_leaves_no_temporary(tmp_path, monkeypatch):
    stexp.settings.cachedir = tmp_path
    save_features("a" * 64, np.ones(SHAPE, np.float32))

    def interrupted(src, dst):
        raise KeyboardInterrupt

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(_cache.os, "replace", interrupted)
        save_features("a" * 64, np.zeros(SHAPE, np.float32))
    assert _leftovers() == []
    np.testing.assert_array_equal(load_features("a" * 64, SHAPE), 1.0)  # the old entry is intact


def test_failed_write_only_warns(tmp_path, monkeypatch):
    stexp.settings.cachedir = tmp_path

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_cache.np, "save", full_disk)
    assert save_features("b" * 64, np.ones(SHAPE, np.float32)) is None
    assert _leftovers() == [] and not cache_path("b" * 64).exists()


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_damaged_cache_file_is_ignored(tmp_path, damage):
    stexp.settings.cachedir = tmp_path
    path = save_features("c" * 64, np.ones(SHAPE, np.float32))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "garbage": b"\x93NUMPY garbage"}[damage])
    assert load_features("c" * 64, SHAPE) is None
    assert load_features("c" * 64, (SHAPE[0], 3)) is None
