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
