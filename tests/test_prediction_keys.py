"""A prediction's keys go together: a new prediction under a key replaces every companion of the old one."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd
import pytest

import stexp
from stexp.tl._keys import PredictionKeys, clear_prediction, write_prediction_set
from stexp.tl._storage import get_prediction, has_prediction

KEY = "stexp_pred"
#: Where a prediction goes: the panel is all of var (layers) or smaller than var (obsm DataFrame).
STORAGES = ("layers", "obsm")
#: Companions a model can write through stexp.tl.predict.
PREDICTED = ("std", "lo", "hi", "expected_pcc", "shift")
#: Every companion.
COMPANIONS = PREDICTED


@pytest.fixture(scope="module")
def _data():
    adata = stexp.datasets.synthetic(n_slides=2, n_spots=48, n_genes=24, seed=0)
    rng = np.random.default_rng(0)
    adata.obsm["X_random"] = rng.normal(size=(adata.n_obs, 8)).astype(np.float32)
    return adata


@pytest.fixture
def data(_data):
    return _data.copy()


def _genes(adata, storage: str) -> list[str]:
    return list(adata.var_names) if storage == "layers" else list(adata.var_names[:12])


@pytest.fixture(scope="module")
def models(_data):
    """Per storage: ``full`` (calibrated kNN: spread, intervals, expected PCC), ``other`` (calibrated training
    mean: the same companions, other values) and ``bare`` (uncalibrated ridge without a shift reference, as
    a folder saved before the shift score existed loads: the mean only)."""
    out = {}
    for storage in STORAGES:
        kw = {"features_key": "X_random", "genes": _genes(_data, storage)}
        out["full", storage] = stexp.tl.fit(_data, model="knn", calibrate=True, **kw)
        out["other", storage] = stexp.tl.fit(_data, model="mean", calibrate=True, **kw)
        out["bare", storage] = stexp.tl.fit(_data, model="ridge", calibrate=False, **kw)
        out["bare", storage].shift = None
    return out


def _everywhere(adata, name: str) -> list[str]:
    """Where ``name`` is in the AnnData (layers, obsm, var, obs)."""
    places = {"layers": adata.layers, "obsm": adata.obsm, "var": adata.var.columns, "obs": adata.obs.columns}
    return [place for place, keys in places.items() if name in keys]


def _predict_full(adata, models, storage: str, key: str = KEY) -> None:
    """Every companion under ``key``: the kNN model with intervals and its shift score."""
    stexp.tl.predict(adata, models["full", storage], key_added=key, coverage=0.9)
    for companion in COMPANIONS:
        assert _everywhere(adata, getattr(PredictionKeys(key), companion)), companion


def test_names():
    keys = PredictionKeys("p")
    assert (keys.mean, keys.std, keys.lo, keys.hi) == ("p", "p_std", "p_lo", "p_hi")
    assert (keys.expected_pcc, keys.shift, keys.pcc) == ("p_expected_pcc", "p_shift", "p_pcc")
    assert keys.companions == ("p_std", "p_lo", "p_hi", "p_expected_pcc", "p_shift")
    assert list(keys) == ["p", *keys.companions, "p_pcc"]
    assert set(keys) == {*keys.arrays, *keys.var_columns, *keys.obs_columns}
    with pytest.raises(dataclasses.FrozenInstanceError):
        keys.key = "q"  # type: ignore[misc]
    with pytest.raises(ValueError, match="non-empty"):
        PredictionKeys("")


@pytest.mark.parametrize("second", STORAGES)
@pytest.mark.parametrize("first", STORAGES)
@pytest.mark.parametrize("companion", COMPANIONS)
def test_stale_companion_is_removed(data, models, companion, first, second, caplog):
    _predict_full(data, models, first)
    name = getattr(PredictionKeys(KEY), companion)
    with caplog.at_level(logging.INFO, logger="stexp"):
        stexp.tl.predict(data, models["bare", second])
    assert _everywhere(data, name) == []
    assert name in caplog.text  # the user is told what went
    assert _everywhere(data, KEY) == [second]
    record = data.uns["stexp"][KEY]
    assert record["model"] == "ridge" and "coverage" not in record and "calibration" not in record


@pytest.mark.parametrize("second", STORAGES)
@pytest.mark.parametrize("first", STORAGES)
@pytest.mark.parametrize("companion", PREDICTED)
def test_companion_written_again_is_replaced(data, models, companion, first, second):
    fresh = data.copy()
    _predict_full(data, models, first)
    stexp.tl.predict(data, models["other", second], coverage=0.5)
    stexp.tl.predict(fresh, models["other", second], coverage=0.5)
    name = getattr(PredictionKeys(KEY), companion)
    if companion == "expected_pcc":
        assert _everywhere(data, name) == ["var"]
        np.testing.assert_array_equal(data.var[name].to_numpy(), fresh.var[name].to_numpy())
    elif companion == "shift":
        assert _everywhere(data, name) == ["obs"]
        np.testing.assert_array_equal(data.obs[name].to_numpy(), fresh.obs[name].to_numpy())
    else:
        assert _everywhere(data, name) == [second]  # and nothing left in the other storage
        np.testing.assert_array_equal(get_prediction(data, name).to_numpy(), get_prediction(fresh, name).to_numpy())
    assert data.uns["stexp"][KEY]["coverage"] == 0.5


@pytest.mark.parametrize("storage", STORAGES)
def test_shift_written_again_is_replaced(data, models, storage):
    _predict_full(data, models, storage)
    genes = _genes(data, storage)
    mean = np.zeros((data.n_obs, len(genes)), dtype=np.float32)
    shift = np.arange(data.n_obs, dtype=np.float64)
    added = write_prediction_set(data, KEY, genes, mean, shift=shift)
    assert added == [f"adata.{storage}[{KEY!r}]", f"adata.obs['{KEY}_shift']"]
    np.testing.assert_array_equal(data.obs[f"{KEY}_shift"].to_numpy(), shift)
    for name in ("std", "lo", "hi", "expected_pcc"):
        assert _everywhere(data, getattr(PredictionKeys(KEY), name)) == []


@pytest.mark.parametrize("second", STORAGES)
@pytest.mark.parametrize("first", STORAGES)
def test_evaluate_does_not_report_the_previous_models_intervals(data, models, first, second):
    _predict_full(data, models, first)
    before = stexp.tl.evaluate(data)
    assert {"coverage", "interval_width", "expected_pcc_spearman"} <= set(before.columns)
    stexp.tl.predict(data, models["bare", second])
    # the first model's scores went with it
    assert PredictionKeys(KEY).pcc not in data.var and KEY not in data.uns["stexp"].get("evaluate", {})
    after = stexp.tl.evaluate(data)
    assert not {"coverage", "interval_width", "unc_spot_spearman", "expected_pcc_spearman"} & set(after.columns)
    assert "coverage" not in data.uns["stexp"]["evaluate"][KEY]["per_slide"]


@pytest.mark.parametrize("second", STORAGES)
@pytest.mark.parametrize("first", STORAGES)
def test_other_keys_are_untouched(data, models, first, second):
    others = ("stexp_pred2", "other", "stexp_pred_knn")  # a prefix of KEY's names is not a companion
    for key in others:
        _predict_full(data, models, first, key=key)
        stexp.tl.evaluate(data, pred_key=key)
    _predict_full(data, models, first)
    before = data.copy()
    stexp.tl.predict(data, models["bare", second])
    for key in others:
        assert data.uns["stexp"][key] == before.uns["stexp"][key]
        assert key in data.uns["stexp"]["evaluate"]
        for name in PredictionKeys(key):
            assert _everywhere(data, name) == _everywhere(before, name) != []
            if name in data.var:
                np.testing.assert_array_equal(data.var[name].to_numpy(), before.var[name].to_numpy())
            elif name in data.obs:
                np.testing.assert_array_equal(data.obs[name].to_numpy(), before.obs[name].to_numpy())
            else:
                np.testing.assert_array_equal(get_prediction(data, name).to_numpy(), get_prediction(before, name))


@pytest.mark.parametrize("storage", STORAGES)
def test_clear_prediction_removes_the_set_in_both_storages(data, models, storage):
    _predict_full(data, models, storage)
    stexp.tl.evaluate(data)
    write_prediction_set(data, "x", list(data.var_names), np.zeros(data.shape))
    # a companion of the same key left in the other storage (by hand: write_prediction never does this)
    other = "layers" if storage == "obsm" else "obsm"
    genes = _genes(data, other)
    stale = np.zeros((data.n_obs, len(genes)), dtype=np.float32)
    if other == "layers":
        data.layers[f"{KEY}_std"] = stale
    else:
        data.obsm[f"{KEY}_std"] = pd.DataFrame(stale, index=data.obs_names, columns=genes)
    removed = clear_prediction(data, KEY)
    assert f"adata.{other}['{KEY}_std']" in removed and f"adata.{storage}['{KEY}_std']" in removed
    assert f"adata.uns['stexp'][{KEY!r}]" in removed and f"adata.uns['stexp']['evaluate'][{KEY!r}]" in removed
    for name in PredictionKeys(KEY):
        assert _everywhere(data, name) == [], name
    assert KEY not in data.uns["stexp"] and KEY not in data.uns["stexp"]["evaluate"]
    assert has_prediction(data, "x") and "X_random" in data.obsm
    assert clear_prediction(data, KEY) == []


def test_a_bad_set_leaves_the_previous_prediction_whole(data, models):
    _predict_full(data, models, "layers")
    before = {name: _everywhere(data, name) for name in PredictionKeys(KEY)}
    genes = list(data.var_names)
    mean = np.zeros((data.n_obs, len(genes)))
    with pytest.raises(ValueError, match="lo and hi go together"):
        write_prediction_set(data, KEY, genes, mean, lo=mean)
    with pytest.raises(ValueError, match="shape"):
        write_prediction_set(data, KEY, genes, mean, std=mean[:, :3])
    with pytest.raises(ValueError, match="shift"):
        write_prediction_set(data, KEY, genes, mean, shift=np.zeros(3))
    assert {name: _everywhere(data, name) for name in PredictionKeys(KEY)} == before
