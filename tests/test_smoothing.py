"""Spatial smoothing of predictions: helps a noisy prediction of a smooth truth, stays off without spatial structure."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _features import stat_features

from stexp._metrics import mean_gene_pearson
from stexp.models import SpotData, load
from stexp.models._smoothing import choose_smoothing, smooth, smoothing_matrix


def _grid(n_slides: int = 3, side: int = 16, pitch: float = 100.0):
    yy, xx = np.mgrid[0:side, 0:side]
    coords = np.column_stack([xx.ravel(), yy.ravel()]).astype(float) * pitch
    return np.tile(coords, (n_slides, 1)), np.repeat([f"s{i}" for i in range(n_slides)], side * side)


def _smooth_truth(coords, library, n_genes=20, seed=0):
    rng = np.random.default_rng(seed)
    freq = rng.uniform(0.002, 0.006, size=(n_genes, 2))
    phase = rng.uniform(0, 2 * np.pi, size=(len(np.unique(library)), n_genes))
    lib_code = np.unique(library, return_inverse=True)[1]
    return np.sin(coords @ freq.T + phase[lib_code])


def test_smoothing_matrix_rows_sum_to_one_and_stay_in_slide():
    coords, library = _grid(n_slides=2, side=5)
    W = smoothing_matrix(coords, library, 150.0)
    np.testing.assert_allclose(np.asarray(W.sum(axis=1)).ravel(), 1.0)
    dense = W.toarray()
    n = len(library) // 2
    assert np.all(dense[:n, n:] == 0) and np.all(dense[n:, :n] == 0)
    assert np.allclose(smoothing_matrix(coords, library, 0.0).toarray(), np.eye(len(library)))
    with pytest.raises(ValueError, match="sigma_um"):
        smoothing_matrix(coords, library, -1.0)


def test_auto_smoothing_helps_noisy_prediction_of_smooth_truth():
    coords, library = _grid()
    truth = _smooth_truth(coords, library)
    noise = np.random.default_rng(1).normal(scale=1.5, size=truth.shape)
    noisy = truth + noise

    result = choose_smoothing(lambda tr, va: noisy[va], _spot_data(coords, library, noisy, truth))
    assert result["sigma_um"] > 0
    assert result["inner_cv"] == "3 folds by slides"
    before = mean_gene_pearson(noisy, truth, library)
    after = mean_gene_pearson(smooth(noisy, coords, library, result["sigma_um"]), truth, library)
    assert after > before + 0.1


def test_auto_smoothing_stays_off_without_spatial_structure():
    coords, library = _grid()
    rng = np.random.default_rng(2)
    truth = rng.normal(size=(len(library), 20))  # no spatial structure
    pred = truth + rng.normal(scale=1.0, size=truth.shape)
    result = choose_smoothing(lambda tr, va: pred[va], _spot_data(coords, library, pred, truth))
    assert result["sigma_um"] <= 0.25 * result["pitch_um"] + 1e-9
    # one training slide: spatial blocks of it are the inner folds
    one = library == "s0"
    single = choose_smoothing(
        lambda tr, va: pred[one][va], _spot_data(coords[one], library[one], pred[one], truth[one])
    )
    assert "spatial blocks" in single["inner_cv"] and single["sigma_um"] <= 0.25 * single["pitch_um"] + 1e-9


def _spot_data(coords, library, features, target):
    n = len(library)
    return SpotData(
        features=features.astype(np.float32),
        library=library,
        array_rc=np.zeros((n, 2), dtype=np.int64),
        coords_um=coords,
        target=None if target is None else target.astype(np.float32),
    )


def test_model_smoothing_is_fitted_saved_and_loaded(tmp_path):

    coords, library = _grid()
    truth = _smooth_truth(coords, library, n_genes=8)
    rng = np.random.default_rng(3)
    features = np.column_stack([truth + rng.normal(scale=1.5, size=truth.shape), rng.normal(size=(len(library), 4))])
    genes = [f"g{i}" for i in range(truth.shape[1])]
    data = _spot_data(coords, library, features, truth)
    from stexp.models import Recipe
    from stexp.models._recipe import fit_recipe

    plain = fit_recipe(Recipe("ridge", {"n_components": 8}), data, genes=genes)
    smoothed = fit_recipe(Recipe("ridge", {"n_components": 8}, smoothing="auto"), data, genes=genes)
    assert plain.smoothing == {"option": None, "sigma_um": 0.0}
    assert smoothed.smoothing["option"] == "auto" and smoothed.smoothing["sigma_um"] > 0
    assert "smoothing" not in smoothed.hparams

    query = _spot_data(coords, library, features, None)
    raw = smoothed.predict(query, smooth=False)[0]
    np.testing.assert_allclose(raw, plain.predict(query)[0], atol=1e-5)
    pred = smoothed.predict(query)[0]
    assert mean_gene_pearson(pred, truth, library) > mean_gene_pearson(raw, truth, library)

    smoothed.save(tmp_path / "m")
    again = load(tmp_path / "m")
    assert again.smoothing["sigma_um"] == pytest.approx(smoothed.smoothing["sigma_um"])
    np.testing.assert_allclose(again.predict(query)[0], pred, atol=1e-5)

    # a folder written before smoothing existed (no "smoothing" in model.json) loads without smoothing
    plain.save(tmp_path / "old")
    cfg_path = tmp_path / "old" / "model.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("smoothing")
    cfg.pop("content_sha256")  # such folders were of format 1: model.json not checksummed
    cfg["format_version"] = 1
    cfg_path.write_text(json.dumps(cfg))
    old = load(tmp_path / "old")
    assert old.smoothing["sigma_um"] == 0.0


def test_fixed_smoothing_and_bad_values():
    from stexp.models import Recipe

    assert Recipe("mean", smoothing=120).smoothing == 120.0
    for bad in (-1.0, "strong", True, float("nan")):
        with pytest.raises(ValueError, match="smoothing"):
            Recipe("mean", smoothing=bad)


def test_fit_without_options_is_the_default_pipeline(synth):
    import stexp
    from stexp.models import DEFAULT_RECIPE

    key = stat_features(synth)
    model = stexp.tl.fit(synth, features_key=key, validation="slide_2")
    assert model.name == DEFAULT_RECIPE.model and model.recipe == DEFAULT_RECIPE.with_training_options(
        seed=stexp.settings.seed
    )
    assert model.smoothing["option"] == DEFAULT_RECIPE.smoothing
    if DEFAULT_RECIPE.smoothing == "auto":
        assert model.smoothing["inner_cv"] == "the validation slides"
    # a training set smaller than the default k: every spot is a neighbour, the smoothing is kept
    small = synth[synth.obs["library_id"].isin(["slide_0", "slide_1"]).to_numpy()][:150].copy()
    few = stexp.tl.fit(small, features_key=key)
    if "k" in DEFAULT_RECIPE.hparams:
        assert few.hparams["k"] == min(DEFAULT_RECIPE.hparams["k"], small.n_obs)
    assert few.smoothing["option"] == DEFAULT_RECIPE.smoothing and few.calibration is not None
    # an explicit model has no smoothing unless asked for
    assert stexp.tl.fit(synth, model="ridge", features_key=key).smoothing["option"] is None
    ridge = stexp.tl.fit(synth, model="ridge", features_key=key, smoothing=80.0)
    assert ridge.smoothing == {"option": 80.0, "sigma_um": 80.0}
    stexp.tl.predict(synth, ridge)
    assert np.isfinite(synth.layers["stexp_pred"]).all()


def test_every_fit_uses_no_more_neighbours_than_it_has_spots():
    from stexp.models import Recipe, get_model_class
    from stexp.models._recipe import build_model

    for name, key in (("knn", "k"), ("ridge_knn", "k"), ("mclstexp", "top_k")):
        assert key in get_model_class(name).bank_size_hparams
        recipe = Recipe(name, {key: 200})
        assert build_model(recipe, ["a", "b"], n_train=141).hparams[key] == 141
        assert build_model(recipe, ["a", "b"], n_train=500).hparams[key] == 200
        with pytest.raises(ValueError, match="no training spots"):
            build_model(recipe, ["a", "b"], n_train=0)
