import numpy as np
import pandas as pd
import pytest

import stexp
from stexp.io._validate import check_spots_in_image


def test_validate_summary(synth):
    table = stexp.io.validate(synth)
    assert list(table.index) == ["slide_0", "slide_1", "slide_2"]
    assert (table["n_spots"] == 144).all()
    assert np.allclose(table["um_per_px"], 2.0)
    assert (table["spot_diameter_um"] == 55.0).all()
    assert table["has_image"].all() and (table["n_outside_image"] == 0).all()
    assert "hires" in table.loc["slide_0", "images"]


def test_library_without_spatial_entry(synth):
    del synth.uns["spatial"]["slide_1"]
    with pytest.raises(KeyError, match="slide_1"):
        stexp.io.validate(synth)


def test_scalefactors_missing(synth):
    synth.uns["spatial"]["slide_2"]["scalefactors"] = {}
    with pytest.raises(KeyError, match="'slide_2'.*scalefactors"):
        stexp.io.validate(synth)


def test_image_scalef_missing(synth):
    del synth.uns["spatial"]["slide_0"]["scalefactors"]["tissue_lowres_scalef"]
    with pytest.raises(KeyError, match="tissue_lowres_scalef"):
        stexp.io.validate(synth)


def test_missing_image(synth):
    synth.uns["spatial"]["slide_0"]["images"] = {}
    with pytest.raises(ValueError, match="'slide_0' has no image"):
        stexp.io.validate(synth)
    synth.uns["spatial"]["slide_0"]["metadata"]["has_image"] = False
    table = stexp.io.validate(synth)
    assert not table.loc["slide_0", "has_image"] and pd.isna(table.loc["slide_0", "n_outside_image"])


def test_image_path_does_not_exist(synth, tmp_path):
    synth.uns["spatial"]["slide_0"]["images"] = {}
    synth.uns["spatial"]["slide_0"]["metadata"]["source_image_path"] = str(tmp_path / "gone.tif")
    with pytest.raises(FileNotFoundError, match="gone.tif"):
        stexp.io.validate(synth)


def test_nan_and_negative_counts(synth):
    bad = synth.copy()
    bad.X.data[5] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        stexp.io.validate(bad)
    synth.X.data[7] = -1
    with pytest.raises(ValueError, match="1 negative"):
        stexp.io.validate(synth)


def test_check_spots_in_image(synth, caplog):
    mask_lib = (synth.obs["library_id"] == "slide_1").to_numpy()
    xy = synth.obsm["spatial"].copy()
    idx = np.flatnonzero(mask_lib)[:3]
    xy[idx, 0] = -5.0
    synth.obsm["spatial"] = xy
    with pytest.raises(ValueError, match=r"'slide_1': 3 of 144 spots lie outside.*x in \[-5.0, -5.0\]"):
        check_spots_in_image(synth, "slide_1")
    inside = check_spots_in_image(synth, "slide_1", on_outside="drop")
    assert inside.shape == (144,) and (~inside).sum() == 3 and not inside[:3].any()
    assert "3 of 144 spots" in caplog.text
    assert check_spots_in_image(synth, "slide_0").all()
    assert stexp.io.validate(synth).loc["slide_1", "n_outside_image"] == 3


def test_check_spots_extent_from_source_image(synth, tmp_path):
    from PIL import Image

    # a full-res file smaller than the in-memory image: the file's header wins
    path = tmp_path / "full.png"
    Image.fromarray(np.zeros((50, 60, 3), dtype=np.uint8)).save(path)
    synth.uns["spatial"]["slide_0"]["metadata"]["source_image_path"] = str(path)
    inside = check_spots_in_image(synth, "slide_0", on_outside="drop")
    xy = synth.obsm["spatial"][(synth.obs["library_id"] == "slide_0").to_numpy()]
    np.testing.assert_array_equal(inside, (xy[:, 0] < 60) & (xy[:, 1] < 50))
    synth.uns["spatial"]["slide_2"]["images"] = {}
    with pytest.raises(ValueError, match="'slide_2' has no image"):
        check_spots_in_image(synth, "slide_2")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_counts_named(synth, bad):
    synth.X = synth.X.tocsr()
    r, c = 5, 3
    x = synth.X.toarray()
    x[r, c] = bad
    x[r + 1, c] = bad
    from scipy import sparse

    spot, gene = synth.obs_names[r], synth.var_names[c]
    for X in (sparse.csr_matrix(x), x):
        synth.X = X
        with pytest.raises(
            ValueError, match=rf"adata.X holds 2 NaN or infinite values \(e.g. spot '{spot}', gene '{gene}'\)"
        ):
            stexp.io.validate(synth)


def test_non_finite_counts_in_a_layer(synth):
    synth.layers["counts"] = synth.X.copy()
    synth.layers["counts"].data[0] = np.inf
    stexp.io.validate(synth)  # the layer is only checked when named
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\] holds 1 NaN or infinite"):
        stexp.io.validate(synth, layer="counts")
    with pytest.raises(KeyError, match="'raw'"):
        stexp.io.validate(synth, layer="raw")


def test_negative_counts_named(synth):
    x = synth.X.toarray()
    x[2, 4] = -3
    synth.X = x
    with pytest.raises(
        ValueError,
        match=rf"1 negative values \(min -3, e.g. spot '{synth.obs_names[2]}', gene '{synth.var_names[4]}'\)",
    ):
        stexp.io.validate(synth)


def test_non_numeric_counts(synth):
    synth.X = synth.X.toarray().astype(str)
    with pytest.raises(ValueError, match="must be numeric counts"):
        stexp.io.validate(synth)


def test_duplicated_var_and_obs_names(synth):
    genes = list(synth.var_names)
    genes[7] = genes[3]
    bad = synth.copy()
    bad.var_names = genes
    with pytest.raises(ValueError, match=rf"adata.var_names holds 1 duplicated gene name\(s\), e.g. \['{genes[3]}'\]"):
        stexp.io.validate(bad)
    spots = list(synth.obs_names)
    spots[10] = spots[0]
    synth.obs_names = spots
    with pytest.raises(ValueError, match=rf"adata.obs_names holds 1 duplicated spot name\(s\), e.g. \['{spots[0]}'\]"):
        stexp.io.validate(synth)


def test_validate_does_not_modify(synth):
    before = synth.copy()
    stexp.io.validate(synth)
    assert (synth.X != before.X).nnz == 0
    assert list(synth.obs.columns) == list(before.obs.columns) and list(synth.uns) == list(before.uns)
