"""Nothing silently wrong, round 3: whole slides, µm/px, embedding, inputs, intervals, domains (issue 24).

Every bad input gets a typed error that names the problem and what to do, raised before the expensive
work, and nothing the user gave is altered. Tiny synthetic data only.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from _features import stat_features
from test_embed import TinyEncoder
from test_wsi import _he, write_pyramid

import stexp
from stexp._layout import UM_PER_PX_RANGE, check_um_per_px


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 300 x 250 px pyramidal TIFF at 2 µm/px: 600 x 500 µm, tissue in the middle."""
    return write_pyramid(tmp_path_factory.mktemp("slides") / "s.tif", _he(250, 300), n_levels=2)


# -- one plausibility rule for µm/px -------------------------------------------------------------------------

BAD_MPP_TYPES = [True, False, "abc", "0.5", None, [0.5], {"mpp": 0.5}, object()]
BAD_MPP_VALUES = [0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-9, 0.049, 50.1, 1e9]


@pytest.mark.parametrize("value", BAD_MPP_TYPES)
def test_um_per_px_that_is_not_a_number_is_a_type_error(value):
    with pytest.raises(TypeError, match=r"^mpp must be a number of µm per pixel"):
        check_um_per_px(value, what="mpp")


@pytest.mark.parametrize("value", BAD_MPP_VALUES)
def test_um_per_px_outside_the_plausible_range(value):
    lo, hi = UM_PER_PX_RANGE
    with pytest.raises(ValueError, match=rf"^mpp.*plausible range \[{lo}, {hi}\]"):
        check_um_per_px(value, what="mpp")


@pytest.mark.parametrize("value", [0.05, 0.25, np.float32(0.5), np.int64(2), np.array(8.0), 50])
def test_um_per_px_plausible_values_pass(value):
    assert check_um_per_px(value) == pytest.approx(float(value))


@pytest.mark.parametrize(("mpp", "error"), [(1e9, ValueError), (1e-9, ValueError), (True, TypeError), ("1", TypeError)])
def test_embed_images_mpp_uses_the_same_rule(synth, mpp, error):
    enc = TinyEncoder()
    with pytest.raises(error, match="mpp"):
        stexp.pp.embed_images(synth, encoder=enc, device="cpu", mpp=mpp)
    assert enc.calls == [] and "X_stexp_tiny" not in synth.obsm


def test_read_wsi_mpp_uses_the_same_rule(slide):
    with pytest.raises(TypeError, match="mpp must be a number"):
        stexp.io.read_wsi(slide, mpp="abc")
    with pytest.raises(TypeError, match="got bool True"):
        stexp.io.read_wsi(slide, mpp=True)
    with pytest.raises(ValueError, match="plausible range"):
        stexp.io.read_wsi(slide, mpp=1e-9)


def test_embed_mpp_refused_before_any_work(synth, slide, monkeypatch):
    # a whole-slide file is read region by region: mpp= (resampling the decoded slide) is refused up front
    wsi = stexp.io.read_wsi(slide, spacing_um=100, spot_diameter_um=55)
    enc = TinyEncoder()
    with pytest.raises(ValueError, match="read region by region"):
        stexp.pp.embed_images(wsi, encoder=enc, device="cpu", mpp=1.0)
    with pytest.raises(ValueError, match="jpeg_quality= changes the whole decoded slide.*read region by region"):
        stexp.pp.embed_images(wsi, encoder=enc, device="cpu", jpeg_quality=30)
    assert enc.calls == []
    # a resampled slide of too many pixels: refused before decoding, naming the library and the sizes
    monkeypatch.setattr(stexp.pp._embed, "MAX_RESAMPLED_PIXELS", 10_000)
    with pytest.raises(ValueError, match=r"library '.*': mpp=0.1 µm/px would resample"):
        stexp.pp.embed_images(synth, encoder=enc, device="cpu", mpp=0.1)
    assert enc.calls == [] and "X_stexp_tiny" not in synth.obsm


# -- read_wsi / grid_spots: sizes checked against the slide first ------------------------------------------------


@pytest.mark.parametrize("option", ["spot_diameter_um", "spacing_um"])
@pytest.mark.parametrize("value", [700.0, 5000.0, 1e6, 1e300])
def test_spot_or_spacing_larger_than_the_slide(slide, option, value):
    with pytest.raises(
        ValueError, match=rf"{re.escape(f'{option}={value:g}')} µm is larger than slide .*s.tif.*600 x 500 µm"
    ):
        stexp.io.read_wsi(slide, **{option: value})


def test_grid_spots_checks_sizes_before_decoding(tmp_path):
    from PIL import Image

    img = _he(100, 120)
    with pytest.raises(ValueError, match=r"spot_diameter_um=1e\+06 µm is larger than the image of library"):
        stexp.io.grid_spots(img, um_per_px=2.0, spot_diameter_um=1e6)
    path = tmp_path / "he.png"
    Image.fromarray(img).save(path)
    with pytest.raises(ValueError, match=r"spacing_um=5000 µm is larger than image .*he.png.*240 x 200 µm"):
        stexp.io.grid_spots(path, um_per_px=2.0, spacing_um=5000)
    with pytest.raises(ValueError, match="grid points"):  # a grid of billions of points is never allocated
        stexp.io.grid_spots(path, um_per_px=2.0, spacing_um=1e-3)


def test_slide_smaller_than_one_spot(tmp_path):
    tiny = write_pyramid(tmp_path / "tiny.tif", _he(20, 20), n_levels=1, tile=16)
    with pytest.raises(ValueError, match=r"spot_diameter_um=55 µm is larger than slide .*tiny.tif.*40 x 40 µm"):
        stexp.io.read_wsi(tiny)
    # a strip narrower than half a row of the grid: no grid point falls on it
    strip = write_pyramid(tmp_path / "strip.tif", _he(16, 400), n_levels=1, tile=16)
    with pytest.raises(ValueError, match="no point of a 100 µm grid falls on the image"):
        stexp.io.read_wsi(strip, spot_diameter_um=20)


def test_large_spots_take_bounded_work(slide):
    """A spot nearly as large as the slide is measured on a coarser mask (no 10 GB disc); the result is right."""
    import time

    t0 = time.perf_counter()
    big = stexp.io.read_wsi(slide, spot_diameter_um=450, spacing_um=450)
    assert time.perf_counter() - t0 < 5
    assert big.n_obs >= 1 and (big.obs["tissue_fraction"] >= 0.5).all()


def test_tissue_fraction_fft_and_coarse_paths_agree():
    from stexp.io._grid import _tissue_fraction

    rng = np.random.default_rng(0)
    from scipy import ndimage

    mask = ndimage.gaussian_filter(rng.random((300, 260)), 8) > 0.5
    x, y = rng.uniform(0, 260, 50), rng.uniform(0, 300, 50)

    def exact(radius):  # the tissue share of each disc, pixel by pixel (outside the mask: glass)
        yy, xx = np.mgrid[:300, :260]
        out = []
        for cx, cy in zip(np.round(x), np.round(y), strict=True):
            k = int(np.ceil(radius))
            oy, ox = np.mgrid[-k : k + 1, -k : k + 1]
            n_disc = int((ox**2 + oy**2 <= radius**2).sum())
            out.append(mask[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2].sum() / n_disc)
        return np.asarray(out)

    np.testing.assert_allclose(_tissue_fraction(mask, x, y, 9.5), exact(9.5), atol=1e-9)  # FFT: same values
    np.testing.assert_allclose(_tissue_fraction(mask, x, y, 100.0), exact(100.0), atol=0.03)  # coarse mask


def test_grayscale_slide_is_refused_by_name(tmp_path):
    import tifffile

    gray = tmp_path / "gray.tif"
    g = _he(250, 300).mean(-1).astype(np.uint8)
    with tifffile.TiffWriter(gray) as tw:
        tw.write(g, tile=(64, 64), photometric="minisblack", resolution=(5e3, 5e3), resolutionunit="CENTIMETER")
    with pytest.raises(ValueError, match=r"gray.tif' is grayscale.*RGB bright-field H&E"):
        stexp.io.read_wsi(gray)
    with pytest.raises(ValueError, match="is grayscale"):  # an RGB array with R = G = B alike
        stexp.io.grid_spots(np.repeat(g[..., None], 3, axis=2), um_per_px=2.0)


def test_truncated_slide_names_the_file(tmp_path, slide):
    raw = slide.read_bytes()
    bad = tmp_path / "cut.tif"
    bad.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(ValueError, match=r"cut.tif.*truncated or damaged"):
        stexp.io.read_wsi(bad)


@pytest.mark.parametrize(
    ("option", "value", "error"),
    [
        ("spot_diameter_um", True, TypeError),
        ("spot_diameter_um", "55", TypeError),
        ("spacing_um", None, TypeError),
        ("spacing_um", -100.0, ValueError),
        ("tissue_threshold", "0.1", TypeError),
        ("tissue_threshold", 2.0, ValueError),
        ("min_tissue_fraction", float("nan"), ValueError),
        ("min_tissue_fraction", [0.5], TypeError),
    ],
)
def test_read_wsi_options_are_named(slide, option, value, error):
    with pytest.raises(error, match=option):
        stexp.io.read_wsi(slide, **{option: value})


def test_duplicated_genes_of_read_wsi_are_named(slide):
    with pytest.raises(ValueError, match=r"duplicates: \['B'\]"):
        stexp.io.read_wsi(slide, genes=["A", "B", "B"])


# -- embed_images: encoder output and encoder_kwargs -----------------------------------------------------------


class NaNEncoder(TinyEncoder):
    """Features NaN for every ``every``-th patch (1: all of them)."""

    every: int = 1

    def __post_init__(self):
        import torch

        every = self.every

        class Broken(torch.nn.Module):
            def forward(self, x):
                y = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
                y[::every] = float("nan")
                return y

        self.module = Broken().eval()


@pytest.mark.parametrize("every", [1, 3])
def test_encoder_returning_nan_stores_nothing(synth, every):
    from stexp.images._cache import cache_dir

    enc = NaNEncoder(name="broken")
    enc.every = every
    enc.__post_init__()
    before = set(cache_dir().rglob("*")) if cache_dir().exists() else set()
    batch = 16
    n_bad = len(range(0, batch, every))
    with pytest.raises(ValueError, match=rf"encoder 'broken' returned NaN or infinite features for {n_bad} of the 16"):
        stexp.pp.embed_images(synth, encoder=enc, device="cpu", batch_size=batch)  # disk cache on
    assert not [k for k in synth.obsm if "broken" in k] and "features" not in synth.uns.get("stexp", {})
    after = set(cache_dir().rglob("*")) if cache_dir().exists() else set()
    assert not [p for p in after - before if p.is_file()]  # nothing cached


@pytest.mark.parametrize("kwargs", ["drop_rate=0.1", [("drop_rate", 0.1)], 0.1, {1: 2}])
def test_encoder_kwargs_must_be_a_mapping(synth, kwargs):
    with pytest.raises(TypeError, match=r"encoder_kwargs.*encoder_kwargs=\{'drop_rate': 0.1\}"):
        stexp.pp.embed_images(synth, encoder="efficientnet_lite0", encoder_kwargs=kwargs, device="cpu")


# -- fit / predict / cross_validate: duplicated var_names --------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    """Two slides of 48 spots with cheap features; ridge calibrated on them (2 held-out groups of 48)."""
    adata = stexp.datasets.synthetic(n_slides=2, n_spots=48, n_genes=12, seed=1)
    key = stat_features(adata)
    model = stexp.tl.fit(adata, model="ridge", features_key=key, calibrate=True)
    return adata, key, model


def _with_duplicates(adata):
    dup = adata.copy()
    names = dup.var_names.tolist()
    names[3] = names[1]
    dup.var_names = names
    return dup, names[1]


def test_duplicated_var_names_are_named_on_fit_predict_and_cross_validate(small):
    adata, key, model = small
    dup, gene = _with_duplicates(adata)
    before = dup.var_names.copy()
    match = rf"1 duplicated gene name\(s\): \['{gene}'\].*var_names_make_unique\(\)"
    with pytest.raises(ValueError, match=match):
        stexp.tl.fit(dup, model="ridge", features_key=key)
    with pytest.raises(ValueError, match=match):
        stexp.tl.predict(dup, model)
    with pytest.raises(ValueError, match=match):
        stexp.tl.cross_validate(dup, model="ridge", features_key=key, genes=list(adata.var_names[:4]))
    assert dup.var_names.equals(before) and "stexp_pred" not in dup.layers and "stexp_pred" not in dup.obsm


# -- intervals: a calibration too small for the coverage asked ---------------------------------------------------


def test_coverage_above_what_the_calibration_supports(small):
    adata, _, model = small
    cal = model.calibration
    assert sorted(np.unique(cal.groups, return_counts=True)[1]) == [48, 48]
    assert cal.max_coverage() == pytest.approx(48 / 49)
    query = adata.copy()
    with pytest.raises(ValueError, match=r"coverage=0.99 needs at least 99 .* largest coverage it supports is 0.9796"):
        stexp.tl.predict(query, model, coverage=0.99)
    assert "stexp_pred" not in query.layers and "stexp_pred_lo" not in query.layers  # refused before predicting
    stexp.tl.predict(query, model, coverage=0.97)  # within what it supports: finite bounds
    assert np.isfinite(query.layers["stexp_pred_lo"]).all() and np.isfinite(query.layers["stexp_pred_hi"]).all()
    assert np.isfinite(stexp.tl.evaluate(query)["coverage"]).all()


def test_max_coverage_by_quantile_mode():
    from stexp.models._calibration import Calibration

    cal = Calibration(
        score="none",
        scores=np.abs(np.random.default_rng(0).normal(size=(8, 2))).astype(np.float32),
        groups=np.array([0, 0, 0, 1, 1, 1, 1, 1]),
        n_calibration=8,
        expected_pcc=np.zeros(2),
        floor=np.ones(2, np.float32),
        bank={},
        info={"quantile_mode": "group_max", "k": 1},
    )
    assert cal.max_coverage() == pytest.approx(3 / 4)
    assert cal.max_coverage("pooled") == pytest.approx(8 / 9)
    assert np.isfinite(cal.quantile(0.75)).all() and np.isfinite(cal.quantile(0.85, "pooled")).all()
    with pytest.raises(ValueError, match="largest coverage it supports is 0.75"):  # 3-spot slides, even at 0.9
        cal.quantile(0.9)
    with pytest.raises(ValueError, match="largest coverage it supports is 0.8889"):
        cal.quantile(0.9, "pooled")


def test_cross_validate_coverage_goes_through_the_same_check(small):
    adata, key, _ = small
    with pytest.raises(ValueError, match="largest coverage it supports"):
        stexp.tl.cross_validate(adata, model="ridge", features_key=key, coverage=0.999, genes=list(adata.var_names))


# -- domains: coordinates; the default pipeline on one spot ----------------------------------------------------


def test_domains_with_nan_coordinates_names_the_spots(synth):
    a = synth.copy()
    a.obsm["spatial"] = np.asarray(a.obsm["spatial"], dtype=np.float64).copy()
    a.obsm["spatial"][[2, 5]] = np.nan
    with pytest.raises(ValueError, match=rf"NaN or infinite centres for 2 of {a.n_obs} spots.*'{a.obs_names[2]}'"):
        stexp.tl.domains(a, layer=None, spatial=0.8, n_domains=3, key_added="dom")
    assert "dom" not in a.obs and np.isnan(a.obsm["spatial"][2]).all()  # nothing added, nothing altered
    stexp.tl.domains(
        a, layer=None, spatial=0.0, n_domains=3, key_added="dom"
    )  # coordinates are not read without spatial=
    assert "dom" in a.obs


def test_default_pipeline_on_one_spot(small):
    adata, key, _ = small
    with pytest.raises(ValueError, match="default needs at least 2 training spots, got 1"):
        stexp.tl.fit(adata[:1].copy(), features_key=key)
    with pytest.raises(ValueError, match="ridge needs at least 2 training spots"):
        stexp.tl.fit(adata[:1].copy(), model="ridge", features_key=key)
    model = stexp.tl.fit(adata[:2].copy(), model="knn", features_key=key, calibrate=False)
    assert model.n_features == adata.obsm[key].shape[1]
