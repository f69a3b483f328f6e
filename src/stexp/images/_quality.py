"""JPEG block artefacts of an image: how strongly its 8-px block grid shows (``tl.predict``'s compression check)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: JPEG's block side in pixels.
BLOCK = 8
#: The statistic reads a central crop of at most this many pixels a side (on the block grid).
MAX_SIDE = 2048


#: JPEG's largest block side in pixels: the 4:2:0 chroma block (luma blocks are :data:`BLOCK`).
CHROMA_BLOCK = 16


def central_crop(image: Any, side: int, grid: int = CHROMA_BLOCK) -> Any:
    """The central crop of at most ``side`` px a side of ``image``, its corner on the ``grid``-px block grid.

    ``image``: an array (a view of it is returned) or a PIL image (cropped without copying the rest).
    """
    w, h = image.size if hasattr(image, "crop") else (np.shape(image)[1], np.shape(image)[0])
    y0 = max(0, (h - side) // 2) // grid * grid
    x0 = max(0, (w - side) // 2) // grid * grid
    if hasattr(image, "crop"):
        return image.crop((x0, y0, min(w, x0 + side), min(h, y0 + side)))
    return image[y0 : y0 + side, x0 : x0 + side]


def jpeg_blockiness(image: Any) -> float | None:
    """How much more the grey level jumps across JPEG's 8-px block boundaries than inside the blocks.

    The mean absolute difference between neighbouring pixels across block boundaries over the mean
    elsewhere, averaged over x and y, on a central crop of at most :data:`MAX_SIDE` pixels a side taken on
    the block grid. 1.0 for an image never JPEG-compressed (or resized since: the grid is then lost); on the
    HER2+ ~2000-px images about 1.02-1.05 at JPEG quality 95, 1.15 at 75, 1.3 at 50, 1.5 at 30 and 2.0-2.4 at 8.

    Parameters
    ----------
    image
        ``(H, W)`` or ``(H, W, C)`` array of any numeric type (only the first three channels are read).

    Returns
    -------
    The ratio, or ``None`` for an image under four blocks a side or without texture.
    """
    if min(np.shape(image)[:2]) < 4 * BLOCK:
        return None
    crop = np.asarray(central_crop(image, MAX_SIDE, grid=BLOCK))
    grey = crop[..., :3].mean(axis=2, dtype=np.float32) if crop.ndim == 3 else crop.astype(np.float32)
    ratios = []
    for g in (grey, grey.T):
        steps = np.abs(np.diff(g, axis=1))
        boundary = np.arange(steps.shape[1]) % BLOCK == BLOCK - 1
        inside = float(steps[:, ~boundary].mean())
        if inside <= 0:
            return None
        ratios.append(float(steps[:, boundary].mean()) / inside)
    return float(np.mean(ratios))


#: Blockiness above this (about JPEG quality 30 or lower on the HER2+ images) is heavy: ``tl.predict`` reports
#: it and the ``deblock`` view option of ``embed_images`` removes it.
HEAVY_BLOCKINESS = 1.5
#: A slide is deblocked only when it was last saved at this JPEG quality or lower (estimated): a high blockiness
#: with a high quality is structure on the 8-px grid (one HER2+ scan reads 1.66 at quality 95), not compression.
DEBLOCK_MAX_QUALITY = 50
#: The side (px) of the central crop whose re-encoding error estimates a slide's JPEG quality.
QUALITY_CROP = 512
#: Grid offsets (px, in both axes) of the re-encodings averaged by :func:`deblock_jpeg`: 16 shifts of the
#: 8-px block grid.
DEBLOCK_SHIFTS = (0, 2, 4, 6)
#: Rows per strip of :func:`deblock_jpeg` (a multiple of 16, the chroma block of 4:2:0 JPEG).
DEBLOCK_STRIP = 1024


def jpeg_roundtrip(image: Any, quality: int) -> Any:
    """The PIL image ``image`` encoded as JPEG at ``quality`` (Pillow's encoder and tables), decoded as RGB."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    (image if image.mode == "RGB" else image.convert("RGB")).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    out = Image.open(buffer)
    out.load()  # decoded now: the buffer goes with this function
    return out if out.mode == "RGB" else out.convert("RGB")


def _jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """:func:`jpeg_roundtrip` of a uint8 RGB array."""
    from PIL import Image

    return np.asarray(jpeg_roundtrip(Image.fromarray(image), quality))


def estimate_jpeg_quality(image: np.ndarray, max_quality: int = 95) -> tuple[int, float]:
    """The JPEG quality an image was last saved at: the one whose re-encoding changes it least.

    Decoding a JPEG and encoding it again with the same quantisation tables on the same block grid gives
    nearly the same pixels; any other quality moves them. Each quality from 1 to ``max_quality`` re-encodes
    a central crop of :data:`QUALITY_CROP` px (on the block grid); the one with the smallest mean absolute
    change is returned with that change (grey levels; about 0 for an image last saved by a libjpeg
    encoder at that quality, larger for other encoders' tables, which then get the nearest standard quality).

    Parameters
    ----------
    image
        ``(H, W, 3)`` uint8 RGB.

    Returns
    -------
    ``(quality, mean absolute change)``.
    """
    crop = np.ascontiguousarray(central_crop(image, QUALITY_CROP)[..., :3])
    errors = [float(np.abs(_jpeg_roundtrip(crop, q).astype(np.int16) - crop).mean()) for q in range(1, max_quality + 1)]
    best = int(np.argmin(errors))
    return best + 1, errors[best]


@dataclass(frozen=True)
class Compression:
    """How compressed an image looks: its blockiness and, when heavy, its estimated JPEG quality."""

    #: :func:`jpeg_blockiness` (``None``: too small or without texture).
    blockiness: float | None
    #: :func:`estimate_jpeg_quality`, estimated for a heavy image only (``None`` otherwise).
    quality: int | None = None

    @property
    def heavy(self) -> bool:
        """Blockiness above :data:`HEAVY_BLOCKINESS`."""
        return self.blockiness is not None and self.blockiness > HEAVY_BLOCKINESS

    @property
    def deblock(self) -> bool:
        """Whether the ``deblock`` view option changes the image.

        Heavy, and saved at :data:`DEBLOCK_MAX_QUALITY` or lower: a high blockiness at a high quality is
        structure on the 8-px grid, not compression.
        """
        return self.heavy and self.quality is not None and self.quality <= DEBLOCK_MAX_QUALITY


def measure_compression(image: Any) -> Compression:
    """The :class:`Compression` of ``image`` (``(H, W, 3)`` array or PIL image), read on its central :data:`MAX_SIDE` px.

    Only that crop is read (a PIL slide is not copied whole). The quality is estimated only when the
    blockiness is heavy (about 0.3 s).
    """
    centre = np.asarray(central_crop(image, MAX_SIDE))
    found = Compression(jpeg_blockiness(centre))
    if not found.heavy:
        return found
    rgb = centre[..., :3] if centre.dtype == np.uint8 else np.clip(np.rint(centre[..., :3] * 255.0), 0, 255)
    return Compression(found.blockiness, estimate_jpeg_quality(np.ascontiguousarray(rgb, dtype=np.uint8))[0])


def deblock_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG block artefacts removed by re-application of JPEG (Nosratinia 2001).

    The image is encoded at ``quality`` on the block grid shifted by every offset of
    :data:`DEBLOCK_SHIFTS` in both axes, decoded, shifted back, and the 16 results averaged: each
    re-encoding keeps what the original compression kept and puts its block edges elsewhere, so the
    average keeps the image's content and smooths its block edges away. Done in strips of
    :data:`DEBLOCK_STRIP` rows (memory: about 3 strips of the image).

    Parameters
    ----------
    image
        ``(H, W, 3)`` uint8 RGB, as decoded from the JPEG (its block grid at pixel 0).
    quality
        The quality it was saved at (:func:`estimate_jpeg_quality`).

    Returns
    -------
    A new ``(H, W, 3)`` uint8 array.
    """
    h, w = image.shape[:2]
    margin = 16  # rows above and below each strip, so its rows see every shift's full neighbourhood
    out = np.empty_like(image)
    for r0 in range(0, h, DEBLOCK_STRIP):
        r1 = min(h, r0 + DEBLOCK_STRIP)
        a, b = max(0, r0 - margin), min(h, r1 + margin)  # a is on the 16-px grid: r0 and margin are
        window = image[a:b]
        total = np.zeros(window.shape, dtype=np.uint16)  # 16 x 255 fits
        count = np.zeros(window.shape[:2], dtype=np.uint8)
        for dy in DEBLOCK_SHIFTS:
            for dx in DEBLOCK_SHIFTS:
                part = np.ascontiguousarray(window[dy:, dx:])
                if part.size == 0:
                    continue
                total[dy:, dx:] += _jpeg_roundtrip(part, quality)
                count[dy:, dx:] += 1
        mean = (total + count[..., None] // 2) // count[..., None]  # rounded mean
        out[r0:r1] = mean[r0 - a : r1 - a].astype(np.uint8)
    return out
