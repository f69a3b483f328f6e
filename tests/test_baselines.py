import numpy as np
import pytest

import stexp
from stexp.pp._target import expression_target

FEATURES = "X_test_domain"
FAST = {"mlp": {"max_epochs": 20, "device": "cpu", "lr": 1e-2, "batch_size": 64, "hidden_dim": 64}}


def _domain_features(adata, *, seed: int = 0, dim: int = 16, noise: float = 0.5) -> None:
    """Image-like features that carry the tissue domain (the signal behind the synthetic expression)."""
    rng = np.random.default_rng(seed)
    codes = adata.obs["domain"].cat.codes.to_numpy()
    loadings = rng.normal(size=(codes.max() + 1, dim))
    adata.obsm[FEATURES] = (loadings[codes] + noise * rng.normal(size=(adata.n_obs, dim))).astype(np.float32)
    adata.uns.setdefault("stexp", {}).setdefault("features", {})[FEATURES] = {"encoder": "test_domain"}


@pytest.fixture
def split(synth):
    _domain_features(synth)
    is_test = (synth.obs["library_id"] == "slide_2").to_numpy()
    return synth[~is_test].copy(), synth[is_test].copy()


def _mse(adata, key):
    return float(np.mean((adata.layers[key] - expression_target(adata)) ** 2))


@pytest.mark.parametrize("name", ["mean", "ridge", "knn", "mlp"])
def test_baseline_fits_predicts_saves_and_loads(split, tmp_path, name):
    train, test = split
    model = stexp.tl.fit(train, model=name, features_key=FEATURES, **FAST.get(name, {}))
    assert model.name == name and model.is_fitted
    stexp.tl.predict(test, model, key_added="pred")
    pred = test.layers["pred"]
    assert pred.shape == test.shape and np.isfinite(pred).all()
    model.save(tmp_path / name)
    loaded = stexp.models.load(tmp_path / name, genes=model.genes)
    assert type(loaded) is type(model) and loaded.hparams == model.hparams
    stexp.tl.predict(test, loaded, key_added="pred_loaded")
    np.testing.assert_allclose(test.layers["pred_loaded"], pred, rtol=1e-5, atol=1e-5)
    if name in ("mean", "knn"):
        assert (test.layers["pred_std"] >= 0).all()


def test_mean_predicts_the_training_mean(split):
    train, test = split
    model = stexp.tl.fit(train, model="mean", features_key=FEATURES)
    stexp.tl.predict(test, model)
    np.testing.assert_allclose(test.layers["stexp_pred"][0], expression_target(train).mean(0), rtol=1e-5)
    assert np.ptp(test.layers["stexp_pred"], axis=0).max() == 0


def test_image_baselines_beat_the_mean_on_a_held_out_slide(split):
    train, test = split
    for name in ("mean", "ridge", "knn", "mlp"):
        stexp.tl.predict(
            test, stexp.tl.fit(train, model=name, features_key=FEATURES, **FAST.get(name, {})), key_added=name
        )
    table = {name: stexp.tl.evaluate(test, pred_key=name) for name in ("ridge", "knn", "mlp")}
    for name in ("ridge", "knn", "mlp"):
        assert _mse(test, name) < 0.8 * _mse(test, "mean"), name
        assert table[name]["pcc_acg"].iloc[0] > 0.3, name


def test_ridge_is_not_better_than_mean_on_shuffled_features(split):
    """Control: with the image-expression link broken, the probe cannot beat the mean by much."""
    train, test = split
    rng = np.random.default_rng(1)
    train.obsm[FEATURES] = train.obsm[FEATURES][rng.permutation(train.n_obs)]
    for name in ("mean", "ridge"):
        stexp.tl.predict(test, stexp.tl.fit(train, model=name, features_key=FEATURES), key_added=name)
    assert _mse(test, "ridge") > 0.9 * _mse(test, "mean")


def test_ridge_chooses_alpha_on_the_shared_inner_folds(split):
    train, _ = split
    model = stexp.tl.fit(train, model="ridge", features_key=FEATURES, alphas=[1e-2, 1.0, 1e2, 1e4])
    assert model.history["alpha"] in (1e-2, 1.0, 1e2, 1e4)
    assert model.history["inner_cv"] == "2 folds by patients"
    assert len(model.history["inner_cv_mse"]) == 4
    one = train[(train.obs["library_id"] == "slide_0").to_numpy()].copy()
    model = stexp.tl.fit(one, model="ridge", features_key=FEATURES, n_components=4)
    assert model.history["inner_cv"] == "5 folds by spatial blocks"
    assert model.arrays_["pca_components"].shape == (4, train.obsm[FEATURES].shape[1])


def test_ridge_path_solves_the_same_problem_as_sklearn():
    from sklearn.linear_model import Ridge

    from stexp.models._baselines import ridge_coef, ridge_path

    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(60, 20)) + 3.0, rng.normal(size=(60, 5)) + 1.0
    path = ridge_path(X, Y)
    for alpha in (0.1, 10.0, 1e4):
        coef, intercept = ridge_coef(path, alpha)
        ref = Ridge(alpha=alpha).fit(X, Y)
        np.testing.assert_allclose(coef.T, ref.coef_, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(intercept, ref.intercept_, rtol=1e-8, atol=1e-10)


def test_ridge_without_pca_saves_no_projection(split, tmp_path):
    train, test = split
    model = stexp.tl.fit(train, model="ridge", features_key=FEATURES, n_components=None, alphas=[1.0, 100.0])
    assert "pca_components" not in model.arrays_
    assert model.arrays_["coef"].shape == (train.n_vars, train.obsm[FEATURES].shape[1])
    a = stexp.tl.predict(test, model, copy=True)
    b = stexp.tl.predict(test, stexp.models.load(model.save(tmp_path / "m")), copy=True)
    np.testing.assert_allclose(a.layers["stexp_pred"], b.layers["stexp_pred"], rtol=1e-5, atol=1e-5)
    single = stexp.tl.fit(train, model="ridge", features_key=FEATURES, alphas=[10.0])
    assert single.history["inner_cv"].startswith("none") and "inner_cv_mse" not in single.history
    with pytest.raises(ValueError, match="n_components"):
        stexp.tl.fit(train, model="ridge", features_key=FEATURES, n_components=0)


def test_knn_retrieves_the_nearest_training_spot(split):
    train, _ = split
    model = stexp.tl.fit(train, model="knn", features_key=FEATURES, k=1)
    stexp.tl.predict(train, model, key_added="self")
    # With k=1 each training spot retrieves itself.
    np.testing.assert_allclose(train.layers["self"], expression_target(train), rtol=1e-5, atol=1e-5)
    assert np.allclose(train.layers["self_std"], 0)


def _mean_gene_pcc(adata, key):
    from stexp._metrics import mean_gene_pearson

    return mean_gene_pearson(adata.layers[key], expression_target(adata), adata.obs["library_id"].to_numpy())


def test_knn_temperature_auto_is_chosen_on_training_slides_and_saved(split, tmp_path):
    train, test = split
    k = train.n_obs // 2  # half the bank: equal weights blur the domains, a sharp softmax keeps them apart
    model = stexp.tl.fit(train, model="knn", features_key=FEATURES, k=k, temperature="auto")
    hist = model.history
    assert hist["inner_cv"] == "2 folds by patients" and len(hist["inner_pcc"]) == len(hist["temperature_grid"])
    assert model.temperature_ == hist["temperature"] == hist["temperature_grid"][int(np.nanargmax(hist["inner_pcc"]))]
    assert model.temperature_ is not None and model.hparams["temperature"] == "auto"
    flat = stexp.tl.fit(train, model="knn", features_key=FEATURES, k=k, temperature=None)
    stexp.tl.predict(test, model, key_added="auto")
    stexp.tl.predict(test, flat, key_added="flat")
    assert _mean_gene_pcc(test, "auto") > _mean_gene_pcc(test, "flat") + 0.05
    loaded = stexp.models.load(model.save(tmp_path / "knn_auto"))
    assert loaded.temperature_ == model.temperature_
    stexp.tl.predict(test, loaded, key_added="loaded")
    np.testing.assert_allclose(test.layers["loaded"], test.layers["auto"], rtol=1e-5, atol=1e-5)
    # with validation slides, the temperature is chosen there (no inner folds)
    first_slide = str(train.obs["library_id"].iloc[0])
    on_val = stexp.tl.fit(
        train, model="knn", features_key=FEATURES, k=k // 2, temperature="auto", validation=first_slide
    )
    assert on_val.history["inner_cv"] == "the validation slides"
    with pytest.raises(ValueError, match="temperature"):
        stexp.tl.fit(train, model="knn", features_key=FEATURES, temperature="sharp")


def test_bad_hyper_parameters_and_features(split):
    train, test = split
    with pytest.raises(ValueError, match="alphas"):
        stexp.tl.fit(train, model="ridge", features_key=FEATURES, alphas=[])
    # more neighbours than training spots: every training spot is one (one rule for every fit)
    assert stexp.tl.fit(train, model="knn", features_key=FEATURES, k=10_000).hparams["k"] == train.n_obs
    with pytest.raises(TypeError, match=r"'mean' does not take \['k'\]"):
        stexp.tl.fit(train, model="mean", features_key=FEATURES, k=3)
    with pytest.raises(
        TypeError, match=r"'ridge' does not take \['max_epochs'\]; it takes n_components: int \| None = 256, alphas: "
    ):
        stexp.tl.fit(train, model="ridge", features_key=FEATURES, max_epochs=5)
    model = stexp.tl.fit(train, model="ridge", features_key=FEATURES)
    test.obsm[FEATURES] = test.obsm[FEATURES][:, :8]
    with pytest.raises(ValueError, match="16-dimensional"):
        stexp.tl.predict(test, model)


def test_mlp_stops_early_on_validation_slides(synth):
    _domain_features(synth)
    model = stexp.tl.fit(
        synth,
        model="mlp",
        features_key=FEATURES,
        validation="slide_2",
        **{**FAST["mlp"], "max_epochs": 300, "early_stopping_patience": 2},
    )
    assert "val_loss" in model.history
    assert len(model.history["train_loss"]) < 300


def test_fit_keeps_each_models_own_training_defaults(split):
    """fit's lr/weight_decay/batch_size default to None: the MLP is not trained with mclSTExp's lr."""
    from stexp.models import get_model_class

    train, _ = split
    model = stexp.tl.fit(train, model="mlp", features_key=FEATURES, max_epochs=1, device="cpu")
    defaults = get_model_class("mlp").default_hparams
    assert {k: model.hparams[k] for k in ("lr", "weight_decay", "batch_size")} == {
        k: defaults[k] for k in ("lr", "weight_decay", "batch_size")
    }
    assert (
        stexp.tl.fit(train, model="mlp", features_key=FEATURES, max_epochs=1, device="cpu", lr=0.5).hparams["lr"] == 0.5
    )
