"""Plots: rendered to PNG with Agg, checked on what they draw (images, colour limits, titles, spot sizes)."""

from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

import stexp
from stexp.pp._target import expression_target

GENES = ["gene_000", "gene_003"]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture
def pred(synth):
    """The synthetic data with a 'prediction' = measured target + noise (gene_059 outside the panel)."""
    target = expression_target(synth)
    rng = np.random.default_rng(1)
    layer = (target + rng.normal(0.0, 0.6, target.shape)).astype(np.float32)
    layer[:, -1] = np.nan
    synth.layers["stexp_pred"] = layer
    return synth


def _panels(fig):
    """The axes holding spots (not the colour bars), in drawing order."""
    return [a for a in fig.axes if a.collections and a.get_label() != "<colorbar>"]


def _radius(coll) -> float:
    verts = coll.get_paths()[0].vertices
    return float((verts.max(axis=0) - verts.min(axis=0)).mean() / 2)


def _title_r(ax) -> float:
    match = re.search(r"Pearson r = (-?\d+\.\d+)", ax.get_title())
    assert match, ax.get_title()
    return float(match.group(1))


def test_spatial_genes_panels_image_clim_and_pcc(pred, tmp_path):
    lib = "slide_1"
    out = tmp_path / "genes.png"
    fig = stexp.pl.spatial_genes(pred, GENES, library_id=lib, scale="shared", return_fig=True, save=out)
    assert out.stat().st_size > 10_000
    panels = _panels(fig)
    assert len(panels) == 2 * len(GENES)
    assert all(a.images for a in panels)  # the H&E is drawn under every panel
    assert len(fig.axes) == len(panels) + len(GENES)  # one shared colour bar per gene

    mask = (pred.obs["library_id"] == lib).to_numpy()
    measured = expression_target(pred[mask], GENES)
    predicted = pred.layers["stexp_pred"][mask][:, pred.var_names.get_indexer(GENES)]
    for g, gene in enumerate(GENES):
        meas_ax, pred_ax = panels[2 * g], panels[2 * g + 1]
        assert gene in meas_ax.get_title() and "measured" in meas_ax.get_title()
        clim_m, clim_p = meas_ax.collections[0].get_clim(), pred_ax.collections[0].get_clim()
        assert clim_m == pytest.approx(clim_p)
        pooled = np.concatenate([measured[:, g], predicted[:, g]])
        assert clim_m[1] == pytest.approx(np.percentile(pooled, 99), rel=1e-5)
        assert clim_m[0] == pytest.approx(pooled.min(), rel=1e-5)
        # the spots carry this library's values, in obs order
        np.testing.assert_allclose(meas_ax.collections[0].get_array(), measured[:, g], rtol=1e-6)
        np.testing.assert_allclose(pred_ax.collections[0].get_array(), predicted[:, g], rtol=1e-6)
        r = np.corrcoef(measured[:, g], predicted[:, g])[0, 1]
        assert _title_r(pred_ax) == pytest.approx(r, abs=5e-4)
        assert 0.3 < r < 0.99  # a noisy but informative prediction: the number is not trivially 1


@pytest.fixture
def narrow(pred):
    """A prediction that regresses to the mean: the measured pattern shrunk to a fifth of its spread."""
    target = expression_target(pred)
    mean = target.mean(axis=0, keepdims=True)
    pred.layers["stexp_pred"] = (mean + 0.2 * (target - mean)).astype(np.float32)
    return pred


def test_spatial_genes_panel_scale_is_the_default_and_clips_each_panel(narrow):
    lib, gene = "slide_0", "gene_000"
    mask = (narrow.obs["library_id"] == lib).to_numpy()
    measured = expression_target(narrow[mask], [gene])[:, 0].astype(np.float64)
    predicted = narrow.layers["stexp_pred"][mask, 0].astype(np.float64)

    fig = stexp.pl.spatial_genes(narrow, gene, library_id=lib, return_fig=True)
    meas_ax, pred_ax = _panels(fig)
    clim_m, clim_p = meas_ax.collections[0].get_clim(), pred_ax.collections[0].get_clim()
    assert clim_m == pytest.approx((measured.min(), np.percentile(measured, 99)), rel=1e-5)
    assert clim_p == pytest.approx((predicted.min(), np.percentile(predicted, 99)), rel=1e-5)
    assert clim_p[1] - clim_p[0] < 0.5 * (clim_m[1] - clim_m[0])  # the prediction's own, narrower range
    assert len(fig.axes) == 4  # a colour bar per panel, since the scales differ
    # on its own scale the prediction uses the whole colour map; on the shared one it would look flat
    norm = pred_ax.collections[0].norm
    assert np.ptp(np.clip(norm(predicted), 0, 1)) > 0.9

    shared = stexp.pl.spatial_genes(narrow, gene, library_id=lib, scale="shared", return_fig=True)
    meas_s, pred_s = _panels(shared)
    assert meas_s.collections[0].get_clim() == pytest.approx(pred_s.collections[0].get_clim())
    assert np.ptp(np.clip(pred_s.collections[0].norm(predicted), 0, 1)) < 0.5
    assert len(shared.axes) == 3

    top = float(measured.max()) + 1.0
    fixed = stexp.pl.spatial_genes(narrow, gene, library_id=lib, vmin="p1", vmax=top, return_fig=True)
    for a, v in zip(_panels(fixed), (measured, predicted), strict=True):
        assert a.collections[0].get_clim() == pytest.approx((np.percentile(v, 1), top), rel=1e-5)
    with pytest.raises(ValueError, match="scale must be one of"):
        stexp.pl.spatial_genes(narrow, gene, library_id=lib, scale="gene")


def test_title_pearson_is_the_one_of_tl_evaluate(pred):
    """Panel titles and tl.evaluate report the same per-gene r for each gene and slide."""
    pred.layers["stexp_pred"][:, 1] *= 0.01  # a scaled prediction: r is scale-free, a different number anyway
    stexp.tl.evaluate(pred, pred_key="stexp_pred")
    table = pred.uns["stexp"]["evaluate"]["stexp_pred"]["pcc"]
    genes = ["gene_000", "gene_001", "gene_005"]
    for lib in ("slide_0", "slide_2"):
        fig = stexp.pl.spatial_genes(pred, genes, library_id=lib, layers=["stexp_pred"], return_fig=True)
        for ax, gene in zip(_panels(fig), genes, strict=True):
            assert f"Pearson r = {table.loc[gene, lib]:.3f}" in ax.get_title()
        plt.close(fig)
    measured = expression_target(pred, ["gene_000"])[:, 0]
    r = stexp.pl._spatial.pearson(measured[:50], pred.layers["stexp_pred"][:50, 0])
    ref, _ = stexp.tl._evaluate.pearson_columns(measured[:50, None], pred.layers["stexp_pred"][:50, :1])
    assert r == ref[0]
    assert np.isnan(stexp.pl._spatial.pearson(measured[:50], np.full(50, 3.0)))  # constant: no r, as in evaluate


@pytest.mark.parametrize("img", ["hires", "lowres"])
def test_spatial_genes_spots_at_true_size(pred, img):
    lib = "slide_0"
    sf = pred.uns["spatial"][lib]["scalefactors"]
    scalef = sf[f"tissue_{img}_scalef"]
    fig = stexp.pl.spatial_genes(pred, "gene_001", library_id=lib, img=img, return_fig=True)
    coll = _panels(fig)[0].collections[0]
    expected = sf["spot_diameter_um"] / sf["microns_per_pixel"] * scalef / 2  # 55 µm spots
    assert expected == pytest.approx(sf["spot_diameter_fullres"] * scalef / 2)
    assert _radius(coll) == pytest.approx(expected, rel=1e-3)
    mask = (pred.obs["library_id"] == lib).to_numpy()
    centres = np.array([(p.vertices.max(axis=0) + p.vertices.min(axis=0)) / 2 for p in coll.get_paths()[:5]])
    np.testing.assert_allclose(centres, pred.obsm["spatial"][mask][:5] * scalef, rtol=1e-3)
    image = _panels(fig)[0].images[0].get_array()
    assert image.shape == pred.uns["spatial"][lib]["images"][img].shape


def test_blank_hires_image_falls_back_to_lowres(pred):
    entry = pred.uns["spatial"]["slide_0"]
    entry["images"]["hires"] = np.zeros_like(entry["images"]["hires"])  # as in scanpy's tiny Visium test data
    fig = stexp.pl.spatial_genes(pred, "gene_000", library_id="slide_0", return_fig=True)
    panel = _panels(fig)[0]
    assert panel.images[0].get_array().shape == entry["images"]["lowres"].shape
    assert _radius(panel.collections[0]) == pytest.approx(
        entry["scalefactors"]["spot_diameter_fullres"] * entry["scalefactors"]["tissue_lowres_scalef"] / 2, rel=1e-3
    )


def test_spatial_genes_single_library_options(pred):
    one = pred[pred.obs["library_id"] == "slide_2"].copy()
    fig = stexp.pl.spatial_genes(
        one, GENES, layers="stexp_pred", img=False, ncols=2, vmax=5.0, spot_size=40.0, return_fig=True
    )
    panels = _panels(fig)
    assert len(panels) == 2 and not any(a.images for a in panels)
    assert panels[0].collections[0].get_clim()[1] == 5.0
    assert _radius(panels[0].collections[0]) == pytest.approx(20.0, rel=1e-3)  # full-res px without an image
    assert all("Pearson r" in a.get_title() for a in panels)  # scored against the measured target


def test_spatial_genes_partial_nan_drawn_grey(pred):
    pred.layers["stexp_pred"][:10, 0] = np.nan
    fig = stexp.pl.spatial_genes(pred, "gene_000", library_id="slide_0", return_fig=True)
    coll = _panels(fig)[1].collections[0]
    assert np.ma.getmaskarray(coll.get_array())[:10].all()
    fig.canvas.draw()
    grey = matplotlib.colors.to_rgba("lightgrey")
    np.testing.assert_allclose(coll.get_facecolors()[:10], [grey] * 10)
    assert not np.allclose(coll.get_facecolors()[10], grey)
    assert np.isfinite(_title_r(_panels(fig)[1]))


def test_spatial_genes_bad_input(pred):
    with pytest.raises(ValueError, match="slide_0.*slide_1.*slide_2"):
        stexp.pl.spatial_genes(pred, "gene_000")
    with pytest.raises(KeyError, match="slide_9"):
        stexp.pl.spatial_genes(pred, "gene_000", library_id="slide_9")
    with pytest.raises(KeyError, match="not_a_gene"):
        stexp.pl.spatial_genes(pred, ["gene_000", "not_a_gene"], library_id="slide_0")
    with pytest.raises(KeyError, match="pred_x"):
        stexp.pl.spatial_genes(pred, "gene_000", library_id="slide_0", layers=(None, "pred_x"))
    with pytest.raises(ValueError, match="gene_059.*no prediction"):
        stexp.pl.spatial_genes(pred, "gene_059", library_id="slide_0")
    pred.layers["stexp_pred"][(pred.obs["library_id"] == "slide_0").to_numpy(), 2] = np.nan
    with pytest.raises(ValueError, match="gene_002.*slide_0"):
        stexp.pl.spatial_genes(pred, "gene_002", library_id="slide_0")
    with pytest.raises(ValueError, match="percentile"):
        stexp.pl.spatial_genes(pred, "gene_000", library_id="slide_1", vmax="top")
    with pytest.raises(KeyError, match="'fullres'"):
        stexp.pl.spatial_genes(pred, "gene_000", library_id="slide_1", img="fullres")
    pred.uns["stexp"] = {"unmeasured": True}
    with pytest.raises(ValueError, match="no measured expression"):
        stexp.pl.spatial_genes(pred, "gene_000", library_id="slide_1")


def test_spatial_genes_into_given_axes(pred):
    fig, axes = plt.subplots(1, 2)
    assert stexp.pl.spatial_genes(pred, "gene_000", library_id="slide_0", ax=axes) is None
    assert all(a.images and a.collections for a in axes)
    with pytest.raises(ValueError, match="2 panels"):
        stexp.pl.spatial_genes(pred, "gene_000", library_id="slide_0", ax=axes[0])


def _scores_table(rng):
    rows = []
    for model, mu in (("mean", 0.0), ("ridge", 0.4), ("mclstexp", 0.3)):
        for lib in ("slide_0", "slide_1"):
            for g in range(30):
                rows.append({"gene": f"g{g}", "library_id": lib, "model": model, "pcc": rng.normal(mu, 0.1)})
    return pd.DataFrame(rows)


def test_scores_box_per_model(tmp_path):
    df = _scores_table(np.random.default_rng(0))
    df.loc[0, "pcc"] = np.nan  # a constant gene: left out
    fig = stexp.pl.scores(df, return_fig=True, save=tmp_path / "s.png")
    (ax,) = fig.axes
    assert (tmp_path / "s.png").exists()
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["mean", "ridge", "mclstexp"]
    assert len(ax.patches) == 3  # one box per model
    medians = [line.get_ydata()[0] for line in ax.lines if line.get_gid() == "median"]
    means = [line.get_ydata()[0] for line in ax.lines if line.get_gid() == "mean"]
    by_model = df.dropna().groupby("model", sort=False)["pcc"]
    np.testing.assert_allclose(medians, by_model.median().to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(means, by_model.mean().to_numpy(), rtol=1e-6)
    assert "n=59" in ax.get_xticklabels()[0].get_text()


def test_scores_by_library_with_models_side_by_side():
    df = _scores_table(np.random.default_rng(1))
    fig = stexp.pl.scores(df, by="library_id", kind="violin", return_fig=True)
    (ax,) = fig.axes
    assert len(ax.collections) >= 6  # 2 slides x 3 models violins
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["mean", "ridge", "mclstexp"]


def test_scores_from_anndata_uns_and_bad_input(synth):
    rng = np.random.default_rng(2)
    table = {"gene": np.array(["a", "b", "c"]), "library_id": np.array(["s"] * 3), "pcc": rng.random(3)}
    synth.uns["stexp"] = {"evaluate": {"pred_ridge": table, "pred_mean": dict(table, pcc=rng.random(3) - 0.5)}}
    fig = stexp.pl.scores(synth, return_fig=True)
    labels = [t.get_text().split("\n")[0] for t in fig.axes[0].get_xticklabels()]
    assert labels == ["pred_ridge", "pred_mean"]
    fig = stexp.pl.scores(synth, key="pred_mean", return_fig=True)
    assert len(fig.axes[0].patches) == 1
    with pytest.raises(KeyError, match="pred_x"):
        stexp.pl.scores(synth, key="pred_x")
    with pytest.raises(KeyError, match="mse"):
        stexp.pl.scores(synth, metric="mse")
    with pytest.raises(ValueError, match="kind"):
        stexp.pl.scores(synth, kind="bar")
    del synth.uns["stexp"]
    with pytest.raises(KeyError, match="evaluate"):
        stexp.pl.scores(synth)


def test_domains_plot_matches_colours_and_scores(synth, tmp_path):
    # a perfect clustering under other names: colours must follow the matching, ARI must be 1
    codes = synth.obs["domain"].cat.codes.to_numpy()
    synth.obs["stexp_domain"] = pd.Categorical(((codes + 2) % 4).astype(str))
    synth.obs["label"] = synth.obs["domain"].astype(str)
    synth.obs.loc[synth.obs_names[:7], "label"] = "undetermined"
    fig = stexp.pl.domains(synth, library_id="slide_0", return_fig=True, save=tmp_path / "d.png")
    dom_ax, truth_ax = _panels(fig)
    assert dom_ax.images and truth_ax.images
    assert "ARI = 1.000" in dom_ax.get_title()
    mask = (synth.obs["library_id"] == "slide_0").to_numpy()
    n_scored = int((synth.obs["label"][mask] != "undetermined").sum())
    assert f"({n_scored} spots)" in dom_ax.get_title()
    dom_fc = dom_ax.collections[0].get_facecolors()
    truth_fc = truth_ax.collections[0].get_facecolors()
    scored = (synth.obs["label"][mask] != "undetermined").to_numpy()
    np.testing.assert_allclose(dom_fc[scored], truth_fc[scored])
    assert not np.allclose(dom_fc[~scored], truth_fc[~scored])  # undetermined spots are grey in the annotation
    truth_legend = [t.get_text() for t in truth_ax.get_legend().get_texts()]
    assert "undetermined" in truth_legend and "tumour" in truth_legend
    assert [t.get_text() for t in dom_ax.get_legend().get_texts()] == ["0", "1", "2", "3"]


def test_domains_colours_by_hungarian_matching_not_greedy_overlap(synth):
    """Two domains overlap annotation X most; the one-to-one matching gives the smaller one Y's colour."""
    one = synth[synth.obs["library_id"] == "slide_0"].copy()
    truth = np.array(["X"] * 58 + ["Y"] * 43 + ["Z"] * 43)
    dom = np.array(["a"] * 30 + ["b"] * 28 + ["a"] * 25 + ["c"] * 57 + ["d"] * 4)
    # contingency: a = (X 30, Y 25), b = (X 28), c = (Y 18, Z 39), d = (Z 4); greedy would colour a and b both X
    one.obs["label"] = pd.Categorical(truth)
    one.obs["stexp_domain"] = pd.Categorical(dom)
    fig = stexp.pl.domains(one, return_fig=True)
    dom_ax, truth_ax = _panels(fig)
    dom_fc, truth_fc = dom_ax.collections[0].get_facecolors(), truth_ax.collections[0].get_facecolors()
    colour_of_truth = {t: truth_fc[np.flatnonzero(truth == t)[0]] for t in "XYZ"}
    colour_of_dom = {d: dom_fc[np.flatnonzero(dom == d)[0]] for d in "abcd"}
    np.testing.assert_allclose(colour_of_dom["a"], colour_of_truth["Y"])
    np.testing.assert_allclose(colour_of_dom["b"], colour_of_truth["X"])
    np.testing.assert_allclose(colour_of_dom["c"], colour_of_truth["Z"])
    # the unmatched domain gets a colour no annotation category or other domain uses
    others = [*colour_of_truth.values(), colour_of_dom["a"], colour_of_dom["b"], colour_of_dom["c"]]
    assert not any(np.allclose(colour_of_dom["d"], c) for c in others)
    # every spot of a domain has its domain's colour
    for d in "abcd":
        np.testing.assert_allclose(dom_fc[dom == d], np.broadcast_to(colour_of_dom[d], dom_fc[dom == d].shape))


def test_domains_plot_without_truth_and_bad_input(synth):
    synth.obs["stexp_domain"] = pd.Categorical(synth.obs["domain"].cat.codes.astype(str))
    fig = stexp.pl.domains(synth, truth_key=None, library_id="slide_2", return_fig=True)
    assert len(_panels(fig)) == 1
    with pytest.raises(KeyError, match="'label'"):
        stexp.pl.domains(synth, library_id="slide_2")
    with pytest.raises(KeyError, match="stexp.tl.domains"):
        stexp.pl.domains(synth, key="nope", truth_key="domain", library_id="slide_2")
    with pytest.raises(ValueError, match="library_id"):
        stexp.pl.domains(synth, truth_key="domain")


@pytest.mark.realdata
@pytest.mark.filterwarnings("ignore:Use `squidpy.read.visium`:FutureWarning")
def test_spatial_genes_on_spatialdata_matches_scanpy_geometry(visium_tiny_dir):
    """Visium read through SpatialData is drawn where scanpy's reader puts the spots, at the same size."""
    import scanpy as sc
    import spatialdata_io

    sdata = spatialdata_io.visium(visium_tiny_dir, dataset_id="tiny", counts_file="filtered_feature_bc_matrix.h5")
    adata = stexp.io.from_spatialdata(sdata)
    ref = sc.read_visium(visium_tiny_dir)
    (ref_lib,) = ref.uns["spatial"]
    ref_sf = ref.uns["spatial"][ref_lib]["scalefactors"]

    target = expression_target(adata)
    adata.layers["stexp_pred"] = target + np.random.default_rng(0).normal(0, 0.3, target.shape)
    gene = adata.var_names[np.argmax(np.asarray(adata.X.sum(axis=0)).ravel())]
    fig = stexp.pl.spatial_genes(adata, gene, img="lowres", return_fig=True)
    ax = _panels(fig)[0]
    assert ax.images[0].get_array().shape[:2] == (600, 600)
    coll = ax.collections[0]
    assert _radius(coll) == pytest.approx(
        ref_sf["spot_diameter_fullres"] * ref_sf["tissue_lowres_scalef"] / 2, rel=0.02
    )
    centres = np.array([(p.vertices.max(axis=0) + p.vertices.min(axis=0)) / 2 for p in coll.get_paths()])
    expected = pd.DataFrame(ref.obsm["spatial"] * ref_sf["tissue_lowres_scalef"], index=ref.obs_names)
    np.testing.assert_allclose(centres, expected.loc[adata.obs_names].to_numpy(), atol=1.0)


def test_scores_reads_what_evaluate_stores(pred, tmp_path):
    import anndata as ad

    from stexp.pl import _scores  # a private module: imported, not reached through the lazy package

    stexp.tl.evaluate(pred, pred_key="stexp_pred")
    pred.layers["pred_mean"] = np.broadcast_to(pred.layers["stexp_pred"].mean(axis=0), pred.shape).copy()
    pred.layers["pred_mean"][:5] += 0.01  # not constant: a poor but scorable prediction
    stexp.tl.evaluate(pred, pred_key="pred_mean")
    pred.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")  # what the user has after saving and loading

    table = _scores.score_table(back)
    assert set(table["model"]) == {"stexp_pred", "pred_mean"}
    ours = table[table["model"] == "stexp_pred"].set_index(["gene", "library_id"])["pcc"]
    stored = back.uns["stexp"]["evaluate"]["stexp_pred"]["pcc"]
    assert ours.loc[("gene_004", "slide_1")] == pytest.approx(stored.loc["gene_004", "slide_1"])

    fig = stexp.pl.scores(back, return_fig=True)
    (ax,) = fig.axes
    means = [line.get_ydata()[0] for line in ax.lines if line.get_gid() == "mean"]
    expected = table.dropna(subset=["pcc"]).groupby("model", sort=False)["pcc"].mean()
    np.testing.assert_allclose(means, expected.to_numpy(), rtol=1e-6)
    labels = [t.get_text().split("\n")[0] for t in ax.get_xticklabels()]
    by_label = dict(zip(labels, means, strict=True))
    assert by_label["stexp_pred"] > by_label["pred_mean"] + 0.5  # the noisy truth beats the near-constant mean

    fig = stexp.pl.scores(back, metric="pcc_acg", by="library_id", return_fig=True)
    (ax,) = fig.axes
    assert ax.get_ylabel() == "pcc_acg per slide"
    per_slide = back.uns["stexp"]["evaluate"]["stexp_pred"]["per_slide"]["pcc_acg"]
    acg = [line.get_ydata()[0] for line in ax.lines if line.get_gid() == "median"]
    assert set(np.round(per_slide.to_numpy(), 6)) <= set(np.round(acg, 6))


def test_scores_of_a_cross_validation_result():
    from types import SimpleNamespace

    rng = np.random.default_rng(3)
    per_fold = pd.DataFrame(
        {
            "model": ["ridge"] * 4 + ["mean"] * 4,
            "library_id": [f"s{i}" for i in range(4)] * 2,
            "pcc_acg": np.r_[rng.normal(0.3, 0.05, 4), rng.normal(0.0, 0.05, 4)],
        }
    )
    result = SimpleNamespace(per_fold=per_fold, layers={"ridge": "stexp_cv_ridge", "mean": "stexp_cv_mean"})
    fig = stexp.pl.scores(result, metric="pcc_acg", return_fig=True)
    (ax,) = fig.axes
    means = [line.get_ydata()[0] for line in ax.lines if line.get_gid() == "mean"]
    np.testing.assert_allclose(means, per_fold.groupby("model", sort=False)["pcc_acg"].mean().to_numpy())
    assert ax.get_ylabel() == "pcc_acg per slide"
    with pytest.raises(KeyError, match="stexp_cv_ridge"):  # per-gene r lives in the AnnData: say where
        stexp.pl.scores(result)
    with pytest.raises(TypeError, match="cross_validate"):
        stexp.pl.scores([1, 2, 3])
