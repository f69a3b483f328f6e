"""stexp's results plot with the ecosystem's own tools: squidpy's spatial_scatter and spatialdata-plot.

Predictions (``layers["stexp_pred"]`` from :func:`stexp.tl.predict`) and domains (``obs["stexp_domain"]``
from :func:`stexp.tl.domains`) are drawn with a quick ridge model on random features; the checks look at
what was drawn (values, colours, spot positions and sizes), not only that nothing raised.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

import stexp
from stexp.pl._utils import tissue_view

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")

GENE = "gene_003"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _predict_and_cluster(adata):
    """Ridge on random features (a prediction that differs from the counts), then domains on it."""
    rng = np.random.default_rng(0)
    adata.obsm["X_random"] = rng.normal(size=(adata.n_obs, 16)).astype(np.float32)
    model = stexp.tl.fit(adata, model="ridge", features_key="X_random")
    stexp.tl.predict(adata, model)
    stexp.tl.domains(adata, n_domains=3)
    return adata


@pytest.fixture
def predicted(synth):
    return _predict_and_cluster(synth)


def _centres(coll) -> np.ndarray:
    return np.array([(p.vertices.max(axis=0) + p.vertices.min(axis=0)) / 2 for p in coll.get_paths()])


def test_squidpy_spatial_scatter_draws_the_prediction_layer(predicted):
    sq = pytest.importorskip("squidpy")
    libs = ["slide_0", "slide_1"]
    sq.pl.spatial_scatter(
        predicted, color=GENE, layer="stexp_pred", library_id=libs, library_key="library_id", img_res_key="lowres"
    )
    fig = plt.gcf()
    panels = [a for a in fig.axes if a.images]
    assert len(panels) == len(libs)  # one panel per library, each on its H&E (plus colour bars)
    g = predicted.var_names.get_loc(GENE)
    for ax, lib in zip(panels, libs, strict=True):
        mask = (predicted.obs["library_id"] == lib).to_numpy()
        (coll,) = [c for c in ax.collections if c.get_array() is not None and len(c.get_paths()) == mask.sum()]
        drawn = np.asarray(coll.get_array(), dtype=float)
        assert np.isfinite(drawn).all()
        np.testing.assert_allclose(drawn, predicted.layers["stexp_pred"][mask, g], rtol=1e-6)
        assert not np.allclose(drawn, predicted[mask, GENE].X.toarray().ravel())  # the layer, not the counts
        sf = predicted.uns["spatial"][lib]["scalefactors"]
        # squidpy puts the spots where stexp does, at the same (true) size
        np.testing.assert_allclose(_centres(coll), predicted.obsm["spatial"][mask] * sf["tissue_lowres_scalef"])
        radius = (coll.get_paths()[0].vertices.max(axis=0) - coll.get_paths()[0].vertices.min(axis=0)).mean() / 2
        ours = tissue_view(predicted, lib, img="lowres").radius
        assert radius == pytest.approx(ours, rel=1e-3)


def test_squidpy_spatial_scatter_draws_the_domains(predicted):
    sq = pytest.importorskip("squidpy")
    sq.pl.spatial_scatter(
        predicted, color="stexp_domain", library_id="slide_2", library_key="library_id", img_res_key="hires"
    )
    (ax,) = [a for a in plt.gcf().axes if a.images]
    mask = (predicted.obs["library_id"] == "slide_2").to_numpy()
    domains = predicted.obs["stexp_domain"][mask].astype(str).to_numpy()
    coll = next(c for c in ax.collections if len(c.get_paths()) == mask.sum())
    colours = coll.get_facecolors()
    per_domain = {d: np.unique(colours[domains == d], axis=0) for d in np.unique(domains)}
    assert all(len(c) == 1 for c in per_domain.values())  # one colour per domain
    assert len({tuple(c[0]) for c in per_domain.values()}) == len(per_domain)  # and a different one each
    legend = {t.get_text() for t in ax.get_legend().get_texts()}
    assert legend == set(predicted.obs["stexp_domain"].cat.categories)


def test_spatialdata_plot_draws_results_written_back_with_to_spatialdata():
    pytest.importorskip("spatialdata_plot")
    from spatialdata_io.experimental import from_legacy_anndata

    # the user's SpatialData (here converted from a one-slide Visium-layout AnnData), read by stexp,
    # predicted and clustered, then written back into its table
    sdata = from_legacy_anndata(stexp.datasets.synthetic(n_slides=1, n_spots=144, n_genes=40, seed=0))
    adata = _predict_and_cluster(stexp.io.from_spatialdata(sdata, coordinate_system="slide_0_hires"))
    stexp.io.to_spatialdata(adata, sdata)
    table = sdata.tables["table"]
    predicted = np.asarray(adata[table.obs_names, GENE].layers["stexp_pred"], dtype=float).ravel()

    fig, ax = plt.subplots()
    sdata.pl.render_images("slide_0_hires").pl.render_shapes("locations", color=GENE, table_layer="stexp_pred").pl.show(
        ax=ax, coordinate_systems="slide_0_hires"
    )
    assert len(ax.images) == 1
    (coll,) = ax.collections
    assert len(coll.get_paths()) == table.n_obs
    (cbar_ax,) = [a for a in fig.axes if a is not ax]
    clim = tuple(float(v) for v in cbar_ax._colorbar.mappable.get_clim())
    assert clim == pytest.approx((float(predicted.min()), float(predicted.max())), rel=1e-5)
    colours = coll.get_facecolors()
    order = np.argsort(predicted)
    assert not np.allclose(colours[order[0]], colours[order[-1]])  # lowest and highest prediction differ

    fig, ax = plt.subplots()
    sdata.pl.render_shapes("locations", color="stexp_domain").pl.show(ax=ax, coordinate_systems="slide_0_hires")
    colours = ax.collections[0].get_facecolors()
    domains = table.obs["stexp_domain"].astype(str).to_numpy()
    per_domain = {d: np.unique(colours[domains == d], axis=0) for d in np.unique(domains)}
    assert all(len(c) == 1 for c in per_domain.values()) and len(per_domain) == 3
    assert len({tuple(c[0]) for c in per_domain.values()}) == 3
