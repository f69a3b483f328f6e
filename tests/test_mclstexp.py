import math

import numpy as np
import pytest
import torch
from _features import STATS_KEY, mean_pcc, stat_features

import stexp
from stexp.pp._target import expression_target

SMALL = {"projection_dim": 32, "n_heads": 2, "head_dim": 16, "batch_size": 128, "lr": 1e-3, "device": "cpu"}


def _split(adata, test_lib="slide_2"):
    is_test = (adata.obs["library_id"] == test_lib).to_numpy()
    return adata[~is_test].copy(), adata[is_test].copy()


def _fit(adata, **kwargs):
    return stexp.tl.fit(adata, model="mclstexp", features_key=STATS_KEY, **{**SMALL, "top_k": 50, **kwargs})


@pytest.fixture(scope="module")
def featured(_synthetic_cached):
    adata = _synthetic_cached.copy()
    stat_features(adata)
    return adata


@pytest.fixture(scope="module")
def fitted(featured):
    """mclSTExp fitted on slides 0 and 1 of the synthetic data."""
    stexp.settings.verbosity = 1
    train, _ = _split(featured)
    return _fit(train, max_epochs=30, seed=0)


# -- building blocks ------------------------------------------------------------------------------


def test_retrieve_weights_by_inverse_squared_distance():
    from stexp.models._mclstexp import retrieve

    bank = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=np.float32)
    expr = np.array([[1.0], [3.0], [10.0], [100.0]], dtype=np.float32)
    query = np.array([[1.5, 0.1]], dtype=np.float32)
    mean, std = retrieve(query, bank, expr, k=2, distance="l2")  # cosine top-2: the two spots on the x axis
    d2 = ((bank[:2] - query) ** 2).sum(1)
    w = (1 / d2) / (1 / d2).sum()
    expected = (w * expr[:2, 0]).sum()
    assert mean[0, 0] == pytest.approx(expected, rel=1e-5)
    assert std[0, 0] == pytest.approx(math.sqrt((w * (expr[:2, 0] - expected) ** 2).sum()), rel=1e-4)
    # chunks give the same answer as one pass
    q = np.random.default_rng(0).normal(size=(37, 2)).astype(np.float32)
    a, _ = retrieve(q, bank, expr, k=3, chunk_size=5)
    b, _ = retrieve(q, bank, expr, k=3, chunk_size=1000)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    with pytest.raises(ValueError, match="reference bank"):
        retrieve(query, bank, expr, k=5)


def test_position_tables_sized_to_the_data_and_unseen_coordinates_clipped(fitted, featured):
    train, _ = _split(featured)
    net = fitted.network
    margin = fitted.hparams["position_margin"]
    assert net.y_embed.num_embeddings == train.obs["array_row"].max() + 1 + margin
    assert net.x_embed.num_embeddings == train.obs["array_col"].max() + 1 + margin
    assert net.x_embed.weight.shape[1] == len(fitted.genes)
    expr = torch.zeros(3, len(fitted.genes))
    far = torch.tensor([[10_000, 10_000], [net.y_embed.num_embeddings - 1, net.x_embed.num_embeddings - 1], [0, 0]])
    with torch.no_grad():
        out = net.eval().embed_spots(expr, far)
    # a far coordinate is clipped to the last table row
    last = torch.tensor([[net.y_embed.num_embeddings - 1, net.x_embed.num_embeddings - 1]] * 3)
    with torch.no_grad():
        ref = net.embed_spots(expr, torch.cat([last[:2], far[2:]]))
    torch.testing.assert_close(out, ref)


def test_learns_from_images_beyond_a_shuffled_image_control(featured, fitted):
    train, test = _split(featured)
    truth = expression_target(test, fitted.genes)
    stexp.tl.predict(test, fitted)
    pred = stexp.tl.get_prediction(test, "stexp_pred", fitted.genes).to_numpy()
    real = mean_pcc(pred, truth)

    shuffled = train.copy()
    perm = np.random.default_rng(0).permutation(shuffled.n_obs)
    shuffled.obsm[STATS_KEY] = shuffled.obsm[STATS_KEY][perm]
    control = _fit(shuffled, max_epochs=30, seed=0)
    stexp.tl.predict(test, control, key_added="control")
    ctrl = mean_pcc(stexp.tl.get_prediction(test, "control", fitted.genes).to_numpy(), truth)
    assert real > 0.2
    assert real > ctrl + 0.15, (real, ctrl)
    # the loss went below chance on real features
    assert fitted.history["train_loss"][-1] < 0.98 * fitted.history["chance_loss"]
    assert fitted.history["chance_loss"] == pytest.approx(math.log(128))


def test_prediction_layers_and_spread(featured, fitted):
    _, test = _split(featured)
    stexp.tl.predict(test, fitted)
    pred = stexp.tl.get_prediction(test, "stexp_pred").to_numpy()
    std = stexp.tl.get_prediction(test, "stexp_pred_std").to_numpy()
    assert pred.dtype == np.float32 and pred.shape == (test.n_obs, len(fitted.genes))
    assert np.isfinite(pred).all() and (std >= 0).all()
    # the prediction is a weighted average of training expression: within its per-gene range
    bank = fitted.bank_expression
    assert (pred >= bank.min(0) - 1e-5).all() and (pred <= bank.max(0) + 1e-5).all()
    assert std.mean() > 0
    assert test.uns["stexp"]["stexp_pred"]["model"] == "mclstexp"


def test_prediction_ignores_measured_expression(featured, fitted):
    _, test = _split(featured)
    stexp.tl.predict(test, fitted)
    before = stexp.tl.get_prediction(test).to_numpy()
    test.X = np.ones(test.shape, dtype=np.float32)  # every count replaced
    stexp.tl.predict(test, fitted)
    np.testing.assert_array_equal(before, stexp.tl.get_prediction(test).to_numpy())


def test_chance_warning_when_loss_does_not_drop(featured, caplog):
    train, _ = _split(featured)
    train.obsm[STATS_KEY] = np.zeros_like(train.obsm[STATS_KEY])  # nothing to align
    with caplog.at_level("WARNING", logger="stexp"):
        model = _fit(train, max_epochs=2, standardize_features=False)
    assert model.history["train_loss"][-1] >= 0.98 * model.history["chance_loss"]
    assert any("chance" in r.getMessage() for r in caplog.records)


def test_validation_loss_and_early_stopping(featured):
    model = _fit(featured, max_epochs=6, validation="slide_2", early_stopping_patience=1, lr=1e-1)
    assert len(model.history["val_loss"]) == len(model.history["train_loss"]) >= 1
    assert all(np.isfinite(model.history["val_loss"]))
    # the bank holds only the training slides
    assert model.bank_embeddings.shape == (2 * 144, SMALL["projection_dim"])


def test_top_k_larger_than_bank(featured, fitted, tmp_path):
    train, test = _split(featured)
    # a fit retrieves at most every training spot (the clamp every fit shares)
    assert _fit(train, max_epochs=1, top_k=1000).hparams["top_k"] == train.n_obs
    fitted.save(tmp_path / "m")
    loaded = stexp.models.load(tmp_path / "m")
    loaded.hparams["top_k"] = 10_000
    with pytest.raises(ValueError, match="reference bank"):
        stexp.tl.predict(test, loaded)


def test_bad_hparams():
    with pytest.raises(ValueError, match="n_heads"):
        stexp.models.get_model_class("mclstexp")(["a"], n_heads=0)
    with pytest.raises(TypeError, match="unknown hyper-parameter"):
        stexp.models.get_model_class("mclstexp")(["a"], heads=8)


def test_paper_defaults():
    hp = stexp.models.get_model_class("mclstexp").default_hparams
    expected = {
        "projection_dim": 256,
        "n_layers": 2,
        "n_heads": 8,
        "head_dim": 64,
        "temperature": 1.0,
        "lr": 1e-4,
        "weight_decay": 1e-3,
        "batch_size": 128,
        "max_epochs": 90,
        "top_k": 200,
        "dropout": 0.0,
        "attn_dropout": 0.0,
        "finetune_encoder": False,
    }
    assert {k: hp[k] for k in expected} == expected


def test_retrieval_weights_use_the_l1_distance_as_the_official_evaluation():
    from stexp.models._mclstexp import retrieve

    # two bank spots at the same Euclidean distance from the query but different L1 distances
    bank = np.array([[1.0, 0.0], [1.6, 1.8]], dtype=np.float32)
    query = np.array([[1.0, 1.0]], dtype=np.float32)
    expr = np.array([[0.0], [1.0]], dtype=np.float32)
    l1 = np.abs(bank - query).sum(1)
    w = (1 / l1**2) / (1 / l1**2).sum()
    mean, _ = retrieve(query, bank, expr, k=2)
    assert mean[0, 0] == pytest.approx(w[1], rel=1e-5)
    mean_l2, _ = retrieve(query, bank, expr, k=2, distance="l2")
    assert mean_l2[0, 0] == pytest.approx(0.5, rel=1e-5)  # equal Euclidean distances: equal weights
    with pytest.raises(ValueError, match="distance"):
        retrieve(query, bank, expr, k=2, distance="cos")
