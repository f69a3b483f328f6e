import warnings

import numpy as np
import pandas as pd
import pytest

import stexp


@pytest.fixture
def sdata(synth):
    """One synthetic slide as SpatialData: circles in full-res px, a half-resolution image, a table."""
    import geopandas as gpd
    import spatialdata as sd
    from shapely.geometry import Point
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    one = synth[synth.obs["library_id"] == "slide_0"].copy()
    entry = one.uns["spatial"]["slide_0"]
    xy = one.obsm["spatial"]
    radius = entry["scalefactors"]["spot_diameter_fullres"] / 2
    gdf = gpd.GeoDataFrame(
        {"radius": np.full(one.n_obs, radius)},
        geometry=[Point(x, y) for x, y in xy],
        index=pd.RangeIndex(one.n_obs),
    )
    shapes = ShapesModel.parse(gdf, transformations={"global": Identity()})
    half = entry["images"]["hires"][::2, ::2]
    image = Image2DModel.parse(
        np.moveaxis(half, -1, 0), dims=("c", "y", "x"), transformations={"global": Scale([2.0, 2.0], axes=("y", "x"))}
    )
    table = one.copy()
    del table.uns["spatial"]
    del table.obsm["spatial"]
    table.obs["region"] = pd.Categorical(["spots"] * one.n_obs)
    table.obs["spot_id"] = np.arange(one.n_obs)
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sd.SpatialData(images={"he_image": image}, shapes={"spots": shapes}, tables={"table": table}), one


def test_from_spatialdata_layout(sdata):
    sdata, one = sdata
    adata = stexp.io.from_spatialdata(sdata, library_id="s0")
    np.testing.assert_allclose(adata.obsm["spatial"], one.obsm["spatial"])
    assert list(adata.obs_names) == list(one.obs_names)
    entry = adata.uns["spatial"]["s0"]
    assert entry["scalefactors"]["tissue_he_image_scalef"] == pytest.approx(0.5)
    assert entry["images"]["he_image"].shape == one.uns["spatial"]["slide_0"]["images"]["hires"][::2, ::2].shape
    assert stexp._layout.um_per_px(adata, "s0") == pytest.approx(2.0)  # synthetic data: 2 µm/px
    assert (stexp.io.validate(adata)["n_outside_image"] == 0).all()


def test_spatialdata_missing_elements(sdata):
    sdata, _ = sdata
    with pytest.raises(KeyError, match=r"no table 'counts'.*\['table'\]"):
        stexp.io.from_spatialdata(sdata, table_key="counts")
    with pytest.raises(KeyError, match=r"no image 'he'.*\['he_image'\]"):
        stexp.io.from_spatialdata(sdata, image_key="he")
    with pytest.raises(KeyError, match=r"no shapes element 'cells'.*\['spots'\]"):
        stexp.io.from_spatialdata(sdata, shapes_key="cells")


def test_to_spatialdata_round_trip(sdata):
    sdata, _ = sdata
    adata = stexp.io.from_spatialdata(sdata)
    sub = adata[10:, :20].copy()  # fewer spots and genes than the table
    pred = np.random.default_rng(0).random(sub.shape).astype(np.float32)
    sub.layers["stexp_pred"] = pred
    sub.obsm["X_stexp_test"] = np.ones((sub.n_obs, 4), dtype=np.float32)
    sub.obs["stexp_domain"] = pd.Categorical(["a", "b"] * (sub.n_obs // 2))
    sub.layers["other"] = pred  # not stexp's: not written by default
    stexp.io.to_spatialdata(sub, sdata)
    table = sdata.tables["table"]
    assert "other" not in table.layers
    out = table.layers["stexp_pred"]
    rows = table.obs_names.get_indexer(sub.obs_names)
    np.testing.assert_array_equal(out[rows, :20], pred)
    assert np.isnan(out[:10]).all() and np.isnan(out[:, 20:]).all()
    assert np.isnan(table.obsm["X_stexp_test"][:10]).all() and (table.obsm["X_stexp_test"][10:] == 1).all()
    assert table.obs["stexp_domain"].iloc[10] == "a" and pd.isna(table.obs["stexp_domain"].iloc[0])
    assert "stexp" in table.uns
    with pytest.raises(KeyError, match="'missing'"):
        stexp.io.to_spatialdata(sub, sdata, layers=["missing"])
    stranger = sub.copy()
    stranger.obs_names = [f"x{i}" for i in range(stranger.n_obs)]
    with pytest.raises(ValueError, match="no spot of adata"):
        stexp.io.to_spatialdata(stranger, sdata)


def test_multiscale_image_read_lazily_from_the_zarr_store(sdata, tmp_path, monkeypatch):
    """A backed multiscale image: a thumbnail in memory, patches read region by region from the store."""
    import spatialdata as sd
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Identity

    from stexp.images import read_patches, slide_view

    sdata, one = sdata
    full = one.uns["spatial"]["slide_0"]["images"]["hires"]  # synthetic: the hires image is full resolution
    sdata.images["he_image"] = Image2DModel.parse(
        np.moveaxis(full, -1, 0), dims=("c", "y", "x"), scale_factors=[2, 2], chunks=(3, 128, 128),
        transformations={"global": Identity()},
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata.write(tmp_path / "s.zarr")
        backed = sd.read_zarr(tmp_path / "s.zarr")
    monkeypatch.setattr("stexp.io._spatialdata.THUMBNAIL_PX", 300)  # the synthetic slide is small
    adata = stexp.io.from_spatialdata(backed, library_id="s0")
    entry = adata.uns["spatial"]["s0"]
    assert entry["metadata"]["source_image_path"].endswith("images/he_image")
    thumb = entry["images"]["he_image"]
    assert max(thumb.shape[:2]) < max(full.shape[:2])  # only a coarse level was computed, for plots
    view = slide_view(adata, "s0")
    assert view.lazy and view.size == (full.shape[1], full.shape[0])
    lazy = read_patches(adata, "s0", np.arange(20), patch_um=60, out_px=24)
    ref = read_patches(one, "slide_0", np.arange(20), patch_um=60, out_px=24)
    assert np.abs(lazy.astype(int) - ref).max() <= 1
    # in memory (not backed): the level the patches need, computed; no source path
    mem = stexp.io.from_spatialdata(sdata, library_id="s0")
    assert "source_image_path" not in mem.uns["spatial"]["s0"]["metadata"]


def test_polygon_spots_are_sized_from_their_geometry(sdata):
    import geopandas as gpd
    from shapely.geometry import box
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    sdata, one = sdata
    xy = one.obsm["spatial"]
    side = 8.0  # px: e.g. Visium HD 16 µm bins at 2 µm/px
    squares = gpd.GeoDataFrame(
        geometry=[box(x - side / 2, y - side / 2, x + side / 2, y + side / 2) for x, y in xy],
        index=pd.RangeIndex(one.n_obs),
    )
    sdata.shapes["spots"] = ShapesModel.parse(squares, transformations={"global": Identity()})
    with pytest.raises(ValueError, match="um_per_px="):
        stexp.io.from_spatialdata(sdata)
    adata = stexp.io.from_spatialdata(sdata, um_per_px=2.0, library_id="s0")
    sf = adata.uns["spatial"]["s0"]["scalefactors"]
    assert sf["microns_per_pixel"] == pytest.approx(2.0)
    assert sf["spot_diameter_um"] == pytest.approx(2 * side * 2.0 / np.sqrt(np.pi))  # equal-area circle
    np.testing.assert_allclose(adata.obsm["spatial"], xy)


def test_to_spatialdata_writes_panel_only_predictions(sdata):
    from stexp.tl._storage import write_prediction

    sdata, _ = sdata
    adata = stexp.io.from_spatialdata(sdata)
    sub = adata[5:].copy()
    genes = list(adata.var_names[:7])
    values = np.random.default_rng(1).random((sub.n_obs, 7)).astype(np.float32)
    assert write_prediction(sub, "stexp_pred", genes, values) == "adata.obsm['stexp_pred']"
    stexp.io.to_spatialdata(sub, sdata)
    out = sdata.tables["table"].obsm["stexp_pred"]
    assert list(out.columns) == genes and np.isnan(out.iloc[:5].to_numpy()).all()
    np.testing.assert_array_equal(out.iloc[5:].to_numpy(), values)
