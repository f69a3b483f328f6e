import math

import numpy as np
import pytest
import torch
from _features import mean_pcc

import stexp
from stexp._layout import library_ids
from stexp.tl._inputs import spot_data

FEATURES = "X_test_patch"
SMALL = {"dim": 32, "n_heads": 4, "batch_size": 64, "lr": 1e-3, "device": "cpu"}


def _patch_features(adata, key: str = FEATURES, half_px: int = 12) -> str:
    """Cheap image features: colour and texture statistics of a square patch around each spot."""
    feats = np.zeros((adata.n_obs, 12), dtype=np.float32)
    for lib in library_ids(adata):
        m = (adata.obs["library_id"] == lib).to_numpy()
        img = adata.uns["spatial"][lib]["images"]["hires"].astype(np.float32) / 255
        rows = []
        for x, y in np.round(adata.obsm["spatial"][m]).astype(int):
            p = img[y - half_px : y + half_px, x - half_px : x + half_px].reshape(-1, 3)
            grey = p.mean(1)
            extra = [(grey < 0.5).mean(), grey.std(), (p[:, 2] - p[:, 1]).mean()]
            rows.append(np.concatenate([p.mean(0), p.std(0), np.percentile(p, 10, axis=0), extra]))
        feats[m] = np.asarray(rows)
    adata.obsm[key] = feats
    return key


def _split(adata, test_lib="slide_2"):
    is_test = (adata.obs["library_id"] == test_lib).to_numpy()
    return adata[~is_test].copy(), adata[is_test].copy()


def _fit(adata, **kwargs):
    return stexp.tl.fit(adata, model="nh2st", features_key=FEATURES, **{**SMALL, **kwargs})


@pytest.fixture(scope="module")
def featured(_synthetic_cached):
    adata = _synthetic_cached.copy()
    _patch_features(adata)
    return adata


@pytest.fixture(scope="module")
def fitted(featured):
    """NH2ST fitted on slides 0 and 1 of the synthetic data."""
    stexp.settings.verbosity = 1
    train, _ = _split(featured)
    return _fit(train, max_epochs=20, seed=0)


# -- building blocks ------------------------------------------------------------------------------


def test_info_nce_chance_and_alignment():
    from stexp.models._layers import info_nce

    torch.manual_seed(0)
    a = torch.randn(64, 16)
    chance = info_nce(a, torch.randn(64, 16), temperature=1.0)
    assert abs(float(chance) - math.log(64)) < 0.3
    assert float(info_nce(a, a, temperature=0.05)) < 0.05
    assert float(info_nce(a, a.roll(1, 0), temperature=0.05)) > math.log(64)  # every pair mismatched
    with pytest.raises(ValueError, match="same shape"):
        info_nce(a, a[:10])
    with pytest.raises(ValueError, match="temperature"):
        info_nce(a, a, temperature=0)


def test_hypergraph_conv_matches_dense_formula():
    from stexp.models._nh2st import HypergraphConv

    torch.manual_seed(0)
    conv = HypergraphConv(4)
    x = torch.randn(1, 3, 4)
    H = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])  # third node/edge: padding
    out = conv(x, H)[0]
    Hd = H[0]
    dv = Hd.sum(1).clamp(min=1).rsqrt().diag()
    de = Hd.sum(0).clamp(min=1).reciprocal().diag()
    expected = dv @ Hd @ de @ Hd.T @ dv @ conv.linear(x[0])
    torch.testing.assert_close(out, expected)
    # a node in no hyperedge receives nothing
    H2 = H.clone()
    H2[0, 2] = 0
    assert torch.all(conv(x, H2)[0, 2] == 0)


# -- the model ------------------------------------------------------------------------------------


def test_learns_above_shuffled_image_control(featured, fitted):
    from stexp.pp._target import expression_target

    train, test = _split(featured)
    stexp.tl.predict(test, fitted)
    truth = expression_target(test, fitted.genes)
    pcc = mean_pcc(test.layers["stexp_pred"], truth)

    control = train.copy()
    rng = np.random.default_rng(0)
    control.obsm[FEATURES] = control.obsm[FEATURES][rng.permutation(control.n_obs)]
    shuffled = _fit(control, max_epochs=20, seed=0)
    stexp.tl.predict(test, shuffled, key_added="control")
    pcc_control = mean_pcc(test.layers["control"], truth)

    assert pcc > 0.25, pcc
    assert pcc > pcc_control + 0.1, (pcc, pcc_control)  # shuffled controls reach about -0.15..0.2
    hist = fitted.history
    assert {"train_loss", "train_nce_query", "train_nce_neighbor", "train_mse"} <= set(hist)
    assert len(hist["train_loss"]) == 20 and hist["train_loss"][-1] < hist["train_loss"][0]
    assert hist["train_nce_neighbor"][-1] < math.log(64)  # contrastive alignment above chance


def test_prediction_never_reads_counts(featured, fitted):
    _, test = _split(featured)
    stexp.tl.predict(test, fitted)
    ref = test.layers["stexp_pred"].copy()
    assert np.isfinite(ref).all() and ref.shape == (test.n_obs, test.n_vars)

    shuffled = test.copy()
    shuffled.X = shuffled.X[np.random.default_rng(1).permutation(test.n_obs)]
    stexp.tl.predict(shuffled, fitted)
    zeroed = test.copy()
    zeroed.X = zeroed.X * 0
    stexp.tl.predict(zeroed, fitted)
    np.testing.assert_array_equal(shuffled.layers["stexp_pred"], ref)
    np.testing.assert_array_equal(zeroed.layers["stexp_pred"], ref)
    assert zeroed.uns["stexp"]["stexp_pred"]["model"] == "nh2st"


def test_neighbourhoods_stay_within_a_slide(featured, fitted):
    """Predicting slide 2 alone or beside slide 0 gives the same values: no neighbours across slides."""
    both = featured[featured.obs["library_id"].isin(["slide_0", "slide_2"])].copy()
    _, alone = _split(featured)
    stexp.tl.predict(both, fitted)
    stexp.tl.predict(alone, fitted)
    in_both = both[both.obs["library_id"] == "slide_2"].layers["stexp_pred"]
    np.testing.assert_allclose(in_both, alone.layers["stexp_pred"], rtol=1e-5, atol=1e-6)


def test_neighbour_context_is_image_only_and_optional(featured, fitted):
    """With context, a spot's prediction follows its neighbours' images; without, it does not."""
    _, test = _split(featured)
    lonely = test[:3].copy()  # a 3-spot slide: fewer spots than n_neighbors, padded neighbourhoods
    stexp.tl.predict(lonely, fitted)
    assert np.isfinite(lonely.layers["stexp_pred"]).all()

    spot = 0
    changed = test.copy()
    others = np.arange(test.n_obs) != spot
    changed.obsm[FEATURES][others] = changed.obsm[FEATURES][others][::-1]
    stexp.tl.predict(test, fitted)
    stexp.tl.predict(changed, fitted)
    assert not np.allclose(test.layers["stexp_pred"][spot], changed.layers["stexp_pred"][spot])

    train, _ = _split(featured)
    no_ctx = _fit(train, max_epochs=1, use_neighbor_context=False)
    stexp.tl.predict(test, no_ctx)
    stexp.tl.predict(changed, no_ctx)
    np.testing.assert_allclose(test.layers["stexp_pred"][spot], changed.layers["stexp_pred"][spot], rtol=1e-6)


def test_save_load_predict_identical(featured, fitted, tmp_path):
    _, test = _split(featured)
    stexp.tl.predict(test, fitted)
    path = fitted.save(tmp_path / "nh2st")
    assert (path / "model.json").exists() and (path / "weights.safetensors").exists()
    loaded = stexp.models.load(path, genes=fitted.genes)
    assert loaded.name == "nh2st" and loaded.hparams == fitted.hparams
    stexp.tl.predict(test, loaded, key_added="loaded")
    np.testing.assert_array_equal(test.layers["loaded"], test.layers["stexp_pred"])
    with pytest.raises(ValueError, match="genes"):
        stexp.models.load(path, genes=fitted.genes[::-1][:10])


def test_deterministic_for_a_seed(featured):
    train, test = _split(featured)
    preds = []
    for seed in (3, 3, 4):
        model = _fit(train, max_epochs=2, seed=seed)
        preds.append(model.predict(spot_data(test, features_key=FEATURES, library_key="library_id"))[0])
    np.testing.assert_array_equal(preds[0], preds[1])
    assert not np.allclose(preds[0], preds[2])


def test_fit_options_validation_and_spread(featured):
    train, test = _split(featured)
    model = stexp.tl.fit(
        train,
        model="nh2st",
        features_key=FEATURES,
        max_epochs=3,
        batch_size=32,
        lr=2e-3,
        weight_decay=0.0,
        device="cpu",
        seed=1,
        validation="slide_1",
        dim=16,
        n_heads=2,
        n_neighbors=4,
        mc_samples=4,
    )
    hp = model.hparams
    assert (hp["max_epochs"], hp["batch_size"], hp["lr"], hp["weight_decay"], hp["seed"]) == (3, 32, 2e-3, 0.0, 1)
    assert len(model.history["val_loss"]) == 3 and len(model.history["train_loss"]) == 3
    stexp.tl.predict(test, model)
    std = test.layers["stexp_pred_std"]
    assert std.shape == (test.n_obs, test.n_vars) and (std >= 0).all() and (std > 0).any()
    again = test.copy()
    stexp.tl.predict(again, model)
    np.testing.assert_array_equal(again.layers["stexp_pred_std"], std)  # MC dropout is seeded


def test_bad_input(featured, fitted):
    from stexp.models._nh2st import NH2ST

    with pytest.raises(ValueError, match="divisible"):
        NH2ST(["g"], dim=30, n_heads=4)
    with pytest.raises(ValueError, match="temperature_query"):
        NH2ST(["g"], temperature_query=0)
    with pytest.raises(TypeError, match="unknown hyper-parameter"):
        NH2ST(["g"], n_neighbours=8)
    train, test = _split(featured)
    with pytest.raises(ValueError, match="finetune_encoder=True rebuilds the image encoder.*no spec"):
        _fit(train, max_epochs=1, finetune_encoder=True)  # hand-made features: no encoder to fine-tune
    data = spot_data(test, features_key=FEATURES, library_key="library_id")
    data.features = data.features[:, :5]
    with pytest.raises(ValueError, match="12-dimensional"):
        fitted.predict(data)


# -- the official code's choices (issue 27: docs/methods.md) ----------------------------------------


def test_info_nce_negative_weight_and_one_direction():
    from stexp.models._layers import info_nce

    torch.manual_seed(1)
    a, b = torch.randn(16, 8), torch.randn(16, 8)
    logits = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T / 0.05
    scaled = torch.where(torch.eye(16, dtype=torch.bool), logits, 0.1 * logits)
    labels = torch.arange(16)
    expected = torch.nn.functional.cross_entropy(scaled, labels)  # NH2ST: image -> gene rows only
    got = info_nce(a, b, temperature=0.05, negative_weight=0.1, symmetric=False)
    torch.testing.assert_close(got, expected)
    # the symmetric form differs (columns too), and weight 1 is plain InfoNCE
    assert not torch.isclose(info_nce(a, b, temperature=0.05, negative_weight=0.1), expected)
    plain = info_nce(a, b, temperature=0.05, negative_weight=1.0, symmetric=False)
    torch.testing.assert_close(plain, torch.nn.functional.cross_entropy(logits, labels))
    with pytest.raises(ValueError, match="negative_weight"):
        info_nce(a, b, negative_weight=-1.0)


def test_hyperedges_follow_image_similarity_not_distance():
    from stexp.models._neighbors import hypergraph_from_distances, knn_hypergraph
    from stexp.models._nh2st import feature_distances

    # one neighbourhood of 4 nodes on a line; node 3 (farthest from node 0) has node 0's image
    coords = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    feats = np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 1.0], [1.0, 0.01]], dtype=np.float32)
    nodes, mask = np.arange(4)[None, :], np.ones((1, 4), dtype=bool)
    by_image = hypergraph_from_distances(feature_distances(feats, nodes), mask, k=1)[0]
    by_space = knn_hypergraph(coords, nodes, mask, k=1)[0]
    # hyperedge of node 0 (column 0): itself and its most similar node
    assert set(np.flatnonzero(by_image[:, 0])) == {0, 3}
    assert set(np.flatnonzero(by_space[:, 0])) == {0, 1}


def test_official_defaults():
    hp = stexp.models.get_model_class("nh2st").default_hparams
    expected = {
        "dim": 512,
        "n_neighbors": 8,
        "hyperedge_k": 3,
        "hypergraph_layers": 2,
        "hypergraph_on": "features",
        "temperature_query": 0.05,
        "temperature_neighbor": 0.05,
        "weight_query": 1.0,
        "weight_neighbor": 0.5,
        "weight_mse": 1.0,
        "negative_weight": 0.1,
        "symmetric_loss": False,
        "linear_heads": True,
        "lr": 5e-4,
        "weight_decay": 0.0,
        "early_stopping_patience": 20,
    }
    assert {k: hp[k] for k in expected} == expected
    net = stexp.models.get_model_class("nh2st")(["a", "b"], dim=32, n_heads=4).build_network(n_features=5, encoder=None)
    linears = [type(m).__name__ for m in net.gene_encoder] + [type(m).__name__ for m in net.regressor]
    assert linears == ["Linear"] * 4  # no activation in NH2ST's exp_encoder and Decoder
    assert net.regressor[0].out_features == 16  # Decoder hidden = dim // 2 (256 at dim 512)
    with pytest.raises(ValueError, match="hypergraph_on"):
        stexp.models.get_model_class("nh2st")(["a"], hypergraph_on="pixels")


def test_folder_saved_before_the_audit_keeps_its_architecture(featured):
    from stexp.models._nh2st import NH2ST

    train, test = _split(featured)
    old = _fit(train, max_epochs=1, linear_heads=False, hypergraph_on="space", calibrate=False)
    state = old._state()
    assert "net.gene_encoder.3.weight" in state
    hp = {k: v for k, v in old.hparams.items() if k not in ("linear_heads", "hypergraph_on")}
    new = NH2ST(old.genes, features_key=old.features_key, encoder_spec=old.encoder_spec, **hp)
    new._load_state(state)
    new.is_fitted = True
    assert new.hparams["linear_heads"] is False and new.hparams["hypergraph_on"] == "space"
    data = spot_data(test, features_key=FEATURES, library_key="library_id")
    np.testing.assert_allclose(new.predict(data)[0], old.predict(data)[0], rtol=1e-5, atol=1e-6)
