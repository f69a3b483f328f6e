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
