"""embed_images(deblock=True): heavy JPEG block artefacts removed before embedding; other slides untouched."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_embed import TinyEncoder
from test_embed_views import DetailEncoder, _one_slide, _rel

import stexp
from stexp._layout import spatial_entry
from stexp.images._quality import (
    HEAVY_BLOCKINESS,
    deblock_jpeg,
    estimate_jpeg_quality,
    jpeg_blockiness,
)
from stexp.images._spec import EncoderSpec, check_encoder_spec


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` saved by Pillow as JPEG at ``quality`` and decoded (an export, encoded independently of stexp)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def _he_image(synth, side: int | None = None) -> np.ndarray:
    """The synthetic dataset's first H&E-like image (uint8 RGB), cropped to ``side`` px a side."""
    image = np.asarray(synth.uns["spatial"]["slide_0"]["images"]["hires"])
    return np.ascontiguousarray(image[:side, :side]) if side else image


@pytest.mark.parametrize("quality", [8, 30, 60])
def test_estimate_jpeg_quality_finds_the_quality_an_image_was_saved_at(synth, quality):
    image = _he_image(synth)
    estimated, change = estimate_jpeg_quality(_jpeg(image, quality))
    assert estimated == quality and change < 0.1
    assert estimate_jpeg_quality(image)[1] > 1.0  # an image never compressed changes under every quality


def test_deblock_jpeg_removes_the_blocks_and_keeps_the_content(synth):
    image = _he_image(synth, 300)  # not a multiple of 8 or of the strip: partial blocks at the edges
    compressed = _jpeg(image, 8)
    before = compressed.copy()
    out = deblock_jpeg(compressed, 8)
    np.testing.assert_array_equal(compressed, before)  # the input is not changed
    assert out.shape == image.shape and out.dtype == np.uint8
    assert jpeg_blockiness(compressed) > 2.0 and jpeg_blockiness(out) < HEAVY_BLOCKINESS
    error = lambda x: float(np.abs(x.astype(np.int16) - image).mean())
    assert error(out) < error(compressed)  # closer to the image before compression


def test_deblock_jpeg_in_strips_equals_one_strip(synth, monkeypatch):
    import stexp.images._quality as quality

    compressed = _jpeg(_he_image(synth, 200), 10)
    whole = deblock_jpeg(compressed, 10)
    monkeypatch.setattr(quality, "DEBLOCK_STRIP", 48)  # five strips
    np.testing.assert_array_equal(deblock_jpeg(compressed, 10), whole)


def test_deblock_slide_changes_only_a_heavily_compressed_slide(synth, caplog):
    from PIL import Image

    from stexp.images._views import deblock_slide

    image = _he_image(synth)
    for kept in (image, _jpeg(image, 90)):  # never compressed; mildly compressed
        slide = Image.fromarray(kept)
        assert deblock_slide(slide, True, library_id="a") is slide
    heavy = Image.fromarray(_jpeg(image, 8))
    assert deblock_slide(heavy, False, library_id="a") is heavy
    with caplog.at_level(logging.INFO, logger="stexp"):
        out = deblock_slide(heavy, True, library_id="a")
    np.testing.assert_array_equal(np.asarray(out), deblock_jpeg(np.asarray(heavy), 8))
    assert "library 'a': heavy JPEG block artefacts" in caplog.text and "quality 8" in caplog.text
    # a grid-aligned pattern that reads as blocky but was saved at high quality is not compression
    grid = image.copy()
    grid[:, 7::8] = grid[:, 7::8] // 2
    grid[7::8] = grid[7::8] // 2
    saved = Image.fromarray(_jpeg(grid, 95))
    assert jpeg_blockiness(np.asarray(saved)) > HEAVY_BLOCKINESS
    assert deblock_slide(saved, True, library_id="g") is saved


def test_measure_compression_estimates_the_quality_of_heavy_images_only(synth):
    from stexp.images._quality import measure_compression

    image = _he_image(synth)
    clean = measure_compression(image)
    assert not clean.heavy and not clean.deblock and clean.quality is None  # no estimate for a clean image
    heavy = measure_compression(_jpeg(image, 8))
    assert heavy.heavy and heavy.deblock and heavy.quality == 8
    as_float = measure_compression(_jpeg(image, 8).astype(np.float32) / 255)  # any dtype, as jpeg_blockiness
    assert as_float.quality == 8 and as_float.blockiness == pytest.approx(heavy.blockiness, rel=1e-4)


def test_embed_images_deblocks_a_compressed_export_and_records_it(synth):
    a, lib = _one_slide(synth)
    compressed = _jpeg(np.asarray(spatial_entry(a, lib)["images"]["hires"]), 8)
    export, by_hand = a.copy(), a.copy()
    export.uns["spatial"][lib]["images"] = {"hires": compressed}
    by_hand.uns["spatial"][lib]["images"] = {"hires": deblock_jpeg(compressed, 8)}
    enc = DetailEncoder()
    deblocked = _feats(export, enc)
    np.testing.assert_array_equal(deblocked, _feats(by_hand, enc, deblock=False))  # the deblocked image was embedded
    assert _rel(deblocked, _feats(export, enc, deblock=False)) > 0.01
    np.testing.assert_array_equal(_feats(a, enc), _feats(a, enc, deblock=False))  # a clean slide is left as it is
    # recorded, part of the identity (no cache hit across it), checked against a model's spec
    stexp.pp.embed_images(export, encoder=TinyEncoder(), device="cpu", key_added="on", stain_norm=None)
    stexp.pp.embed_images(export, encoder=TinyEncoder(), device="cpu", key_added="off", stain_norm=None, deblock=False)
    on, off = (EncoderSpec.from_mapping(export.uns["stexp"]["features"][k]) for k in ("on", "off"))
    assert on.deblock and not off.deblock
    assert not np.allclose(export.obsm["on"], export.obsm["off"])
    with pytest.raises(ValueError, match="deblock"):
        check_encoder_spec(on, off)
    with pytest.raises(ValueError, match="deblock"):
        stexp.pp.embed_images(a, encoder=enc, device="cpu", key_added="bad", deblock="yes")


def _feats(adata, encoder, **kw):
    out = stexp.pp.embed_images(adata, encoder=encoder, device="cpu", cache=False, copy=True, stain_norm=None, **kw)
    return out.obsm[f"X_stexp_{encoder.name}"]


def test_predict_says_a_heavy_slide_was_deblocked(synth, caplog):
    from stexp.tl._report import prediction_report

    enc = TinyEncoder()
    stexp.pp.embed_images(synth, encoder=enc, device="cpu", cache=False, key_added="X_t", stain_norm=None)
    train = synth[synth.obs["library_id"] != "slide_2"].copy()
    test = synth[synth.obs["library_id"] == "slide_2"].copy()
    entry = test.uns["spatial"]["slide_2"]
    entry["images"] = {"hires": _jpeg(np.asarray(entry["images"]["hires"]), 8)}
    stexp.pp.embed_images(
        test, encoder=enc, device="cpu", cache=False, key_added="X_t", stain_norm=None, overwrite=True
    )
    model = stexp.tl.fit(train, model="ridge", features_key="X_t")
    assert model.encoder_spec.deblock
    with caplog.at_level(logging.WARNING, logger="stexp"):
        stexp.tl.predict(test, model)
    slide = test.uns["stexp"]["stexp_pred"]["compression"]["slides"]["slide_2"]
    assert slide["heavy"] and slide["deblocked"] and slide["estimated_quality"] == 8
    assert "Its features were computed from the image deblocked" in caplog.text and "quality 8" in caplog.text
    (line,) = [x for x in prediction_report(test, "stexp_pred") if x.startswith("jpeg      slide_2:")]
    assert "deblocked before embedding" in line
    # a heavy grid pattern saved at high quality is reported, but not deblocked, and the warning says why
    grid = np.asarray(test.uns["spatial"]["slide_2"]["images"]["hires"]).copy()
    grid[:, 7::8] //= 2
    grid[7::8] //= 2
    entry["images"] = {"hires": _jpeg(grid, 95)}
    stexp.pp.embed_images(
        test, encoder=enc, device="cpu", cache=False, key_added="X_t", stain_norm=None, overwrite=True
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stexp"):
        stexp.tl.predict(test, model)
    slide = test.uns["stexp"]["stexp_pred"]["compression"]["slides"]["slide_2"]
    assert slide["heavy"] and not slide["deblocked"] and slide["estimated_quality"] > 50
    assert "so it was not deblocked" in caplog.text
