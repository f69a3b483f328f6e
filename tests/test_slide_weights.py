"""``tl.fit(slide_weights=)``: a measured section of a new patient counts several times in the fit."""

from __future__ import annotations

import numpy as np
import pytest
from _features import stat_features

KEY = "X_test_stats"


@pytest.fixture
def data(synth):
    stat_features(synth, key=KEY)
    return synth


def _predict(model, adata, lib="slide_2"):
    import stexp

    test = adata[adata.obs["library_id"] == lib].copy()
    stexp.tl.predict(test, model)
    return test.layers["stexp_pred"]


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_weight_is_the_section_repeated(data):
    """A weight of 3 fits what three copies of the section's spots fit (the benchmark's definition), and differs
    from a weight of 1; the user's AnnData keeps its spots, the card says the weight and the real spot count."""
    import stexp

    train = data[data.obs["library_id"] != "slide_2"].copy()
    n_obs = train.n_obs
    kw = {"model": "knn", "calibrate": True, "smoothing": 0, "features_key": KEY}
    weighted = stexp.tl.fit(train, slide_weights={"slide_1": 3}, **kw)
    assert train.n_obs == n_obs

    libs = train.obs["library_id"].astype(str).to_numpy()
    rows = np.concatenate([np.arange(n_obs), *[np.flatnonzero(libs == "slide_1")] * 2])
    repeated = train[rows].copy()
    repeated.obs_names_make_unique()
    by_hand = stexp.tl.fit(repeated, **kw)
    plain = stexp.tl.fit(train, **kw)

    np.testing.assert_allclose(_predict(weighted, data), _predict(by_hand, data), atol=1e-5)
    assert np.abs(_predict(weighted, data) - _predict(plain, data)).max() > 1e-3
    libraries = weighted.card.training_data["libraries"]
    assert libraries["slide_1"] == {**libraries["slide_1"], "weight": 3, "spots": int((libs == "slide_1").sum())}
    assert "weight" not in libraries["slide_0"]
    assert stexp.tl.fit(train, slide_weights={"slide_1": 1}, **kw).card.training_data == plain.card.training_data


@pytest.mark.parametrize(
    ("weights", "error", "match"),
    [
        ({"slide_9": 2}, KeyError, "not a training slide"),
        ({"slide_2": 2}, ValueError, "validation slide"),
        ({"slide_1": 0}, ValueError, "positive integer"),
        ({"slide_1": 1.5}, ValueError, "positive integer"),
        ({"slide_1": True}, ValueError, "positive integer"),
        (["slide_1"], TypeError, "map library ids"),
    ],
)
def test_bad_weights_are_refused_before_any_work(data, weights, error, match):
    import stexp

    with pytest.raises(error, match=match):
        stexp.tl.fit(data, model="mean", features_key=KEY, validation="slide_2", slide_weights=weights)
