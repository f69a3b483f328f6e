"""Whole-slide images: region reading at a pyramid level, µm/px from the file, read_wsi and ``stexp predict``."""

from __future__ import annotations

import numpy as np
import pytest

import stexp
from stexp.images._patches import PatchPlan, cut_patches, read_patches
from stexp.images._slide import RegionReader, SlideView, slide_view

UM_PER_PX = 2.0


def _he(h: int = 600, w: int = 800, seed: int = 0) -> np.ndarray:
    """A smooth pink-purple 'tissue' blob on white glass with texture, uint8 RGB."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    tissue = ((yy - h / 2) / (0.38 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2 < 1
    noise = ndimage.gaussian_filter(rng.normal(size=(h, w, 3)), (3, 3, 0)) * 400
    img = np.full((h, w, 3), 255.0)
    img[tissue] = np.array([200.0, 90.0, 170.0]) + noise[tissue]
    return np.clip(img, 0, 255).astype(np.uint8)


def _levels(img: np.ndarray, n: int) -> list[np.ndarray]:
    """Pyramid by 2x2 averaging."""
    out = [img]
    for _ in range(n - 1):
        a = out[-1].astype(np.float32)
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        a = a[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3))
        out.append(np.rint(a).astype(np.uint8))
    return out


def write_pyramid(path, img, *, n_levels=3, mpp=UM_PER_PX, kind="tiff", tile=64):
    """A tiled pyramidal TIFF: ``kind`` "tiff" (resolution tags; mpp=None: none), "ome" (PhysicalSize), "svs"."""
    import tifffile

    levels = _levels(img, n_levels)
    with tifffile.TiffWriter(path) as tw:
        for i, a in enumerate(levels):
            kw: dict = {"tile": (tile, tile), "photometric": "rgb"}
            if kind == "svs":
                h, w = img.shape[:2]
                desc = f"Aperio Image Library v12.0.0\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) RAW|AppMag = 20"
                kw["description"] = desc + (f"|MPP = {mpp}" if mpp else "")
                if i:
                    kw["subfiletype"] = 1
            elif i == 0:
                kw["subifds"] = n_levels - 1
                if kind == "ome":
                    kw["metadata"] = {"axes": "YXS"} | (
                        {"PhysicalSizeX": mpp, "PhysicalSizeY": mpp} if mpp is not None else {}
                    )
                elif mpp is not None:
                    kw.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
                else:
                    kw["metadata"] = None
            else:
                kw["subfiletype"] = 1
                kw.setdefault("metadata", None)
            tw.write(a, **kw)
    return path


@pytest.fixture(scope="module")
def image():
    return _he()


@pytest.mark.parametrize("kind", ["tiff", "ome", "svs"])
def test_levels_and_mpp_from_metadata(tmp_path, image, kind):
    path = write_pyramid(
        tmp_path / f"s.{'svs' if kind == 'svs' else 'ome.tif' if kind == 'ome' else 'tif'}", image, kind=kind, mpp=0.5
    )
    with RegionReader(path) as r:
        assert r.level_dimensions == ((800, 600), (400, 300), (200, 150))
        assert r.level_downsamples == pytest.approx((1, 2, 4))
        assert r.um_per_px() == pytest.approx(0.5)
        # level choice: the coarsest level that still has the pixels a patch needs (never upsampled)
        assert [r.best_level(d) for d in (0.5, 1.0, 1.9, 2.0, 3.9, 4.0, 50.0)] == [0, 0, 0, 1, 1, 2, 2]
        # level 0 regions are the pixels, white outside the slide
        np.testing.assert_array_equal(r.read(0, 100, 50, 30, 20), image[50:70, 100:130])
        np.testing.assert_array_equal(r.read(1, 10, 20, 5, 5), _levels(image, 2)[1][20:25, 10:15])
        edge = r.read(0, 790, 590, 20, 20)
        np.testing.assert_array_equal(edge[:10, :10], image[590:, 790:])
        assert (edge[10:] == 255).all() and (edge[:, 10:] == 255).all()
        assert (r.read(2, -50, -50, 10, 10) == 255).all()


def test_missing_and_inconsistent_mpp(tmp_path, image):
    path = write_pyramid(tmp_path / "nompp.tif", image, mpp=None)
    with RegionReader(path) as r:
        assert r.um_per_px() is None
    with pytest.raises(ValueError, match="pass mpp="):
        stexp.io.read_wsi(path)
    assert stexp.io.read_wsi(path, mpp=UM_PER_PX, spacing_um=100, spot_diameter_um=55).n_obs > 0

    import tifffile

    bad = tmp_path / "aniso.tif"
    tifffile.imwrite(bad, image, tile=(64, 64), photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.9),
                     resolutionunit="CENTIMETER")  # fmt: skip
    with pytest.raises(ValueError, match=r"differs in x and y.*pass mpp="):
        stexp.io.read_wsi(bad)
    inch = tmp_path / "dpi72.tif"  # TIFF's default 72 dpi is not a microscope's pixel size
    tifffile.imwrite(inch, image, tile=(64, 64), photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(ValueError, match="mpp="):
        stexp.io.read_wsi(inch)


def test_unreadable_slide(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide" * 100)
    with pytest.raises(ValueError, match="broken.svs"):
        RegionReader(bad)
    with pytest.raises(FileNotFoundError):
        stexp.io.read_wsi(tmp_path / "gone.svs")


def _lazy_and_memory(tmp_path, image, **kw):
    """(AnnData on the pyramidal file, the same AnnData with the image in memory instead)."""
    path = write_pyramid(tmp_path / "slide.tif", image, **kw)
    lazy = stexp.io.read_wsi(path, spacing_um=60, spot_diameter_um=40)
    mem = lazy.copy()
    entry = mem.uns["spatial"][mem.obs["library_id"].iloc[0]]
    entry["metadata"].pop("source_image_path")
    entry["images"]["hires"] = image
    entry["scalefactors"]["tissue_hires_scalef"] = 1.0
    entry["images"].pop("lowres")
    entry["scalefactors"].pop("tissue_lowres_scalef")
    return lazy, mem


def test_read_wsi_layout(tmp_path, image):
    lazy, _ = _lazy_and_memory(tmp_path, image)
    lib = lazy.obs["library_id"].iloc[0]
    assert lib == "slide"
    entry = lazy.uns["spatial"][lib]
    sf = entry["scalefactors"]
    assert sf["microns_per_pixel"] == pytest.approx(UM_PER_PX)
    assert sf["spot_diameter_fullres"] == pytest.approx(40 / UM_PER_PX)
    assert entry["metadata"]["source_image_path"].endswith("slide.tif")
    hires = entry["images"]["hires"]
    assert hires.shape[1] == pytest.approx(800 * sf["tissue_hires_scalef"], abs=1)
    xy = lazy.obsm["spatial"]
    assert (xy[:, 0] < 800).all() and (xy[:, 1] < 600).all()
    # spots lie on the tissue blob (the thumbnail's tissue mask at full resolution)
    inside = ((xy[:, 1] - 300) / 228) ** 2 + ((xy[:, 0] - 400) / 320) ** 2
    assert np.quantile(inside, 0.95) < 1.1
    view = slide_view(lazy, lib)
    assert view.lazy and view.size == (800, 600)
    # the same pixels as a PNG (decoded whole, at reduced scale for the thumbnail): the same grid spots
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "slide.png")
    with pytest.raises(ValueError, match="pass mpp="):
        stexp.io.read_wsi(tmp_path / "slide.png")
    png = stexp.io.read_wsi(tmp_path / "slide.png", mpp=UM_PER_PX, spacing_um=60, spot_diameter_um=40)
    common = png.obs_names.intersection(lazy.obs_names)
    assert len(common) >= 0.95 * max(png.n_obs, lazy.n_obs)
    np.testing.assert_allclose(png[common].obsm["spatial"], lazy[common].obsm["spatial"])
    assert png.uns["spatial"][lib]["metadata"]["source_image_path"].endswith("slide.png")


def test_patches_from_pyramid_match_decoded_image(tmp_path, image):
    lazy, mem = _lazy_and_memory(tmp_path, image)
    lib = lazy.obs["library_id"].iloc[0]
    # 60 µm patches = 30 px at level 0; at out_px 32 level 0 is read: same pixels as the decoded image
    a = read_patches(lazy, lib, patch_um=60, out_px=32)
    b = read_patches(mem, lib, patch_um=60, out_px=32)
    assert a.shape == b.shape == (lazy.n_obs, 32, 32, 3)
    assert np.abs(a.astype(int) - b).max() <= 1
    # at out_px 8 the level with downsample 2 (15 px per patch) is read: resampling noise only
    a = read_patches(lazy, lib, patch_um=60, out_px=8)
    b = read_patches(mem, lib, patch_um=60, out_px=8)
    assert np.abs(a.astype(float) - b).mean() < 3


def test_stream_visits_blocks_and_pads_border_white(tmp_path, image):
    path = write_pyramid(tmp_path / "slide.tif", image)
    view = SlideView("s", "source_image_path", 1.0, (800, 600), path=path)
    centres = np.array([[5.0, 5.0], [795.0, 300.0], [400.0, 598.0], [700.0, 50.0], [100.0, 500.0], [-500.0, 0]])
    inside = np.array([True, True, True, True, True, False])
    plan = PatchPlan(view, centres, inside, 40.0, 80.0)
    seen = []
    for rows, patches in plan.stream(20, 2, block_px=256):
        seen.extend(rows.tolist())
        assert len(rows) == len(patches) <= 2
    assert sorted(seen) == list(range(6))
    got = plan.read(20)
    from PIL import Image

    ref = cut_patches(Image.fromarray(image), centres[:5], 40.0, 20)
    assert np.abs(got[:5].astype(int) - ref).max() <= 1
    assert (got[5] == 255).all()
    assert (got[0, :8, :8] == 255).all()  # the part of the corner patch beyond the slide is white


@pytest.fixture(scope="module")
def pool_encoder():
    """A parameter-free encoder: the mean colour of the patch (deterministic)."""
    from stexp.images._encoders import register_encoder

    @register_encoder("test_wsi_pool", out_dim=3, input_px=16)
    def _build(pretrained: bool):
        import torch

        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    return "test_wsi_pool"


def test_embed_lazy_equals_in_memory(tmp_path, image, pool_encoder):
    lazy, mem = _lazy_and_memory(tmp_path, image)
    for a in (lazy, mem):
        stexp.pp.embed_images(a, encoder=pool_encoder, weights=None, patch_um=40, cache=False)
    key = "X_stexp_test_wsi_pool"
    np.testing.assert_allclose(lazy.obsm[key], mem.obsm[key], atol=0.02)


def _model_dir(tmp_path, image, encoder):
    """A ridge model on the test encoder's features of pseudo-spots with made-up counts, saved."""
    import scipy.sparse as sp

    path = write_pyramid(tmp_path / "train.tif", image)
    adata = stexp.io.read_wsi(path, spacing_um=60, spot_diameter_um=40, genes=["G1", "G2", "G3"])
    stexp.pp.embed_images(adata, encoder=encoder, weights=None, patch_um=40, cache=False)
    f = adata.obsm["X_stexp_test_wsi_pool"]
    rng = np.random.default_rng(0)
    counts = rng.poisson(np.exp(2 + np.column_stack([f[:, 0], f[:, 1], -f[:, 2]]) * 3) * 5)
    adata.X = sp.csr_matrix(counts.astype(np.float32))
    adata.uns["stexp"].pop("unmeasured", None)
    adata.obs["library_id"] = adata.obs["library_id"].cat.rename_categories(["train"])
    adata.uns["spatial"] = {"train": adata.uns["spatial"]["train"]}
    model = stexp.tl.fit(adata, model="ridge", features_key="X_stexp_test_wsi_pool")
    return model.save(tmp_path / "model")


def test_cli_predict_and_exit_codes(tmp_path, image, pool_encoder, capsys):
    from stexp.cli import main

    model_dir = _model_dir(tmp_path, image, pool_encoder)
    slide = write_pyramid(tmp_path / "slide.ome.tif", image, kind="ome")
    out = tmp_path / "pred.h5ad"
    argv = ["predict", str(slide), "--model", str(model_dir), "--out", str(out), "--spacing-um", "60",
            "--spot-diameter-um", "40", "--batch-size", "7", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for word in ("spots", "genes     3 predicted", "time", "peak", "written", "\nshift     ", "\ntrusted   "):
        assert word in printed
    import anndata as ad

    pred = ad.read_h5ad(out)
    assert pred.layers["stexp_pred"].shape == (pred.n_obs, 3) and np.isfinite(pred.layers["stexp_pred"]).all()
    assert (tmp_path / "pred_genes.png").stat().st_size > 0

    zarr_out = tmp_path / "pred.zarr"
    assert main([*argv[:5], str(zarr_out), *argv[6:], "--overwrite"]) == 0  # its figure is pred_genes.png too
    import spatialdata as sd

    sdata = sd.read_zarr(zarr_out)
    assert sdata.tables["table"].n_obs == pred.n_obs

    def fails(args, match):
        assert main(args) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("stexp predict: error:") and match in err, err

    # a second run neither replaces the outputs without a word nor fails only after the work
    before = out.read_bytes()
    fails(argv, "pred.h5ad and")
    fails([*argv[:5], str(zarr_out), *argv[6:]], "pred.zarr and")
    assert out.read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left

    base = ["--model", str(model_dir), "--out", str(tmp_path / "x.h5ad"), "--quiet"]
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"garbage" * 50)
    fails(["predict", str(bad), *base], "cannot read slide")
    fails(["predict", str(tmp_path / "gone.tif"), *base], "does not exist")
    fails(["predict", str(write_pyramid(tmp_path / "nompp.tif", image, mpp=None)), *base], "pass --mpp")
    blank = write_pyramid(tmp_path / "blank.tif", np.full((300, 300, 3), 250, np.uint8))
    fails(["predict", str(blank), *base], "no grid spot")
    fails(["predict", str(slide), "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "y.h5ad")], "nomodel")
    fails(["predict", str(slide), *base[:2], "--out", str(tmp_path / "y.csv")], ".h5ad or .zarr")
    with pytest.raises(SystemExit) as err:
        main(["predict", str(slide), *base, "--mpp", "-1"])
    assert err.value.code == 2


def test_openslide_backend_when_installed(tmp_path, image, monkeypatch):
    """The OpenSlide path (MRXS and other non-TIFF formats), exercised on a TIFF when openslide is installed."""
    pytest.importorskip("openslide")
    monkeypatch.setattr("stexp.images._slide.OPENSLIDE_ONLY", (".tif",))
    path = write_pyramid(tmp_path / "s.tif", image, mpp=0.5)
    with RegionReader(path) as r:
        assert r.kind == "openslide"
        assert r.um_per_px() == pytest.approx(0.5)
        np.testing.assert_array_equal(r.read(0, 100, 50, 30, 20), image[50:70, 100:130])
        assert (r.read(0, 790, 590, 20, 20)[10:] == 255).all()  # transparent outside -> white
