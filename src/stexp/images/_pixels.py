"""Pixel conversions to the one in-memory image type of stexp: contiguous ``uint8`` RGB ``(H, W, 3)``.

Conversions scale by the range of the input type and never clip: a 16-bit image keeps its contrast
(PIL's ``Image.convert("RGB")`` clips 16-bit values above 255, which turns most of a 16-bit H&E white).
Pure numpy / PIL; no torch.
"""

from __future__ import annotations

import numpy as np

#: PIL modes holding one channel of more than 8 bits, by their numpy dtype's range.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "I;32", "F")


def _to_uint8_channels(arr: np.ndarray, what: str) -> np.ndarray:
    """Values of any numeric dtype mapped onto 0..255 by their dtype's (or, for floats, their own) range."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        top = float(np.iinfo(arr.dtype).max)
        return np.rint(arr.astype(np.float64) * (255.0 / top)).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.signedinteger):
        if arr.size and arr.min() < 0:
            raise ValueError(
                f"{what}: signed integer image with negative values (min {arr.min()}); pixels must be >= 0."
            )
        top = float(np.iinfo(arr.dtype).max)
        return np.rint(arr.astype(np.float64) * (255.0 / top)).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size == 0:
            return arr.astype(np.uint8)
        finite = np.isfinite(arr)
        if not finite.all():
            raise ValueError(f"{what}: {int((~finite).sum())} NaN or infinite pixel values.")
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0 and hi <= 1:
            return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
        if lo >= 0 and hi <= 255:
            return np.rint(arr).astype(np.uint8)
        raise ValueError(
            f"{what}: float pixel values span [{lo:g}, {hi:g}]; expected [0, 1] or [0, 255]. "
            "Rescale the image to one of these ranges first."
        )
    raise TypeError(f"{what}: cannot read pixels of dtype {arr.dtype} as an image.")


def as_uint8_rgb(array, *, what: str) -> np.ndarray:
    """An in-memory image as contiguous ``uint8`` RGB ``(H, W, 3)``, converted by range, never clipped.

    Parameters
    ----------
    array
        ``(H, W)`` grayscale, ``(H, W, 1)``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA (alpha dropped) of dtype
        ``uint8`` (as is), ``bool`` (0 / 255), unsigned or non-negative signed integers (scaled by the
        dtype's maximum: ``uint16`` 65535 -> 255), or float in [0, 1] (times 255) or [0, 255] (as is).
    what
        How to name the image in error messages (e.g. ``"image of library 'A1'"``).

    Raises
    ------
    TypeError
        A dtype that is not numeric.
    ValueError
        Another shape, an empty image, NaN / infinite pixels, a float range outside [0, 1] and [0, 255],
        or negative integers.
    """
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[..., None]
    elif arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(
            f"{what}: expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape} ({arr.dtype})."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{what}: the image is empty (shape {arr.shape}).")
    arr = arr[..., :3]
    out = _to_uint8_channels(arr, what)
    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.ascontiguousarray(out)


def pil_to_uint8_rgb(image, *, what: str) -> np.ndarray:
    """A PIL image of any mode as contiguous ``uint8`` RGB ``(H, W, 3)``.

    16- and 32-bit modes (``"I;16"``, ``"I;16B"``, ``"I"``, ``"F"``) are scaled by range, as in
    :func:`as_uint8_rgb` (``"I;16*"`` by 65535; ``"I"`` by 65535 when its values fit in 16 bits, as PNG
    and TIFF 16-bit images decode to it, else by its dtype's range; ``"F"`` by its own range), instead of
    being clipped to 255 as ``Image.convert("RGB")`` does. Other modes (palette, CMYK, LA, ...) go
    through ``convert("RGB")``, which is exact for 8-bit data.
    """
    mode = image.mode
    if mode in _WIDE_MODES:
        arr = np.asarray(image)
        if mode.startswith("I;16"):
            arr = arr.astype(np.uint16, copy=False)
        elif mode in ("I", "I;32"):
            if arr.size and arr.min() >= 0 and arr.max() <= 65535:
                arr = arr.astype(np.uint16)
        return as_uint8_rgb(arr, what=what)
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(image))
    if mode in ("1", "L", "RGBA"):
        return as_uint8_rgb(np.asarray(image), what=what)
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))
