"""Where predictions are stored: a layer when the genes are var, else a panel-only obsm DataFrame."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import stexp
from stexp.tl._storage import get_prediction, prediction_columns, read_prediction, write_prediction


def test_layer_when_the_genes_are_var(synth):
    genes = list(synth.var_names[::-1])  # any order: stored in var order
    values = np.arange(synth.n_obs * synth.n_vars, dtype=np.float32).reshape(synth.n_obs, -1)
    assert write_prediction(synth, "p", genes, values) == "adata.layers['p']"
    np.testing.assert_array_equal(synth.layers["p"], values[:, ::-1])
    got_genes, got = read_prediction(synth, "p")
    assert list(got_genes) == list(synth.var_names)
    np.testing.assert_array_equal(got, values[:, ::-1])


def test_panel_only_dataframe_when_var_is_larger(synth, tmp_path):
    genes = list(synth.var_names[:5])
    values = np.random.default_rng(0).random((synth.n_obs, 5)).astype(np.float32)
    synth.layers["p"] = np.zeros(synth.shape, dtype=np.float32)  # a stale layer of the same key goes
    assert write_prediction(synth, "p", genes, values) == "adata.obsm['p']"
    assert "p" not in synth.layers
    frame = synth.obsm["p"]
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == genes and frame.shape == (synth.n_obs, 5)
    assert frame.index.equals(synth.obs_names)
    sub = synth[synth.obs["library_id"] == "slide_1"]  # anndata subsets the frame with the spots
    np.testing.assert_array_equal(sub.obsm["p"].to_numpy(), values[(synth.obs["library_id"] == "slide_1").to_numpy()])
    synth.write_h5ad(tmp_path / "a.h5ad")
    import anndata as ad

    back = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(get_prediction(back, "p").to_numpy(), values)
    cols = prediction_columns(back, "p", [genes[2], "not_a_gene"], rows=np.arange(3))
    np.testing.assert_array_equal(cols[:, 0], values[:3, 2])
    assert np.isnan(cols[:, 1]).all()


def test_old_nan_padded_layers_are_read_as_their_panel(synth):
    layer = np.full(synth.shape, np.nan, dtype=np.float32)
    layer[:, [1, 4]] = 1.0
    synth.layers["old"] = layer
    genes, values = read_prediction(synth, "old")
    assert list(genes) == [synth.var_names[1], synth.var_names[4]] and values.shape == (synth.n_obs, 2)


def test_bad_inputs(synth):
    with pytest.raises(ValueError, match="shape"):
        write_prediction(synth, "p", ["a", "b"], np.zeros((synth.n_obs, 3)))
    with pytest.raises(ValueError, match="repeat"):
        write_prediction(synth, "p", ["a", "a"], np.zeros((synth.n_obs, 2)))
    with pytest.raises(KeyError, match="no prediction 'missing'"):
        read_prediction(synth, "missing")


def test_predict_writes_the_panel_only_and_every_reader_accepts_it(synth):
    rng = np.random.default_rng(0)
    synth.obsm["X_random"] = rng.normal(size=(synth.n_obs, 8)).astype(np.float32)
    panel = list(synth.var_names[:12])
    model = stexp.tl.fit(synth, model="ridge", features_key="X_random", genes=panel)
    stexp.tl.predict(synth, model)
    assert "stexp_pred" not in synth.layers and list(synth.obsm["stexp_pred"].columns) == panel
    scores = stexp.tl.evaluate(synth)
    assert (scores["n_genes"] == 12).all()
    stexp.tl.domains(synth, n_domains=3)
    assert synth.obs["stexp_domain"].nunique() == 3
    fig = stexp.pl.spatial_genes(synth, panel[:2], library_id="slide_0", return_fig=True)
    assert fig is not None
    import matplotlib.pyplot as plt

    plt.close("all")
