"""``mclstexp_plus``: mclSTExp's training, image-to-image retrieval with a temperature chosen on training slides."""

import numpy as np
import pytest
from _features import STATS_KEY, mean_pcc, stat_features

import stexp
from stexp.models._mclstexp_plus import MclSTExpPlus
from stexp.models._retrieval import TEMPERATURE_GRID
from stexp.models._scaling import unit_rows
from stexp.pp._target import expression_target
from stexp.tl._inputs import spot_data

SMALL = {"projection_dim": 32, "n_heads": 2, "head_dim": 16, "batch_size": 128, "lr": 1e-3, "device": "cpu"}


@pytest.fixture(scope="module")
def split(_synthetic_cached):
    adata = _synthetic_cached.copy()
    stat_features(adata)
    is_test = (adata.obs["library_id"] == "slide_2").to_numpy()
    return adata[~is_test].copy(), adata[is_test].copy()


def _fit(adata, model="mclstexp_plus", **kwargs):
    return stexp.tl.fit(
        adata, model=model, features_key=STATS_KEY, **{**SMALL, "top_k": 50, "max_epochs": 30, **kwargs}
    )


@pytest.fixture(scope="module")
def fitted(split):
    stexp.settings.verbosity = 1
    return _fit(split[0])


@pytest.fixture(scope="module")
def paper(split):
    return _fit(split[0], model="mclstexp")


def test_trains_exactly_like_mclstexp(fitted, paper):
    assert fitted.history["train_loss"] == pytest.approx(paper.history["train_loss"])
    for (name, a), b in zip(fitted.network.state_dict().items(), paper.network.state_dict().values(), strict=True):
        assert np.allclose(a.numpy(), b.numpy()), name


def test_temperature_chosen_on_training_slides(fitted):
    info = fitted.history["retrieval"]
    assert info["inner_cv"].endswith("folds by patients") and info["temperature_grid"] == list(TEMPERATURE_GRID)
    assert fitted.temperature_ == TEMPERATURE_GRID[int(np.nanargmax(info["inner_pcc"]))]


def test_predicts_by_image_to_image_retrieval(split, fitted):
    _, test = split
    pred, spread = fitted.predict(spot_data(test, features_key=STATS_KEY, library_key="library_id"), smooth=False)
    # by hand: cosine top-k among the training spots' image embeddings, softmax(cos / T) weights
    train = split[0]
    q, bank = (
        unit_rows(fitted.embed_images(spot_data(a, features_key=STATS_KEY, library_key="library_id"))).astype(
            np.float64
        )
        for a in (test, train)
    )
    sim = q @ bank.T
    k, t = fitted.hparams["top_k"], fitted.temperature_
    top = np.argsort(-sim, axis=1)[:, :k]
    s = np.take_along_axis(sim, top, axis=1)
    w = np.ones_like(s) if t is None else np.exp((s - s.max(1, keepdims=True)) / t)
    w /= w.sum(1, keepdims=True)
    expected = np.einsum("qk,qkg->qg", w, expression_target(train, fitted.genes)[top])
    np.testing.assert_allclose(pred, expected, rtol=1e-4, atol=1e-4)
    assert (spread >= 0).all()
    assert mean_pcc(pred, expression_target(test, fitted.genes)) > 0.2


def test_fixed_temperature_and_bad_values(split):
    model = _fit(split[0], max_epochs=2, retrieval_temperature=None)
    assert model.temperature_ is None and "retrieval" not in model.history
    with pytest.raises(ValueError, match="retrieval_temperature"):
        _fit(split[0], max_epochs=2, retrieval_temperature=0)


def test_from_mclstexp_equals_fitting_plus(split, fitted, paper):
    train, test = (spot_data(a, features_key=STATS_KEY, library_key="library_id") for a in split)
    train.target = expression_target(split[0], paper.genes)
    before = paper.predict(test)[0]
    upgraded = MclSTExpPlus.from_mclstexp(paper, train)
    assert upgraded.is_fitted and upgraded.network is paper.network
    assert upgraded.temperature_ == fitted.temperature_
    np.testing.assert_allclose(upgraded.predict(test)[0], fitted.predict(test)[0], rtol=1e-5, atol=1e-6)
    # the mclstexp model still predicts as before (its own bank, untouched)
    np.testing.assert_array_equal(paper.predict(test)[0], before)
    other = train.subset(np.arange(train.n_spots) > 0)
    with pytest.raises(ValueError, match="not the data the mclstexp model was trained on"):
        MclSTExpPlus.from_mclstexp(paper, other)
    with pytest.raises(TypeError, match="fitted 'mclstexp' model"):
        MclSTExpPlus.from_mclstexp(fitted, train)
