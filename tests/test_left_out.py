"""Inner folds without refits or copies: searches that exclude bank rows, kNN's left-out predictions, and the
blocked arithmetic that keeps a million-spot fit within bounded memory."""

from __future__ import annotations

import numpy as np
import pytest
from _features import clustered_unit_rows

import stexp
from stexp.models import _ann, _scaling, _shift
from stexp.models._calibration import ridge_loo
from stexp.models._data import SpotData
from stexp.models._recipe import Recipe, fit_recipe, inner_predictor
from stexp.models._retrieval import _weighted_moments, outside, retrieval_by_temperature, weighted_retrieval


def _slides(n_slides: int = 4, per_slide: int = 150, n_genes: int = 6, seed: int = 0) -> SpotData:
    rng = np.random.default_rng(seed)
    n = n_slides * per_slide
    side = int(np.ceil(np.sqrt(per_slide)))
    r, c = np.divmod(np.arange(per_slide), side)
    features = rng.normal(size=(n, 12)).astype(np.float32)
    target = (features[:, :n_genes] + rng.normal(0, 0.5, (n, n_genes))).astype(np.float32)
    return SpotData(
        features=features,
        library=np.repeat([f"s{i}" for i in range(n_slides)], per_slide).astype(object),
        array_rc=np.tile(np.column_stack([r, c]), (n_slides, 1)),
        coords_um=np.tile(np.column_stack([c * 100.0, r * 100.0]), (n_slides, 1)),
        target=target,
        patient=np.repeat([f"p{i}" for i in range(n_slides)], per_slide).astype(object),
        depth=rng.integers(200, 2000, n).astype(np.float64),
    )


def test_exact_search_with_excluded_rows_is_search_of_the_rest():
    bank, query = clustered_unit_rows(400), clustered_unit_rows(30, seed=1)
    target = np.random.default_rng(2).normal(size=(400, 5)).astype(np.float32)
    keep = np.arange(400) % 3 != 0
    a = weighted_retrieval(query, bank, target, k=25, temperature=0.1, chunk=7, exclude=~keep)
    b = weighted_retrieval(query, bank[keep], target[keep], k=25, temperature=0.1, chunk=7)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    by_t = retrieval_by_temperature(bank, target, query, k=25, search="exact", exclude=~keep)
    np.testing.assert_allclose(by_t[0.1], a[0], rtol=1e-5, atol=1e-6)
    # k larger than the rows left: every row left is retrieved
    few = outside(np.arange(10), 400)
    np.testing.assert_allclose(
        weighted_retrieval(query, bank, target, k=50, temperature=None, chunk=8, exclude=few)[0],
        np.broadcast_to(target[:10].mean(axis=0), (30, 5)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_weighted_moments_are_the_weighted_mean_and_std():
    rng = np.random.default_rng(0)
    w = rng.random((9, 11)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    x = rng.normal(3.0, 0.01, (9, 11, 4)).astype(np.float32)  # small spread on a large mean: no cancellation
    m = np.einsum("qk,qkg->qg", w.astype(np.float64), x.astype(np.float64))
    sd = np.sqrt(np.einsum("qk,qkg->qg", w.astype(np.float64), (x - m[:, None, :]) ** 2))
    got_m, got_sd = _weighted_moments(w, x.copy())
    np.testing.assert_allclose(got_m, m, rtol=1e-5)
    np.testing.assert_allclose(got_sd, sd, rtol=1e-3)


def test_index_searches_the_bank_without_copying_it_and_honours_exclusion(faiss):
    bank, query = clustered_unit_rows(3000), clustered_unit_rows(200, seed=1)
    index = _ann.AnnIndex(bank, k=20, seed=0)
    assert np.shares_memory(index._bank, bank)  # no second copy of the bank
    group = np.arange(3000) % 4
    exclude = group == 1
    idx, sim = index.search(query, 20, exclude=exclude)
    assert not exclude[idx].any()
    exact = _ann._exact(query, bank, 20, "ip", exclude)
    assert _ann.recall_at_k(idx, exact) >= 0.95
    np.testing.assert_allclose(sim, np.einsum("qd,qkd->qk", query, bank[idx]), rtol=1e-5, atol=1e-5)
    (choice,) = index.info["nprobe_excluding"]
    assert choice["excluded"] == int(exclude.sum()) and choice["recall_at_k"] >= _ann.TARGET_RECALL
    index.search(query, 20, exclude=exclude)  # the same mask: its nprobe is remembered, not chosen again
    assert len(index.info["nprobe_excluding"]) == 1
    with pytest.raises(ValueError, match="every bank row is excluded"):
        index.search(query, 5, exclude=np.ones(3000, dtype=bool))
    with pytest.raises(ValueError, match="mask of the 3000 bank rows"):
        index.search(query, 5, exclude=np.zeros(10, dtype=bool))


def test_index_exclusion_of_whole_cells_still_returns_k_rows(faiss):
    bank, query = clustered_unit_rows(2000), clustered_unit_rows(50, seed=3)
    index = _ann.AnnIndex(bank, k=10, seed=0, nlist=40)
    exclude = index._assign < 30  # 30 of 40 cells emptied: probes must widen for many queries
    idx, sim = index.search(query, 10, exclude=exclude)
    assert not exclude[idx].any() and np.isfinite(sim).all()


def test_knn_left_out_prediction_is_the_refit_without_the_fold():
    data = _slides()
    recipe = Recipe("knn", {"k": 30, "temperature": 0.2, "standardize": False}, calibrate=False)
    model = fit_recipe(recipe, data, genes=[f"g{i}" for i in range(6)])
    predict_held = inner_predictor(model, recipe, data, seed=0)
    fit_idx, held_idx = np.arange(300, 600), np.arange(0, 300, 2)
    refit = fit_recipe(recipe, data.subset(fit_idx), genes=model.genes, inner=True)
    expected = refit.predict(data.subset(held_idx), smooth=False)
    for got, want in zip(predict_held(fit_idx, held_idx), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_inner_predictions_refit_models_that_cannot_leave_rows_out(monkeypatch):
    data = _slides()
    recipe = Recipe("ridge", calibrate=False)
    model = fit_recipe(recipe, data, genes=[f"g{i}" for i in range(6)])
    assert model.left_out_predictor(data) is None
    knn = fit_recipe(Recipe("knn", {"k": 20}, calibrate=False), data, genes=model.genes)
    assert knn.left_out_predictor(data) is not None
    assert knn.left_out_predictor(data.subset(np.arange(100))) is None  # not the spots it banked
    calls = []
    monkeypatch.setattr("stexp.models._recipe.fit_recipe", lambda *a, **kw: calls.append(1) or fit_recipe(*a, **kw))
    inner_predictor(model, recipe, data, seed=0)(np.arange(300, 600), np.arange(0, 300))
    inner_predictor(knn, knn.recipe, data, seed=0)(np.arange(300, 600), np.arange(0, 300))
    assert len(calls) == 1  # the ridge was refitted, the kNN was not


def test_default_fit_makes_no_inner_refit(synth, monkeypatch):
    from _features import stat_features

    import stexp.models._recipe as recipe_module

    key = stat_features(synth)
    inner_fits = []
    original = recipe_module.fit_recipe
    monkeypatch.setattr(
        recipe_module, "fit_recipe", lambda *a, **kw: (inner_fits.append(kw.get("inner")), original(*a, **kw))[1]
    )
    model = stexp.tl.fit(synth, features_key=key)
    assert model.calibration is not None and model.smoothing["option"] == "auto"
    assert not any(inner_fits)  # σ and calibration came from left-out searches of the fitted bank


def test_ridge_loo_matches_sklearn():
    from sklearn.linear_model import RidgeCV

    rng = np.random.default_rng(0)
    alphas = (0.1, 1.0, 10.0, 100.0, 1000.0)
    for n, p in ((300, 40), (60, 150)):  # more spots than features, and fewer
        X = rng.normal(size=(n, p))
        y = X[:, :5].sum(axis=1) + rng.normal(size=n)
        fitted = RidgeCV(alphas=alphas).fit(X, y)
        coef, intercept = ridge_loo(X, y, alphas)
        np.testing.assert_allclose(coef, fitted.coef_, atol=1e-9)
        assert intercept == pytest.approx(fitted.intercept_, abs=1e-9)


def test_blocked_feature_scaling_and_shift_reference_match_in_memory(monkeypatch):
    data = _slides()
    mean, scale = _scaling.feature_scaling(data.features)
    ref = _shift.fit_shift_reference(data)
    monkeypatch.setattr(_scaling, "SCALING_BLOCK", 64)
    monkeypatch.setattr(_shift, "EMBED_BLOCK", 50)
    blocked_mean, blocked_scale = _scaling.feature_scaling(data.features)
    np.testing.assert_allclose(blocked_mean, mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blocked_scale, scale, rtol=1e-5)
    blocked = _shift.fit_shift_reference(data)
    assert blocked.slide_scores == pytest.approx(ref.slide_scores, rel=1e-4)
    np.testing.assert_allclose(blocked.spot_scores(data.features), ref.spot_scores(data.features), rtol=1e-4)
