"""The one patch reader: square patches of a physical size (µm) around spot centres, resampled to N px."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from stexp._layout import LIBRARY_KEY, library_mask, spot_coords, spot_diameter_um, um_per_px

#: Default patch side as a multiple of the spot diameter (ST 100 µm -> 150 µm; Visium 55 µm -> 82.5 µm).
PATCH_DIAMETERS = 1.5
#: Fill colour of the parts of a patch that lie outside the image (white, like glass on an H&E slide).
PAD_RGB = (255, 255, 255)


def default_patch_um(adata, library_id: str) -> float:
    """Default patch side in µm: 1.5 x the spot diameter of the library.

    ST (100 µm spots) -> 150 µm, about the 224 px at ~0.69 µm/px used by mclSTExp on HER2+;
    Visium (55 µm) -> 82.5 µm. The margin gives the encoder the context around the spot.
    """
    return PATCH_DIAMETERS * spot_diameter_um(adata, library_id)


def patch_side_px(adata, library_id: str, patch_um: float, scale: float, image_size: tuple[int, int]) -> float:
    """Side of a ``patch_um`` patch in image pixels (``patch_um / µm-per-full-res-px * scale``).

    Raises
    ------
    ValueError
        If the patch is smaller than one image pixel or larger than the image.
    """
    patch_um = float(patch_um)
    if not math.isfinite(patch_um) or patch_um <= 0:
        raise ValueError(f"patch_um must be a positive number of µm, got {patch_um!r}.")
    upp = um_per_px(adata, library_id)
    side = patch_um / upp * float(scale)
    if side < 1.0:
        raise ValueError(
            f"library {library_id!r}: patch_um={patch_um:g} µm is {side:.3g} px on its image "
            f"({upp / scale:.3g} µm per image px): smaller than one pixel."
        )
    w, h = image_size
    if side > min(w, h):
        raise ValueError(
            f"library {library_id!r}: patch_um={patch_um:g} µm is {side:.0f} px, larger than its image "
            f"({w} x {h} px, {upp / scale:.3g} µm per image px, i.e. {w * upp / scale:.0f} x {h * upp / scale:.0f} µm)."
        )
    return side


def cut_patches(image, centres: np.ndarray, side: float, out_px: int) -> np.ndarray:
    """Cut square patches from a PIL image and resample them (anti-aliased bilinear) to ``out_px``.

    Parameters
    ----------
    image
        PIL RGB image.
    centres
        ``(n, 2)`` patch centres (x, y) in image pixels (sub-pixel positions are honoured).
    side
        Patch side in image pixels.
    out_px
        Output side in pixels.

    Returns
    -------
    uint8 ``(n, out_px, out_px, 3)``. Parts of a patch outside the image are white (:data:`PAD_RGB`).
    """
    from PIL import Image

    out = np.empty((len(centres), out_px, out_px, 3), dtype=np.uint8)
    w, h = image.size
    half = side / 2.0
    for i, (cx, cy) in enumerate(np.asarray(centres, dtype=np.float64)):
        box = (cx - half, cy - half, cx + half, cy + half)
        if box[0] >= 0 and box[1] >= 0 and box[2] <= w and box[3] <= h:
            patch = image.resize((out_px, out_px), Image.BILINEAR, box=box)
        else:
            x0, y0 = math.floor(box[0]), math.floor(box[1])
            x1, y1 = math.ceil(box[2]), math.ceil(box[3])
            canvas = Image.new("RGB", (x1 - x0, y1 - y0), PAD_RGB)
            cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
            if cx1 > cx0 and cy1 > cy0:
                canvas.paste(image.crop((cx0, cy0, cx1, cy1)), (cx0 - x0, cy0 - y0))
            patch = canvas.resize(
                (out_px, out_px), Image.BILINEAR, box=(box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0)
            )
        out[i] = np.asarray(patch)
    return out


def read_patches(
    adata,
    library_id: str,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    patch_um: float | None = None,
    out_px: int = 224,
    slide=None,
    on_outside: Literal["raise", "drop"] = "raise",
    library_key: str = LIBRARY_KEY,
) -> np.ndarray:
    """Patches of ``patch_um`` µm around spot centres of one library, resampled to ``out_px`` px.

    The image is the best one available (:func:`stexp.images.load_slide`: the full-resolution file,
    else the in-memory image with the largest scale factor). Centres are ``obsm["spatial"]`` (full-res
    px) times the image's scale factor; the µm per pixel come from :func:`stexp._layout.um_per_px`.
    Parts of a patch beyond the image border are padded with **white** (glass).

    Parameters
    ----------
    adata
        AnnData in stexp's layout.
    library_id
        The library.
    indices
        Integer positions (rows of ``adata``) of spots of ``library_id``; ``None``: all its spots.
    patch_um
        Patch side in µm; ``None``: :func:`default_patch_um` (1.5 x the spot diameter).
    out_px
        Output side in pixels.
    slide
        An already decoded :class:`stexp.images._source.Slide` of this library (avoids decoding again).
    on_outside
        Spots whose centre lies outside the image: ``"raise"`` a ValueError, or ``"drop"``: warn and
        return white patches for them (see :func:`stexp.io._validate.check_spots_in_image`).
    library_key
        Column of ``adata.obs`` with the library ids.

    Returns
    -------
    uint8 array ``(n, out_px, out_px, 3)``.
    """
    from stexp.images._source import load_slide
    from stexp.io._validate import check_spots_in_image

    lib_mask = library_mask(adata, library_id, library_key)
    lib_rows = np.flatnonzero(lib_mask)
    if indices is None:
        indices = lib_rows
    indices = np.asarray(indices, dtype=np.int64).ravel()
    not_in_lib = ~np.isin(indices, lib_rows)
    if not_in_lib.any():
        raise ValueError(
            f"{int(not_in_lib.sum())} of {len(indices)} spot indices (e.g. {indices[not_in_lib][:5].tolist()}) "
            f"are not spots of library {library_id!r}."
        )
    inside_lib = check_spots_in_image(adata, library_id, on_outside=on_outside, library_key=library_key)
    inside = np.zeros(adata.n_obs, dtype=bool)
    inside[lib_rows] = inside_lib
    if slide is None:
        slide = load_slide(adata, library_id)
    elif str(slide.library_id) != str(library_id):
        raise ValueError(f"slide= is the image of library {slide.library_id!r}, not of {library_id!r}.")
    if patch_um is None:
        patch_um = default_patch_um(adata, library_id)
    side = patch_side_px(adata, library_id, patch_um, slide.scale, slide.size)
    centres = spot_coords(adata)[indices] * slide.scale
    ok = inside[indices]
    out = np.full((len(indices), out_px, out_px, 3), 255, dtype=np.uint8)
    if ok.any():
        out[ok] = cut_patches(slide.image, centres[ok], side, int(out_px))
    return out
