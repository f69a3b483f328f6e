"""Shared fixtures: synthetic data (the workhorse) and the real data under ``STEXP_DATA_DIR``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_stexp(tmp_path_factory, monkeypatch):
    """Each test gets its own cache directory and a fixed seed, and sees warnings."""
    import stexp

    monkeypatch.setattr(stexp.settings, "_cachedir", tmp_path_factory.mktemp("stexp_cache"))
    stexp.settings.verbosity = 2
    yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data folder: skip when ``STEXP_DATA_DIR`` is unset, fail when it is set but missing."""
    value = os.environ.get("STEXP_DATA_DIR")
    if not value:
        pytest.skip("STEXP_DATA_DIR is not set: real-data tests skipped (set it to ../shared/data)")
    path = Path(value)
    if not (path / "her2st").is_dir() or not (path / "visium_tiny").is_dir():
        pytest.fail(f"STEXP_DATA_DIR={value} is set but does not hold her2st/ and visium_tiny/")
    return path


@pytest.fixture(scope="session")
def her2st_dir(data_dir) -> Path:
    return data_dir / "her2st"


@pytest.fixture(scope="session")
def visium_tiny_dir(data_dir) -> Path:
    return data_dir / "visium_tiny"


@pytest.fixture(scope="session")
def _synthetic_cached():
    import stexp

    return stexp.datasets.synthetic(n_slides=3, n_spots=144, n_genes=60, seed=0)


@pytest.fixture
def synth(_synthetic_cached):
    """A fresh copy of a small 3-slide synthetic dataset (144 spots, 60 genes per slide)."""
    return _synthetic_cached.copy()


@pytest.fixture
def faiss():
    """The faiss module (approximate retrieval tests), or skip when it is not installed."""
    return pytest.importorskip("faiss")
