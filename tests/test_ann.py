"""Approximate retrieval (faiss IVF) and the bounded, slide-stratified inner queries."""

from __future__ import annotations

import numpy as np
import pytest
from _features import clustered_unit_rows

import stexp
from stexp.models import _ann
from stexp.models._data import SpotData, inner_query_sample
from stexp.models._retrieval import choose_temperature, euclidean_neighbours, weighted_retrieval


def _exact_top(q: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ bank.T), axis=1)[:, :k]


def _spots(n_slides: int = 3, per_slide: int = 400, seed: int = 0) -> SpotData:
    rng = np.random.default_rng(seed)
    n = n_slides * per_slide
    side = int(np.ceil(np.sqrt(per_slide)))
    r, c = np.divmod(np.arange(per_slide), side)
    coords = np.tile(np.column_stack([c * 100.0, r * 100.0]), (n_slides, 1))
    return SpotData(
        features=rng.normal(size=(n, 8)).astype(np.float32),
        library=np.repeat([f"s{i}" for i in range(n_slides)], per_slide).astype(object),
        array_rc=np.tile(np.column_stack([r, c]), (n_slides, 1)),
        coords_um=coords,
        target=rng.normal(size=(n, 5)).astype(np.float32),
    )


def test_index_recall_and_saved_rebuild(faiss):
    bank, query = clustered_unit_rows(3000), clustered_unit_rows(200, seed=1)
    index = _ann.AnnIndex(bank, k=20, seed=0)
    idx, sim = index.search(query, 20)
    assert _ann.recall_at_k(idx, _exact_top(query, bank, 20)) >= 0.95
    assert index.info["recall_at_k"] >= _ann.TARGET_RECALL or index.nprobe == index.nlist
    # similarities are exact for the rows found
    np.testing.assert_allclose(sim, np.einsum("qd,qkd->qk", query, bank[idx]), rtol=1e-5, atol=1e-5)
    again = _ann.AnnIndex.from_state(bank, index.state())
    idx2, sim2 = again.search(query, 20)
    np.testing.assert_array_equal(idx2, idx)
    np.testing.assert_array_equal(sim2, sim)
    with pytest.raises(ValueError, match="inconsistent"):
        _ann.AnnIndex.from_state(bank[:-1], index.state())


def test_retrieval_through_an_index_matches_exact(faiss):
    bank, query = clustered_unit_rows(2000), clustered_unit_rows(300, seed=2)
    target = np.random.default_rng(0).normal(size=(2000, 7)).astype(np.float32)
    index = _ann.AnnIndex(bank, k=30)
    exact, _ = weighted_retrieval(query, bank, target, k=30, temperature=0.1, chunk=64)
    approx, _ = weighted_retrieval(query, bank, target, k=30, temperature=0.1, chunk=64, index=index)
    assert np.corrcoef(exact.ravel(), approx.ravel())[0, 1] > 0.98


def test_euclidean_neighbours_above_the_threshold(faiss, monkeypatch):
    bank, query = clustered_unit_rows(1500, d=16) * 3, clustered_unit_rows(100, d=16, seed=3) * 3
    exact_idx, exact_d = euclidean_neighbours(query, bank, 10, search="exact")
    monkeypatch.setattr(_ann, "ANN_MIN_BANK", 1000)
    idx, dist = euclidean_neighbours(query, bank, 10)
    assert _ann.recall_at_k(idx, exact_idx) >= 0.95
    np.testing.assert_allclose(dist, np.linalg.norm(query[:, None] - bank[idx], axis=2), rtol=1e-4, atol=1e-4)
    assert dist.mean() <= exact_d.mean() * 1.02


def test_without_faiss_search_is_exact_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(_ann, "faiss_available", lambda: False)
    monkeypatch.setattr(_ann, "_warned_missing", False)
    assert not _ann.use_ann(10, "auto")
    stexp.settings.verbosity = 3
    assert not _ann.use_ann(_ann.ANN_MIN_BANK, "auto")
    assert "faiss is not installed" in caplog.text
    with pytest.raises(ImportError, match="stexp\\[scale\\]"):
        _ann.use_ann(10, "approximate")
    with pytest.raises(ValueError, match="search must be"):
        _ann.use_ann(10, "fast")


def test_knn_model_with_an_index_saves_and_reloads_it(faiss, synth, tmp_path):
    from _features import stat_features

    key = stat_features(synth)
    exact = stexp.tl.fit(synth, features_key=key, model="knn", k=20, search="exact")
    model = stexp.tl.fit(synth, features_key=key, model="knn", k=20, search="approximate")
    assert exact.index_ is None and model.history["ann"]["recall_at_k"] > 0.9
    loaded = stexp.models.load(model.save(tmp_path / "m"))
    assert loaded.index_ is not None and loaded.index_.nprobe == model.index_.nprobe
    a, b, c = synth.copy(), synth.copy(), synth.copy()
    stexp.tl.predict(a, model)
    stexp.tl.predict(b, loaded)
    stexp.tl.predict(c, exact)
    np.testing.assert_array_equal(a.layers["stexp_pred"], b.layers["stexp_pred"])
    assert np.corrcoef(a.layers["stexp_pred"].ravel(), c.layers["stexp_pred"].ravel())[0, 1] > 0.98


def test_inner_query_sample_is_bounded_stratified_and_contiguous():
    data = _spots(n_slides=3, per_slide=400)
    rows = np.arange(data.n_spots)
    np.testing.assert_array_equal(inner_query_sample(data, rows, None), rows)
    np.testing.assert_array_equal(inner_query_sample(data, rows[::-1], 5000), rows)
    sample = inner_query_sample(data, rows, 300, seed=1)
    assert sample.size == 300 and np.all(np.diff(sample) > 0)
    per_slide = {lib: int((data.library[sample] == lib).sum()) for lib in data.libraries}
    assert per_slide == {"s0": 100, "s1": 100, "s2": 100}
    # a window: the spots of a slide's share lie within a disc around one spot
    xy = data.coords_um[sample[data.library[sample] == "s0"]]
    assert np.ptp(xy, axis=0).max() < 0.6 * np.ptp(data.coords_um, axis=0).max()
    np.testing.assert_array_equal(sample, inner_query_sample(data, rows, 300, seed=1))
    with pytest.raises(ValueError, match="max_rows"):
        inner_query_sample(data, rows, 0)


def test_temperature_scores_a_bounded_sample():
    data = _spots(n_slides=3, per_slide=300)
    unit = data.features / np.linalg.norm(data.features, axis=1, keepdims=True)
    t_all, info_all = choose_temperature(unit, data, k=10, max_queries=None)
    _, info_big = choose_temperature(unit, data, k=10, max_queries=10_000)
    _, info = choose_temperature(unit, data, k=10, max_queries=150)
    assert info_all["n_queries"] == info_big["n_queries"] == data.n_spots
    assert info_big["inner_pcc"] == info_all["inner_pcc"]  # under the bound: today's choice exactly
    assert info["n_queries"] <= 150 and info["temperature"] in info["temperature_grid"]


def test_calibration_on_a_bounded_sample(synth):
    from _features import stat_features

    from stexp.models._calibration import calibrate, out_of_fold
    from stexp.tl._inputs import spot_data

    key = stat_features(synth)
    model = stexp.tl.fit(synth, features_key=key, model="knn", k=20, calibrate=False)
    data = spot_data(synth, features_key=key, library_key="library_id", genes=model.genes)

    def refit(d):
        return stexp.models.Recipe("knn", {"k": 20}).model_class(model.genes, features_key=key, k=20).fit(d)

    oof = out_of_fold(model, data, 3, refit, max_queries=90)
    assert oof["rows"].size <= 90 and oof["mean"].shape == (oof["rows"].size, len(model.genes))
    assert np.isfinite(oof["mean"]).all() and oof["fold"].shape == (data.n_spots,)  # only the predicted spots held
    cal = calibrate(model, data, oof=oof)
    assert cal.n_calibration == oof["rows"].size and cal.info["n_training_spots"] == data.n_spots


@pytest.mark.parametrize("k", [1, 5, 40])
def test_running_top_k_keeps_the_best_of_offers_of_any_size(k):
    """Offers with fewer rows than k, and with more than the 3k buffer at once, leave each query its exact top-k."""
    rng = np.random.default_rng(k)
    n_queries, n_rows = 30, 2_000
    scores = rng.normal(size=(n_queries, n_rows)).astype(np.float32)
    offered = np.zeros_like(scores, dtype=bool)
    best = _ann._RunningTopK(n_queries, k)
    start = 0
    for size in [3, k, 7 * k + 11, 1, 2 * k, n_rows]:
        stop = min(n_rows, start + size)
        if stop <= start:
            break
        queries = np.sort(rng.choice(n_queries, int(rng.integers(1, n_queries + 1)), replace=False))
        best.add(queries, np.arange(start, stop), scores[queries, start:stop])
        offered[queries, start:stop] = True
        start = stop
    positions, kept = best.result()
    assert positions.shape == kept.shape == (n_queries, k)
    for i in range(n_queries):
        seen = np.flatnonzero(offered[i])
        expected = seen[np.argsort(-scores[i, seen])[:k]]
        finite = np.isfinite(kept[i])
        assert sorted(positions[i][finite].tolist()) == sorted(expected.tolist())
        np.testing.assert_array_equal(kept[i][finite], scores[i, positions[i][finite]])


def test_running_top_k_matches_a_sort_of_all_offers():
    rng = np.random.default_rng(0)
    n_queries, k = 12, 10
    offered: list[list[tuple[float, int]]] = [[] for _ in range(n_queries)]
    best = _ann._RunningTopK(n_queries, k)
    position = 0
    for _ in range(40):
        size = int(rng.integers(1, 60))
        queries = np.sort(rng.choice(n_queries, int(rng.integers(1, n_queries + 1)), replace=False))
        sim = rng.normal(size=(queries.size, size)).astype(np.float32)
        rows = np.arange(position, position + size)
        position += size
        best.add(queries, rows, sim)
        for j, q in enumerate(queries):
            offered[q].extend(zip(sim[j].tolist(), rows.tolist(), strict=True))
    positions, kept = best.result()
    for q in range(n_queries):
        expected = sorted(offered[q], reverse=True)[:k]
        assert sorted(positions[q][np.isfinite(kept[q])].tolist()) == sorted(r for _, r in expected)
        if len(expected) < k:  # fewer offers than k: the rest stay -inf
            assert np.isneginf(kept[q]).sum() == k - len(expected)
