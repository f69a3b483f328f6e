"""images._pixels: every in-memory or PIL image to uint8 RGB (H, W, 3) by range, never clipped."""

import numpy as np
import pytest
from PIL import Image

from stexp.images._pixels import as_uint8_rgb, pil_to_uint8_rgb


def test_uint8_rgb_passes_through():
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = as_uint8_rgb(a, what="img")
    np.testing.assert_array_equal(out, a)
    assert out.flags.c_contiguous and out.dtype == np.uint8


def test_non_contiguous_becomes_contiguous():
    a = np.zeros((6, 8, 3), dtype=np.uint8)[:, ::2]
    assert as_uint8_rgb(a, what="img").flags.c_contiguous


def test_uint16_scaled_by_range_not_clipped():
    a = np.array([[0, 257, 30000, 65535]], dtype=np.uint16)
    out = as_uint8_rgb(a, what="img")
    assert out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 117, 255])
    assert (out[..., 0] == out[..., 2]).all()


def test_uint32_and_signed_int_by_dtype_range():
    np.testing.assert_array_equal(as_uint8_rgb(np.array([[0, 2**32 - 1]], np.uint32), what="i")[0, :, 0], [0, 255])
    np.testing.assert_array_equal(as_uint8_rgb(np.array([[0, 32767]], np.int16), what="i")[0, :, 0], [0, 255])
    with pytest.raises(ValueError, match="slide X: signed integer image with negative values"):
        as_uint8_rgb(np.array([[-1, 5]], np.int16), what="slide X")


def test_bool_is_0_or_255():
    out = as_uint8_rgb(np.array([[True, False]]), what="mask")
    np.testing.assert_array_equal(out[0, :, 1], [255, 0])


@pytest.mark.parametrize(("values", "expected"), [([0.0, 0.5, 1.0], [0, 128, 255]), ([0.0, 2.0, 255.0], [0, 2, 255])])
def test_float_ranges(values, expected):
    a = np.array([values], dtype=np.float32)
    np.testing.assert_array_equal(as_uint8_rgb(a, what="f")[0, :, 0], expected)


@pytest.mark.parametrize("values", [[-0.1, 0.5], [0.0, 300.0], [-5.0, 10.0]])
def test_float_out_of_range_refused(values):
    with pytest.raises(ValueError, match=r"image of 'B4': float pixel values span \["):
        as_uint8_rgb(np.array([values]), what="image of 'B4'")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_refused(bad):
    a = np.zeros((3, 3, 3))
    a[1, 1, 1] = bad
    with pytest.raises(ValueError, match="img: 1 NaN or infinite pixel values"):
        as_uint8_rgb(a, what="img")


def test_grayscale_and_rgba():
    g = np.arange(6, dtype=np.uint8).reshape(2, 3)
    out = as_uint8_rgb(g, what="g")
    assert out.shape == (2, 3, 3) and (out == g[..., None]).all()
    assert as_uint8_rgb(g[..., None], what="g").shape == (2, 3, 3)
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 10, 99
    out = as_uint8_rgb(rgba, what="rgba")
    assert out.shape == (2, 2, 3) and (out[..., 0] == 10).all() and (out[..., 1:] == 0).all()


@pytest.mark.parametrize("shape", [(5,), (2, 2, 2), (2, 2, 5), (2, 2, 3, 1), (0, 4, 3), (4, 0)])
def test_bad_shapes_refused(shape):
    with pytest.raises(ValueError, match=r"'A1'"):
        as_uint8_rgb(np.zeros(shape, dtype=np.uint8), what="image of 'A1'")


def test_non_numeric_refused():
    with pytest.raises(TypeError, match="img: cannot read pixels of dtype"):
        as_uint8_rgb(np.full((2, 2, 3), "a", dtype=object), what="img")


def test_input_not_modified():
    a = np.full((2, 2), 65535, dtype=np.uint16)
    as_uint8_rgb(a, what="a")
    assert (a == 65535).all() and a.dtype == np.uint16


def test_pil_16bit_png_round_trip_by_range(tmp_path):
    a = np.array([[0, 1000, 30000], [40000, 50000, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode in ("I;16", "I")
        clipped = np.asarray(im.convert("RGB"))
        out = pil_to_uint8_rgb(im, what="g16.png")
    assert (clipped[1] == 255).all()  # the bug this module avoids
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], np.rint(a / 257.0).astype(np.uint8))


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_pil_16bit_modes(mode):
    a = np.array([[0, 30000, 65535]], dtype=np.uint16)
    im = Image.frombytes(mode, (3, 1), a.astype("<u2" if mode == "I;16" else ">u2").tobytes())
    np.testing.assert_array_equal(pil_to_uint8_rgb(im, what="x")[0, :, 0], [0, 117, 255])


def test_pil_32bit_int_and_float_modes():
    i32 = Image.frombytes("I", (2, 1), np.array([0, 65535], "<i4").tobytes())
    np.testing.assert_array_equal(pil_to_uint8_rgb(i32, what="x")[0, :, 0], [0, 255])
    f = Image.frombytes("F", (3, 1), np.array([0.0, 0.5, 1.0], "<f4").tobytes())
    np.testing.assert_array_equal(pil_to_uint8_rgb(f, what="x")[0, :, 0], [0, 128, 255])
    bad = Image.frombytes("F", (2, 1), np.array([0.0, 1000.0], "<f4").tobytes())
    with pytest.raises(ValueError, match="slide.tif: float pixel values span"):
        pil_to_uint8_rgb(bad, what="slide.tif")


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK"])
def test_pil_8bit_modes(mode):
    im = Image.new("RGB", (4, 3), (200, 100, 50)).convert(mode)
    out = pil_to_uint8_rgb(im, what="x")
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, np.asarray(im.convert("RGB")))
