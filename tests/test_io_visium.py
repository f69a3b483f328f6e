import warnings

import numpy as np
import pytest

import stexp


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_read_visium_adds_units_only(visium_tiny_dir, quiet):
    import squidpy as sq

    ref = sq.read.visium(visium_tiny_dir)
    adata = stexp.io.read_visium(visium_tiny_dir)
    (lib,) = adata.uns["spatial"]
    assert (adata.X != ref.X).nnz == 0
    np.testing.assert_array_equal(adata.obsm["spatial"], ref.obsm["spatial"])
    assert list(adata.obs_names) == list(ref.obs_names)
    sf, ref_sf = adata.uns["spatial"][lib]["scalefactors"], ref.uns["spatial"][lib]["scalefactors"]
    assert {k: sf[k] for k in ref_sf} == dict(ref_sf)
    assert sf["spot_diameter_um"] == 55.0
    assert sf["microns_per_pixel"] == pytest.approx(55.0 / ref_sf["spot_diameter_fullres"])
    assert (adata.obs["library_id"] == lib).all()
    named = stexp.io.read_visium(visium_tiny_dir, library_id="tiny")
    assert list(named.uns["spatial"]) == ["tiny"] and set(named.obs["library_id"]) == {"tiny"}


def test_three_readers_agree(visium_tiny_dir, quiet):
    import scanpy as sc
    import spatialdata_io

    sq_ad = stexp.io.read_visium(visium_tiny_dir, library_id="tiny")
    sc_ad = sc.read_visium(visium_tiny_dir, library_id="tiny")
    sd_ad = stexp.io.from_spatialdata(spatialdata_io.visium(visium_tiny_dir, dataset_id="tiny"))
    assert set(sq_ad.obs_names) == set(sc_ad.obs_names) == set(sd_ad.obs_names)
    order = sq_ad.obs_names
    for other in (sc_ad, sd_ad):
        np.testing.assert_allclose(other[order].obsm["spatial"], sq_ad.obsm["spatial"])
        np.testing.assert_array_equal(other[order].obs["array_row"], sq_ad.obs["array_row"])
        assert stexp._layout.um_per_px(other, "tiny") == pytest.approx(stexp._layout.um_per_px(sq_ad, "tiny"))
    # the lowres image and its scale factor agree too
    np.testing.assert_array_equal(
        sd_ad.uns["spatial"]["tiny"]["images"]["lowres"], sq_ad.uns["spatial"]["tiny"]["images"]["lowres"][..., :3]
    )
    for name, a in (("squidpy", sq_ad), ("scanpy", sc_ad), ("spatialdata", sd_ad)):
        table = stexp.io.validate(a)
        assert table.loc["tiny", "n_spots"] == 100, name
        assert table.loc["tiny", "n_outside_image"] == 0, name
