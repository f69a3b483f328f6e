import numpy as np
import pandas as pd
import pytest

import stexp
from stexp.pp._target import expression_target


def _noisy_prediction(adata, *, seed: int = 0, noise: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    truth = expression_target(adata)
    return (truth + noise * rng.normal(size=truth.shape)).astype(np.float32)


def test_metrics_match_scipy_and_sklearn_per_slide(synth):
    from scipy.stats import pearsonr
    from sklearn.metrics import mean_absolute_error, mean_squared_error

    synth.layers["stexp_pred"] = _noisy_prediction(synth)
    table = stexp.tl.evaluate(synth, top_n=10)
    truth = expression_target(synth)
    pcc = synth.uns["stexp"]["evaluate"]["stexp_pred"]["pcc"]
    assert list(table.index) == ["slide_0", "slide_1", "slide_2"]
    for lib in table.index:
        m = (synth.obs["library_id"] == lib).to_numpy()
        t, p = truth[m], synth.layers["stexp_pred"][m]
        keep = t.std(0) > 0
        ref = np.full(t.shape[1], np.nan)
        ref[keep] = [pearsonr(t[:, g], p[:, g])[0] for g in np.flatnonzero(keep)]
        np.testing.assert_allclose(pcc[lib].to_numpy(), ref, rtol=1e-5, atol=1e-6)
        assert table.loc[lib, "pcc_acg"] == pytest.approx(np.nanmean(ref), rel=1e-5)
        heg = np.argsort(-t.mean(0))[:10]
        hvg = np.argsort(-t.var(0))[:10]
        assert table.loc[lib, "pcc_heg"] == pytest.approx(np.nanmean(ref[heg]), rel=1e-5)
        assert table.loc[lib, "pcc_hvg"] == pytest.approx(np.nanmean(ref[hvg]), rel=1e-5)
        assert table.loc[lib, "mse"] == pytest.approx(mean_squared_error(t, p), rel=1e-5)
        assert table.loc[lib, "mae"] == pytest.approx(mean_absolute_error(t, p), rel=1e-5)
        assert table.loc[lib, "n_spots"] == m.sum()
        assert table.loc[lib, "n_genes"] == synth.n_vars
        assert table.loc[lib, "n_constant"] == (~keep).sum()
    # var holds the mean over slides of the per-gene Pearson.
    np.testing.assert_allclose(synth.var["stexp_pred_pcc"], np.nanmean(pcc.to_numpy(), axis=1), rtol=1e-6)


def test_pearson_is_per_slide_not_pooled(synth):
    """A prediction right only up to a per-slide offset: perfect per slide, worse when pooled."""
    truth = expression_target(synth)
    offset = synth.obs["library_id"].cat.codes.to_numpy()[:, None] * 5.0
    synth.layers["stexp_pred"] = truth + offset
    table = stexp.tl.evaluate(synth)
    assert np.allclose(table["pcc_acg"], 1.0)
    assert (table["mse"] > 0).any()


def test_panel_is_the_predicted_genes_and_constant_genes_are_counted(synth):
    pred = _noisy_prediction(synth, noise=0.2)
    pred[:, 40:] = np.nan  # outside the model's panel
    pred[:, 0] = 1.5  # a constant prediction: no Pearson
    synth.layers["p"] = pred
    table = stexp.tl.evaluate(synth, pred_key="p")
    assert (table["n_genes"] == 40).all()
    assert (table["n_constant"] >= 1).all()
    assert synth.var["p_pcc"].iloc[40:].isna().all()
    assert np.isnan(synth.var["p_pcc"].iloc[0])
    assert synth.var["p_pcc"].iloc[1:40].notna().all()


def test_genes_restrict_the_scores(synth):
    synth.layers["stexp_pred"] = _noisy_prediction(synth)
    genes = synth.var_names[:5].tolist()
    table = stexp.tl.evaluate(synth, genes=genes)
    assert (table["n_genes"] == 5).all()
    assert synth.var["stexp_pred_pcc"].iloc[5:].isna().all()


def test_scores_survive_write_h5ad(synth, tmp_path):
    import anndata as ad

    synth.layers["stexp_pred"] = _noisy_prediction(synth)
    table = stexp.tl.evaluate(synth)
    for lib in synth.uns["spatial"]:  # images are irrelevant here and slow to write
        synth.uns["spatial"][lib]["images"] = {}
    synth.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad").uns["stexp"]["evaluate"]["stexp_pred"]
    assert isinstance(back["pcc"], pd.DataFrame)
    pd.testing.assert_frame_equal(back["per_slide"], table, check_names=False, check_index_type=False)


def test_missing_or_bad_prediction_layer(synth):
    with pytest.raises(KeyError, match="stexp_pred"):
        stexp.tl.evaluate(synth)
    synth.layers["stexp_pred"] = _noisy_prediction(synth)
    synth.layers["stexp_pred"][3, 2] = np.inf
    with pytest.raises(ValueError, match="infinite"):
        stexp.tl.evaluate(synth)


def test_genes_outside_the_panel_raise(synth):
    pred = _noisy_prediction(synth)
    pred[:, 10:] = np.nan
    synth.layers["stexp_pred"] = pred
    with pytest.raises(ValueError, match="no prediction"):
        stexp.tl.evaluate(synth, genes=synth.var_names[5:15].tolist())
    with pytest.raises(KeyError, match="not_a_gene"):
        stexp.tl.evaluate(synth, genes=["not_a_gene"])


def test_partly_predicted_slide_raises(synth):
    pred = _noisy_prediction(synth)
    pred[:3, :] = np.nan
    synth.layers["stexp_pred"] = pred
    with pytest.raises(ValueError, match="slide_0.*only some"):
        stexp.tl.evaluate(synth)


def test_slide_with_one_spot_raises(synth):
    lone = synth.obs_names[0]
    synth.obs["library_id"] = synth.obs["library_id"].cat.add_categories(["lone"])
    synth.obs.loc[lone, "library_id"] = "lone"
    synth.uns["spatial"]["lone"] = synth.uns["spatial"]["slide_0"]
    synth.layers["stexp_pred"] = _noisy_prediction(synth)
    with pytest.raises(ValueError, match="'lone' has 1 spot"):
        stexp.tl.evaluate(synth)


def test_unmeasured_data_raise(synth):
    synth.layers["stexp_pred"] = _noisy_prediction(synth)
    synth.uns["stexp"] = {"unmeasured": True}
    with pytest.raises(ValueError, match="unmeasured"):
        stexp.tl.evaluate(synth)
