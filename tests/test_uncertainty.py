"""Calibrated uncertainty: conformal intervals with a stated coverage and per-gene expected PCC (issue 16)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from _features import stat_features

import stexp

NOISE_GENE = "noise_gene"


@pytest.fixture(scope="module")
def _uncertainty_data():
    """Four synthetic slides (four patients) plus a gene with no image signal (Poisson around a constant)."""
    import anndata as ad
    from scipy import sparse

    adata = stexp.datasets.synthetic(n_slides=4, n_spots=144, n_genes=40, seed=3)
    rng = np.random.default_rng(0)
    noise = rng.poisson(20.0, size=(adata.n_obs, 1))
    X = sparse.hstack([sparse.csr_matrix(adata.X), sparse.csr_matrix(noise)]).tocsr()
    var = pd.DataFrame(index=[*adata.var_names, NOISE_GENE])
    out = ad.AnnData(X=X, obs=adata.obs.copy(), var=var, obsm=dict(adata.obsm), uns=adata.uns)
    stat_features(out)
    return out


@pytest.fixture
def split(_uncertainty_data):
    adata = _uncertainty_data
    test_lib = adata.obs["library_id"].unique()[-1]
    is_test = (adata.obs["library_id"] == test_lib).to_numpy()
    return adata[~is_test].copy(), adata[is_test].copy()


@pytest.fixture(scope="module")
def _ridge(_uncertainty_data):
    adata = _uncertainty_data
    test_lib = adata.obs["library_id"].unique()[-1]
    train = adata[(adata.obs["library_id"] != test_lib).to_numpy()].copy()
    return stexp.tl.fit(train, model="ridge", features_key="X_test_stats", genes=list(adata.var_names))


def test_coverage_met_on_held_out_slide(split, _ridge):
    _, test = split
    stexp.tl.predict(test, _ridge, coverage=0.9)
    for key in ("stexp_pred_lo", "stexp_pred_hi"):
        assert test.layers[key].shape == test.shape
    lo, pred, hi = (test.layers[k] for k in ("stexp_pred_lo", "stexp_pred", "stexp_pred_hi"))
    assert np.all(lo <= pred) and np.all(pred <= hi)
    scores = stexp.tl.evaluate(test)
    row = scores.iloc[0]
    assert abs(row["coverage"] - 0.9) <= 0.07, row["coverage"]
    assert row["interval_width"] > 0
    assert np.isfinite(row["unc_spot_spearman"])
    assert "expected_pcc_spearman" in scores
    assert test.uns["stexp"]["stexp_pred"]["coverage"] == 0.9
    # a wider nominal coverage gives wider intervals
    wide = stexp.tl.predict(test, _ridge, coverage=0.99, copy=True)
    assert (wide.layers["stexp_pred_hi"] - wide.layers["stexp_pred_lo"]).mean() > row["interval_width"]


def test_intervals_widen_on_unlike_slides(split, _ridge):
    _, test = split
    shifted = test.copy()
    feats = np.asarray(shifted.obsm["X_test_stats"], dtype=np.float32)
    # a colour shift of the images: every colour statistic moves by several training standard deviations
    shifted.obsm["X_test_stats"] = feats + 4 * feats.std(axis=0)
    stexp.tl.predict(test, _ridge, coverage=0.9)
    stexp.tl.predict(shifted, _ridge, coverage=0.9)
    width = lambda a: float(np.mean(a.layers["stexp_pred_hi"] - a.layers["stexp_pred_lo"]))
    assert width(shifted) > 1.5 * width(test)


def test_gene_without_signal_expects_no_pcc(split, _ridge):
    _, test = split
    stexp.tl.predict(test, _ridge)
    expected = test.var["stexp_pred_expected_pcc"]
    assert abs(expected[NOISE_GENE]) < 0.15
    assert expected.drop(NOISE_GENE).max() > 0.5
    assert "stexp_pred_lo" not in test.layers  # no coverage asked: no interval


def test_calibration_saved_and_loaded(tmp_path, split, _ridge):
    _, test = split
    path = _ridge.save(tmp_path / "m")
    assert "calibration" in json.loads((path / "model.json").read_text())
    loaded = stexp.models.load(path)
    a = stexp.tl.predict(test, _ridge, coverage=0.8, copy=True)
    b = stexp.tl.predict(test, loaded, coverage=0.8, copy=True)
    for key in ("stexp_pred_lo", "stexp_pred_hi"):
        np.testing.assert_allclose(a.layers[key], b.layers[key], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.var["stexp_pred_expected_pcc"], b.var["stexp_pred_expected_pcc"], atol=1e-6)


def test_uncalibrated_model_refuses_coverage(tmp_path, split):
    train, test = split
    model = stexp.tl.fit(train, model="knn", features_key="X_test_stats", calibrate=False, k=5)
    with pytest.raises(ValueError, match=r"calibrate=True"):
        stexp.tl.predict(test, model, coverage=0.9)
    # a folder saved without calibration (as every older folder) loads and predicts as before
    loaded = stexp.models.load(model.save(tmp_path / "old"))
    assert loaded.calibration is None
    stexp.tl.predict(test, loaded)
    assert "stexp_pred_expected_pcc" not in test.var
    with pytest.raises(ValueError, match="coverage"):
        stexp.tl.predict(test, loaded, coverage=1.5)


@pytest.mark.parametrize("score", ["none", "neighbour_residual", "neighbour_spread", "spot_residual", "model_spread"])
def test_every_score_calibrates(split, score):
    train, test = split
    model = stexp.tl.fit(train, model="knn", features_key="X_test_stats", k=5, calibrate=True, calibration_score=score)
    stexp.tl.predict(test, model, coverage=0.9)
    cov = stexp.tl.evaluate(test)["coverage"].iloc[0]
    assert 0.75 <= cov <= 0.99
    assert model.calibration.score == score


def test_best_genes_and_width_panel(split, _ridge):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    _, test = split
    stexp.tl.predict(test, _ridge, coverage=0.9)
    from stexp.pl._spatial import best_genes

    best = best_genes(test, n=3)
    expected = test.var["stexp_pred_expected_pcc"]
    assert best == expected.sort_values(ascending=False).index[:3].tolist()
    fig = stexp.pl.spatial_genes(test, "best", n_best=2, interval_width=True, img=False, return_fig=True)
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert any("interval width" in t for t in titles)
    assert sum(t.startswith(best[0]) for t in titles) == 3  # measured, predicted, width
    plt.close(fig)


def _depth_spots(n_slides: int, n_spots: int, seed: int):
    """Spots whose sequencing depth varies 30-fold and is visible in one image feature (e.g. cell density)."""
    from stexp.models._data import SpotData
    from stexp.pp._target import log1p_cp10k

    profile = np.random.default_rng(99).dirichlet(np.ones(30)) * 0.5  # 30 genes, half of every spot's counts
    rng = np.random.default_rng(seed)
    n = n_slides * n_spots
    log_depth = rng.uniform(np.log(200), np.log(6000), n)
    counts = rng.poisson(np.exp(log_depth)[:, None] * profile[None, :])
    counts = np.c_[counts, rng.poisson(np.exp(log_depth) * 0.5)]  # every other gene, lumped
    depth = counts.sum(axis=1).astype(np.float64)
    features = np.c_[log_depth + rng.normal(0, 0.3, n), rng.normal(size=(n, 7))].astype(np.float32)
    library = np.repeat([f"s{i}" for i in range(n_slides)], n_spots).astype(object)
    xy = np.c_[np.tile(np.arange(n_spots) % 12, n_slides), np.tile(np.arange(n_spots) // 12, n_slides)] * 100.0
    return SpotData(
        features=features,
        library=library,
        array_rc=(xy[:, ::-1] / 100).astype(np.int64),
        coords_um=xy,
        target=log1p_cp10k(counts[:, :30], depth),
        patient=library.copy(),
        depth=depth,
    )


def test_depth_score_widens_intervals_where_counts_are_few():
    from stexp.models import get_model_class
    from stexp.models._calibration import calibrate
    from stexp.tl._evaluate import interval_scores

    train, test = _depth_spots(4, 144, seed=0), _depth_spots(1, 400, seed=1)
    genes = [f"g{i}" for i in range(30)]
    model = get_model_class("mean")(genes)
    model.fit(train)
    mean, _ = model.predict(test)
    truth = test.target.astype(np.float64)
    rows = {}
    for score in ("depth", "distance"):
        cal = calibrate(model, train, score=score, refit=lambda d: get_model_class("mean")(genes).fit(d))
        lo, hi = cal.intervals(mean, test.features, None, 0.9)
        rows[score] = interval_scores(truth, mean, lo, hi)
    depth = rows["depth"]
    assert abs(depth["coverage"] - 0.9) <= 0.05, depth
    # the error of a spot is its counting noise: the depth score ranks spots by it, the feature distance hardly
    assert depth["unc_spot_spearman"] > 0.5, rows
    assert depth["unc_spot_spearman"] > rows["distance"]["unc_spot_spearman"] + 0.2, rows
    assert depth["interval_width"] < rows["distance"]["interval_width"]


def test_depth_score_needs_counts():
    from stexp.models import get_model_class
    from stexp.models._calibration import calibrate

    train = _depth_spots(2, 50, seed=0)
    train.depth = None
    model = get_model_class("mean")([f"g{i}" for i in range(30)])
    model.fit(train)
    with pytest.raises(ValueError, match="total counts"):
        calibrate(model, train, score="depth", refit=lambda d: get_model_class("mean")(model.genes).fit(d))


def test_knn_with_more_neighbours_than_an_inner_fold_calibrates(split):
    train, test = split
    k = train.n_obs - 10  # more than any inner fold (which leaves out a slide) holds
    model = stexp.tl.fit(train, model="knn", features_key="X_test_stats", k=k)
    assert model.calibration is not None and model.hparams["k"] == k
    stexp.tl.predict(test, model, coverage=0.9)
    assert 0.75 <= stexp.tl.evaluate(test)["coverage"].iloc[0] <= 0.99
