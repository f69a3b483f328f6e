"""The patch reader: image choice, µm -> px geometry, white padding, bad input, real slides."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from stexp._layout import library_mask
from stexp.images._patches import default_patch_um, read_patches
from stexp.images._slide import slide_view


def best_source(adata, lib):
    view = slide_view(adata, lib)
    return view.source, view.scale


LIB = "slide_0"


def _rows(adata, lib=LIB):
    return np.flatnonzero(library_mask(adata, lib))


def _paint(adata, lib, fn):
    """Replace every in-memory image of ``lib`` by ``fn(height, width, scale)``."""
    entry = adata.uns["spatial"][lib]
    for res, img in entry["images"].items():
        h, w = np.shape(img)[:2]
        entry["images"][res] = fn(h, w, entry["scalefactors"][f"tissue_{res}_scalef"])


def test_shape_default_size_and_best_image(synth):
    # synthetic: 2 µm/px, 55 µm spots -> default patch 82.5 µm
    assert default_patch_um(synth, LIB) == pytest.approx(82.5)
    assert best_source(synth, LIB) == ("hires", 1.0)
    idx = _rows(synth)[:5]
    p = read_patches(synth, LIB, idx, out_px=32)
    assert p.shape == (5, 32, 32, 3) and p.dtype == np.uint8
    # all spots of the library by default
    assert read_patches(synth, LIB, out_px=8).shape == (len(_rows(synth)), 8, 8, 3)


def test_patch_content_follows_the_spot_centre(synth):
    # left half of the image red, right half blue (in full-res px: boundary at x = 300)
    def halves(h, w, scale):
        img = np.zeros((h, w, 3), np.uint8)
        cut = round(300 * scale)
        img[:, :cut, 0] = 255
        img[:, cut:, 2] = 255
        return img

    _paint(synth, LIB, halves)
    i = _rows(synth)[0]
    synth.obsm["spatial"][i] = (300.0, 300.0)
    p = read_patches(synth, LIB, [i], out_px=20)[0].astype(int)
    assert p[:, :8, 0].min() > 200 and p[:, :8, 2].max() < 50  # left: red
    assert p[:, 12:, 2].min() > 200 and p[:, 12:, 0].max() < 50  # right: blue


def test_resolution_independent(synth):
    # a smooth gradient: the hires (scale 1) and lowres (scale 0.25) images give nearly the same patch
    def gradient(h, w, scale):
        y, x = np.mgrid[0:h, 0:w] / scale
        return np.stack([x / 3, y / 3, np.full_like(x, 128.0)], axis=-1).clip(0, 255).astype(np.uint8)

    _paint(synth, LIB, gradient)
    idx = _rows(synth)[20:30]
    hi = read_patches(synth, LIB, idx, out_px=16).astype(float)
    del synth.uns["spatial"][LIB]["images"]["hires"]
    assert best_source(synth, LIB) == ("lowres", 0.25)
    lo = read_patches(synth, LIB, idx, out_px=16).astype(float)
    assert np.abs(hi - lo).mean() < 3.0


def test_white_padding_at_the_border(synth):
    _paint(synth, LIB, lambda h, w, s: np.zeros((h, w, 3), np.uint8))  # black slide
    i = _rows(synth)[0]
    synth.obsm["spatial"][i] = (1.0, 1.0)  # inside, but the patch hangs over the top-left corner
    p = read_patches(synth, LIB, [i], out_px=20)[0]
    assert (p[:4, :4] == 255).all()  # outside the image: white
    assert (p[-4:, -4:] == 0).all()  # inside the image: the black slide


def test_full_resolution_file_is_preferred(synth, tmp_path):
    from PIL import Image

    entry = synth.uns["spatial"][LIB]
    full = np.zeros((700, 800, 3), np.uint8)
    full[..., 1] = 200  # green full-res file; the in-memory images stay as they are
    path = tmp_path / "full.png"
    Image.fromarray(full).save(path)
    entry["metadata"]["source_image_path"] = str(path)
    assert best_source(synth, LIB) == ("source_image_path", 1.0)
    view = slide_view(synth, LIB)
    assert view.size == (800, 700) and view.scale == 1.0 and view.extent == (800.0, 700.0)
    p = read_patches(synth, LIB, _rows(synth)[:3], out_px=8, image=view.decode())
    assert (p[..., 1] == 200).all() and (p[..., 0] == 0).all()
    # an image of another size than the library's is refused
    with pytest.raises(ValueError, match="800 x 700"):
        read_patches(synth, LIB, _rows(synth)[:3], out_px=8, image=Image.new("RGB", (10, 10)))
    # fingerprint follows the content
    fp = view.fingerprint()
    full[0, 0, 0] = 1
    Image.fromarray(full).save(path)
    assert slide_view(synth, LIB).fingerprint() != fp


def test_patch_um_out_of_range(synth):
    idx = _rows(synth)[:2]
    with pytest.raises(ValueError, match="smaller than one pixel"):
        read_patches(synth, LIB, idx, patch_um=1.0)  # 0.5 px at 2 µm/px
    with pytest.raises(ValueError, match="larger than its image"):
        read_patches(synth, LIB, idx, patch_um=5000.0)
    with pytest.raises(ValueError, match="positive"):
        read_patches(synth, LIB, idx, patch_um=-3)


def test_library_without_image(synth):
    synth.uns["spatial"][LIB]["images"] = {}
    with pytest.raises(ValueError, match="slide_0.*no image"):
        read_patches(synth, LIB, _rows(synth)[:2])
    with pytest.raises(ValueError, match="slide_0.*no image"):
        best_source(synth, LIB)


def test_missing_scalefactor(synth):
    del synth.uns["spatial"][LIB]["scalefactors"]["tissue_hires_scalef"]
    with pytest.raises(KeyError, match="tissue_hires_scalef"):
        best_source(synth, LIB)


def test_indices_of_another_library(synth):
    with pytest.raises(ValueError, match="not spots of library 'slide_0'"):
        read_patches(synth, LIB, _rows(synth, "slide_1")[:2])


def test_spots_outside_the_image(synth, caplog):
    rows = _rows(synth)
    synth.obsm["spatial"][rows[3]] = (-500.0, 10.0)
    before = synth.obsm["spatial"].copy()
    with pytest.raises(ValueError, match="slide_0.*1 of .* outside"):
        read_patches(synth, LIB, rows[:5], out_px=8)
    with caplog.at_level(logging.WARNING, logger="stexp"):
        p = read_patches(synth, LIB, rows[:5], out_px=8, on_outside="drop")
    assert "outside" in caplog.text
    assert p.shape == (5, 8, 8, 3)
    assert (p[3] == 255).all() and not (p[0] == 255).all()
    np.testing.assert_array_equal(synth.obsm["spatial"], before)  # the user's data untouched
    assert synth.n_obs == 432


# ---------------------------------------------------------------- real data (one section, few spots)


@pytest.fixture(scope="module")
def b4(her2st_dir):
    import stexp

    return stexp.datasets.her2st("B4", path=her2st_dir, download=False)


def test_real_patches_on_tissue_and_resolution_independent(b4):
    lib = b4.obs["library_id"].astype(str).iloc[0]
    assert best_source(b4, lib)[0] == "source_image_path"
    idx = _rows(b4, lib)[::40][:6]
    slide = slide_view(b4, lib).decode()
    full = read_patches(b4, lib, idx, out_px=32, image=slide).astype(float)
    # tissue is darker than the slide background (the brightest corner of the slide)
    im = np.asarray(slide.reduce(16), dtype=float)
    corners = [im[:40, :40], im[:40, -40:], im[-40:, :40], im[-40:, -40:]]
    background = max(c.mean() for c in corners)
    assert full.mean() < background - 20
    del slide
    # the same spots read from the in-memory hires image
    hires = b4.copy()
    hires.uns["spatial"][lib]["metadata"]["source_image_path"] = None
    assert best_source(hires, lib)[0] == "hires"
    low = read_patches(hires, lib, idx, out_px=32).astype(float)
    assert np.abs(full - low).mean() < 12.0
    assert np.corrcoef(full.ravel(), low.ravel())[0, 1] > 0.9


def test_patch_dataset_drops_spots_outside_their_image(synth):
    from stexp.images import PatchDataset

    rows = _rows(synth)
    synth.obsm["spatial"][rows[0]] = (-500.0, -500.0)
    with pytest.raises(ValueError, match="outside"):
        PatchDataset.from_adata(synth, rows, out_px=8)
    ds = PatchDataset.from_adata(synth, rows, out_px=8, on_outside="drop", augment=False)
    assert len(ds) == len(rows) - 1 and rows[0] not in ds.positions
    assert ds[0][1] == rows[1]  # positions follow the kept spots


def test_patch_dataset_hed_jitter_changes_stain_not_geometry(synth):
    from stexp.images import PatchDataset

    rows = _rows(synth)[:4]
    plain = PatchDataset.from_adata(synth, rows, out_px=32, augment=True, color_jitter=0.0)
    hed = PatchDataset.from_adata(synth, rows, out_px=32, augment=True, color_jitter=0.0, hed_jitter=0.2)

    def sorted_values(x):  # per channel, invariant to flips and 90° rotations
        return np.sort(x.numpy().reshape(3, -1), axis=1)

    for i in range(len(rows)):
        x_plain, x_hed = plain[i][0], hed[i][0]
        assert x_hed.shape == x_plain.shape == (3, 32, 32)
        reference = sorted_values(PatchDataset.from_adata(synth, rows[i : i + 1], out_px=32, augment=False)[0][0])
        np.testing.assert_allclose(sorted_values(x_plain), reference, atol=1e-6)  # dihedral only
        assert not np.allclose(sorted_values(x_hed), reference, atol=1e-3)  # the stain moved
    with pytest.raises(ValueError, match="hed_jitter"):
        PatchDataset.from_adata(synth, rows, out_px=8, hed_jitter=1.0)
