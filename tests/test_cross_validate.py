from typing import ClassVar

import numpy as np
import pytest

import stexp
from stexp.models import ExpressionModel, register_model

FEATURES = "X_test_domain"


def _domain_features(adata, *, seed: int = 0, dim: int = 16, noise: float = 0.5) -> None:
    """Image-like features that carry the tissue domain (the signal behind the synthetic expression)."""
    rng = np.random.default_rng(seed)
    codes = adata.obs["domain"].cat.codes.to_numpy()
    loadings = rng.normal(size=(codes.max() + 1, dim))
    adata.obsm[FEATURES] = (loadings[codes] + noise * rng.normal(size=(adata.n_obs, dim))).astype(np.float32)


@register_model("_test_spy")
class SpyModel(ExpressionModel):
    """Remembers which slides and patients it was trained on; predicts zeros."""

    default_hparams: ClassVar[dict] = {"seed": 0}

    def _fit(self, train, validation=None):
        self.seen_libraries = set(train.library.tolist())
        self.seen_patients = set(train.patient.tolist())

    def _predict(self, data):
        return np.zeros((data.n_spots, len(self.genes)), dtype=np.float32), None

    def _state(self):
        return {}

    def _load_state(self, state):
        pass


@pytest.fixture(scope="module")
def four_slides():
    """Four small slides of two patients (slides 0 and 2: patient_0; 1 and 3: patient_1)."""
    adata = stexp.datasets.synthetic(n_slides=4, n_spots=64, n_genes=30, n_patients=2, seed=1)
    _domain_features(adata)
    return adata


@pytest.fixture
def four(four_slides):
    return four_slides.copy()


def test_leave_one_patient_out_never_trains_on_the_test_patient(four):
    res = stexp.tl.cross_validate(
        four, model="_test_spy", features_key=FEATURES, genes=four.var_names.tolist(), keep_models=True
    )
    assert list(res.folds["test_group"]) == ["patient_0", "patient_1"]
    for fold, row in res.folds.iterrows():
        est = res.models["_test_spy"][fold]
        assert row["test_group"] not in est.seen_patients
        assert est.seen_libraries.isdisjoint(row["test_libraries"].split(", "))
        assert len(est.seen_libraries) == 2
    assert len(res.per_fold) == 4  # one row per test slide
    assert set(res.per_fold["library_id"]) == {f"slide_{i}" for i in range(4)}


def test_out_of_fold_predictions_are_those_of_the_fold_model(four):
    genes = four.var_names[:20].tolist()
    res = stexp.tl.cross_validate(four, model="ridge", features_key=FEATURES, genes=genes, key_added="cv")
    oof = stexp.tl.get_prediction(four, "cv", four.var_names).to_numpy()
    assert np.isfinite(oof[:, :20]).all() and np.isnan(oof[:, 20:]).all()
    # Refit the fold that holds out patient_1 by hand: same predictions on its slides.
    is_test = (four.obs["patient"] == "patient_1").to_numpy()
    train, test = four[~is_test].copy(), four[is_test].copy()
    stexp.tl.predict(test, stexp.tl.fit(train, model="ridge", features_key=FEATURES, genes=genes))
    np.testing.assert_allclose(oof[is_test], stexp.tl.get_prediction(test, genes=four.var_names), rtol=1e-5, atol=1e-6)
    # The per-fold scores are evaluate's scores of the out-of-fold layer.
    scores = stexp.tl.evaluate(four, pred_key="cv")
    np.testing.assert_allclose(res.per_fold.set_index("library_id").loc[scores.index, "pcc_acg"], scores["pcc_acg"])
    assert res.summary.loc["ridge", "pcc_acg"] == pytest.approx(scores["pcc_acg"].mean())
    assert res.summary.loc["ridge", "n_slides"] == 4
    assert "per_fold" in four.uns["stexp"]["cv"]


@pytest.mark.filterwarnings("error:Mean of empty slice")
def test_several_models_run_on_the_same_folds(four):
    res = stexp.tl.cross_validate(
        four, model=["mean", "ridge", "knn"], features_key=FEATURES, genes=four.var_names.tolist(), k=5
    )
    assert res.layers == {m: f"stexp_cv_{m}" for m in ("mean", "ridge", "knn")}
    for m in ("mean", "ridge", "knn"):
        assert f"stexp_cv_{m}" in four.layers
    assert "stexp_cv_knn_std" in four.layers
    assert list(res.summary.index) == ["mean", "ridge", "knn"]
    assert res.summary.loc["ridge", "mse"] < res.summary.loc["mean", "mse"]
    folds = res.per_fold.groupby("model")["fold"].apply(list)
    assert folds["mean"] == folds["ridge"] == folds["knn"]
    # the mean predicts constants: no expected PCC, reported as NaN without a RuntimeWarning ("Mean of empty slice")
    expected = res.per_fold.groupby("model")["expected_pcc"].apply(lambda x: np.isfinite(x).all())
    assert not expected["mean"] and expected["knn"]
    with pytest.raises(TypeError, match="no model"):
        stexp.tl.cross_validate(four, model=["mean", "ridge"], features_key=FEATURES, k=5)


def test_leave_one_slide_out_warns_about_sister_sections(four, recwarn):
    with pytest.warns(UserWarning, match="sister sections"):
        res = stexp.tl.cross_validate(
            four, model="mean", split_by="library_id", features_key=FEATURES, genes=four.var_names.tolist()
        )
    assert len(res.folds) == 4
    one_per_patient = stexp.datasets.synthetic(n_slides=2, n_spots=36, n_genes=10, seed=2)
    _domain_features(one_per_patient)
    recwarn.clear()
    stexp.tl.cross_validate(
        one_per_patient, model="mean", split_by="library_id", features_key=FEATURES, genes=["gene_000", "gene_001"]
    )
    assert not [w for w in recwarn if "sister" in str(w.message)]


def test_gene_panel_is_selected_on_the_training_slides_only(four, monkeypatch):
    """Whatever select_hvg does, it only ever sees the training slides of the fold."""
    seen = []

    def fake_select_hvg(adata, *, n_top_genes, library_key, layer, key_added, **kwargs):
        seen.append(set(adata.obs[library_key].astype(str)))
        adata.var[key_added] = np.arange(adata.n_vars) < n_top_genes

    monkeypatch.setitem(vars(stexp.pp), "select_hvg", fake_select_hvg)
    res = stexp.tl.cross_validate(four, model="mean", features_key=FEATURES, n_top_genes=7)
    assert seen == [{"slide_1", "slide_3"}, {"slide_0", "slide_2"}]
    assert all(len(p) == 7 for p in res.panels.values())
    assert (res.per_fold["n_genes"] == 7).all()


def test_planted_test_only_variable_gene_stays_out_of_its_fold_panel():
    pytest.importorskip("stexp.pp._hvg")
    from scipy import sparse

    adata = stexp.datasets.synthetic(n_slides=3, n_spots=64, n_genes=40, seed=3)
    _domain_features(adata)
    X = adata.X.toarray()
    planted = adata.var_names.get_loc("gene_000")
    in_test = (adata.obs["library_id"] == "slide_2").to_numpy()
    X[:, planted] = 5  # flat where trained on
    X[in_test, planted] = np.where(np.arange(in_test.sum()) % 2, 0, 300)  # wildly variable in slide_2 only
    adata.X = sparse.csr_matrix(X)
    res = stexp.tl.cross_validate(adata, model="mean", split_by="library_id", features_key=FEATURES, n_top_genes=8)
    test_fold = res.folds.index[res.folds["test_group"] == "slide_2"][0]
    assert "gene_000" not in res.panels[test_fold]
    assert all("gene_000" in res.panels[f] for f in res.folds.index if f != test_fold)
    assert np.isnan(stexp.tl.get_prediction(adata, "stexp_cv", ["gene_000"]).to_numpy()[in_test]).all()


def test_bad_inputs(four):
    genes = four.var_names.tolist()
    with pytest.raises(KeyError, match="'donor'"):
        stexp.tl.cross_validate(four, model="mean", split_by="donor", features_key=FEATURES, genes=genes)
    four.obs["everyone"] = "p"
    with pytest.raises(ValueError, match="single group"):
        stexp.tl.cross_validate(four, model="mean", split_by="everyone", features_key=FEATURES, genes=genes)
    with pytest.raises(ValueError, match="validation"):
        stexp.tl.cross_validate(four, model="mlp", features_key=FEATURES, genes=genes, validation="slide_0")
    with pytest.raises(KeyError, match="X_missing"):
        stexp.tl.cross_validate(four, model="mean", features_key="X_missing", genes=genes)
    four.obs["half"] = np.where(np.arange(four.n_obs) % 2, "a", "b")
    with pytest.raises(ValueError, match="several 'half' groups"):
        stexp.tl.cross_validate(four, model="mean", split_by="half", features_key=FEATURES, genes=genes)


def test_default_cross_validate_equals_fit_predict_evaluate_by_hand(four):
    genes = four.var_names.tolist()
    res = stexp.tl.cross_validate(four, features_key=FEATURES, genes=genes, coverage=0.9, keep_models=True)
    assert list(res.summary.index) == [stexp.models.DEFAULT_RECIPE.label]
    for column in ("coverage", "interval_width", "unc_spot_spearman", "expected_pcc_spearman"):
        assert column in res.per_fold and res.per_fold[column].notna().all(), column
    patients = four.obs["patient"].astype(str)
    for fold, patient in enumerate(["patient_0", "patient_1"]):
        train = four[(patients != patient).to_numpy()].copy()
        test = four[(patients == patient).to_numpy()].copy()
        model = stexp.tl.fit(train, features_key=FEATURES, genes=genes)
        assert model.recipe == res.models["default"][fold].recipe
        stexp.tl.predict(test, model, coverage=0.9)
        by_hand = stexp.tl.evaluate(test)
        rows = res.per_fold.set_index("library_id").loc[by_hand.index]
        for column in ("pcc_acg", "pcc_heg", "mse", "coverage", "interval_width", "expected_pcc_spearman"):
            np.testing.assert_allclose(rows[column], by_hand[column], rtol=1e-5, atol=1e-6, err_msg=column)


def test_cross_validate_takes_the_fit_options_and_refuses_what_no_model_takes(four):
    genes = four.var_names.tolist()
    res = stexp.tl.cross_validate(four, features_key=FEATURES, genes=genes, smoothing=0, calibrate=False, k=10)
    assert "coverage" not in res.per_fold
    assert res.per_fold["pcc_acg"].notna().all()
    with pytest.raises(TypeError, match=r"no model among \['ridge', 'mean'\] takes \['max_epochs'\]"):
        stexp.tl.cross_validate(four, model=["ridge", "mean"], features_key=FEATURES, genes=genes, max_epochs=3)
    with pytest.raises(ValueError, match="coverage= needs calibrated models"):
        stexp.tl.cross_validate(four, model="ridge", features_key=FEATURES, genes=genes, calibrate=False, coverage=0.9)


def test_test_features_are_scored_as_renderings_of_the_held_out_slides(four):
    genes = four.var_names.tolist()
    four.obsm["X_same"] = four.obsm[FEATURES].copy()
    four.obsm["X_noise"] = np.random.default_rng(0).normal(size=four.obsm[FEATURES].shape).astype(np.float32)
    res = stexp.tl.cross_validate(
        four,
        model=["ridge", "knn"],
        features_key=FEATURES,
        genes=genes,
        test_features={"same": "X_same", "noise": "X_noise"},
    )
    s = res.summary["pcc_acg"]
    assert set(s.index) == {"ridge", "knn", "ridge@same", "knn@same", "ridge@noise", "knn@noise"}
    assert s["ridge@same"] == pytest.approx(s["ridge"]) and s["knn@same"] == pytest.approx(s["knn"])
    assert s["ridge@noise"] < s["ridge"] - 0.2
    assert {"stexp_cv_ridge", "stexp_cv_ridge_noise"} <= set(res.layers.values())
    with pytest.raises(KeyError, match="X_missing"):
        stexp.tl.cross_validate(
            four, model="ridge", features_key=FEATURES, genes=genes, test_features={"a": "X_missing"}
        )


def test_inner_validation_holds_a_training_slide_out_of_each_fit(four):
    res = stexp.tl.cross_validate(
        four,
        model="_test_spy",
        features_key=FEATURES,
        genes=four.var_names.tolist(),
        keep_models=True,
        inner_validation=True,
    )
    for fold, row in res.folds.iterrows():
        train_libs = sorted(row["train_libraries"].split(", "))
        assert len(train_libs) == 2
        # the last training slide validates; the fit sees the other one only
        assert res.models["_test_spy"][fold].seen_libraries == {train_libs[0]}
