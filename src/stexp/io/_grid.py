"""Pseudo-spots on a hexagonal grid over the tissue of an H&E-only slide (for prediction without counts)."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stexp._layout import LOWRES_PX, THUMBNAIL_PX, check_um_per_px, mark_unmeasured, record
from stexp._settings import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


#: Pixel size (µm) of the downsampled image the tissue mask is computed on.
MASK_UM_PER_PX = 8.0
#: At most this many points on the hexagonal grid over the whole image, before the tissue filter (a 10 µm
#: spacing over 20 x 20 mm); a finer spacing is refused instead of exhausting memory.
MAX_GRID_POINTS = 5_000_000
#: A spot's disc is convolved with the tissue mask at most this many mask pixels wide (radius); the tissue
#: share of a larger spot is measured on a block-averaged copy of the mask, so memory and time stay bounded.
MAX_DISC_RADIUS_PX = 32


def _real(value, name: str) -> float:
    """``value`` as a float; a TypeError naming ``name`` for anything but a real number (``True`` included)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    return float(value)


def check_grid_options(
    *, spacing_um, spot_diameter_um, tissue_threshold, min_tissue_fraction
) -> tuple[float, float, float | None, float]:
    """The grid options of :func:`grid_spots` / :func:`stexp.io.read_wsi` as floats, checked before any work.

    Raises
    ------
    TypeError
        If an option is not a real number (``tissue_threshold`` may be ``None``).
    ValueError
        If ``spacing_um`` or ``spot_diameter_um`` is not finite and positive, or ``tissue_threshold`` /
        ``min_tissue_fraction`` lies outside [0, 1]; the message names the option.
    """
    spacing = _real(spacing_um, "spacing_um")
    diameter = _real(spot_diameter_um, "spot_diameter_um")
    for name, value in (("spacing_um", spacing), ("spot_diameter_um", diameter)):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number of µm, got {value!r}.")
    fraction = _real(min_tissue_fraction, "min_tissue_fraction")
    if not 0 <= fraction <= 1:
        raise ValueError(f"min_tissue_fraction must be in [0, 1], got {fraction!r}.")
    threshold = None if tissue_threshold is None else _real(tissue_threshold, "tissue_threshold")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"tissue_threshold is a saturation in [0, 1], got {threshold!r}.")
    return spacing, diameter, threshold, fraction


def check_grid_extent(
    width: int,
    height: int,
    um_per_px: float,
    *,
    spacing_um: float,
    spot_diameter_um: float,
    what: str,
    pixel_option: str = "um_per_px",
) -> None:
    """Refuse a spot or a spacing larger than the image, or a grid of more than :data:`MAX_GRID_POINTS` points.

    Checked from the image's size alone, before anything is decoded: a spot larger than the slide cannot
    lie on it, a spacing larger than the slide puts at most one point on it, and a spacing far finer than
    the slide would allocate billions of grid points.

    Parameters
    ----------
    width, height
        Size of the full-resolution image (px).
    um_per_px
        Its pixel size.
    what
        How messages name the image (e.g. ``"slide 'a.svs'"``).
    pixel_option
        The argument that sets the pixel size, for messages (``"mpp"`` for :func:`stexp.io.read_wsi`).

    Raises
    ------
    ValueError
        Naming the value and the image's extent in µm.
    """
    w_um, h_um = width * um_per_px, height * um_per_px
    extent = f"{w_um:,.0f} x {h_um:,.0f} µm ({width} x {height} px at {um_per_px:g} µm/px)"
    longest = max(w_um, h_um)
    for name, value in (("spot_diameter_um", spot_diameter_um), ("spacing_um", spacing_um)):
        if value > longest:
            raise ValueError(
                f"{name}={value:g} µm is larger than {what}, which is {extent}; give {name} in µm (Visium: "
                f"55 µm spots 100 µm apart) and check the pixel size ({pixel_option}=)."
            )
    row_um = float(spacing_um) * math.sqrt(3) / 2  # Python floats: overflow gives inf, without a warning
    n_points = (float(h_um) / row_um + 1) * (float(w_um) / float(spacing_um) + 1) if row_um > 0 else math.inf
    if not n_points <= MAX_GRID_POINTS:
        raise ValueError(
            f"spacing_um={spacing_um:g} µm would put {n_points:,.0f} grid points over {what} ({extent}); at most "
            f"{MAX_GRID_POINTS:,} are made. Choose a larger spacing_um (at least "
            f"{math.sqrt(w_um * h_um / MAX_GRID_POINTS / (math.sqrt(3) / 2)):.3g} µm)."
        )


def _decode(path: Path, max_px: int) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB array with longest side ~``max_px`` (decoded at reduced scale where possible) and the full size."""
    from stexp.images._slide import decode_image

    image, size = decode_image(path, max_px=max_px, resample="BILINEAR")
    return np.asarray(image), size


def _resize(img: np.ndarray, max_px: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    scale = min(1.0, max_px / max(h, w))
    if scale == 1.0:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))


#: The automatic saturation threshold is Otsu's, at most this: glass is below ~0.1 on the HER2+ slides (Otsu
#: 0.20-0.24 there), but on a field that is all tissue Otsu splits dark from pale tissue instead (0.45 on
#: the synthetic slides, which left the pink stroma out).
SATURATION_THRESHOLD_CAP = 0.2


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` (0 where max is 0), as skimage's ``rgb2hsv(rgb)[..., 1]``.

    Computed in float32 from the channel extremes, so a 2,000 px thumbnail costs ~50 MB instead of the
    ~450 MB of float64 temporaries of ``rgb2hsv`` (which also computes hue and value).
    """
    rgb = np.asarray(rgb)
    hi = rgb.max(axis=-1).astype(np.float32)
    lo = rgb.min(axis=-1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sat = (hi - lo) / hi
    sat[hi == 0] = 0.0
    return sat


def tissue_mask(rgb: np.ndarray, *, threshold: float | None = None) -> tuple[np.ndarray, float]:
    """Tissue pixels of an H&E image: saturation above ``threshold`` (Otsu's when ``None``, capped), cleaned.

    Returns
    -------
    The boolean mask and the saturation threshold used.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    sat = _saturation(np.asarray(rgb)[..., :3])
    if threshold is None:
        threshold = min(float(threshold_otsu(sat)), SATURATION_THRESHOLD_CAP) if np.ptp(sat) > 0 else 1.0
    mask = sat > threshold
    mask = ndimage.binary_opening(mask, iterations=1)
    mask = ndimage.binary_fill_holes(mask)
    return mask, float(threshold)


def _hex_grid(width: float, height: float, pitch_px: float) -> tuple[np.ndarray, ...]:
    """Row, column and centre (x, y) of the hexagonal grid points of pitch ``pitch_px`` inside the image.

    Odd rows are shifted by half a pitch; rows are ``pitch * sqrt(3) / 2`` apart.
    """
    row_step = pitch_px * np.sqrt(3) / 2
    n_rows = int(np.floor(height / row_step)) + 1
    n_cols = int(np.floor(width / pitch_px)) + 1
    grid_r, grid_c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rr, cc = grid_r.reshape(-1), grid_c.reshape(-1)
    x = pitch_px / 2 + cc * pitch_px + (rr % 2) * pitch_px / 2
    y = row_step / 2 + rr * row_step
    inside = (x < width) & (y < height)
    return rr[inside], cc[inside], x[inside], y[inside]


def _tissue_fraction(mask: np.ndarray, x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Share of tissue pixels of ``mask`` in a disc of ``radius`` around each point (mask pixel coordinates).

    Outside the mask counts as glass. A disc wider than :data:`MAX_DISC_RADIUS_PX` is measured on a
    block-averaged copy of the mask (each block's tissue share), and discs wider than a few pixels are
    convolved by FFT, so the work stays bounded whatever the spot size.
    """
    from scipy import ndimage, signal

    values = mask.astype(float)
    factor = max(1, int(np.ceil(radius / MAX_DISC_RADIUS_PX)))
    if factor > 1:
        h, w = values.shape
        padded = np.zeros((-(-h // factor) * factor, -(-w // factor) * factor))
        padded[:h, :w] = values
        values = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor).mean(axis=(1, 3))
        x, y, radius = (x + 0.5) / factor - 0.5, (y + 0.5) / factor - 0.5, radius / factor
    k = int(np.ceil(radius))
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    disc = (xx**2 + yy**2 <= radius**2).astype(float)
    disc /= disc.sum()
    if k <= 4:
        fraction_map = ndimage.convolve(values, disc, mode="constant", cval=0.0)
    else:  # same result ("same" mode pads with zeros), in O(n log n)
        fraction_map = np.clip(signal.fftconvolve(values, disc, mode="same"), 0.0, 1.0)
    iy = np.clip(np.round(y).astype(int), 0, values.shape[0] - 1)
    ix = np.clip(np.round(x).astype(int), 0, values.shape[1] - 1)
    return fraction_map[iy, ix]


def _check_colour(image: np.ndarray, what: str) -> None:
    """Refuse an image without colour but with contrast (grayscale): tissue is found by its H&E colour.

    A uniform image (blank glass) passes; it has no tissue, which the grid step says.
    """
    rgb = np.asarray(image)[..., :3]
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all() and np.ptp(rgb[..., 0]) > 0:
        raise ValueError(
            f"{what} is grayscale (every pixel has R = G = B). stexp finds tissue by "
            "the colour of H&E staining and its image encoders were trained on RGB H&E, so a grayscale image "
            "(a single channel, fluorescence, or an H&E converted to gray) cannot be used: give the RGB "
            "bright-field H&E scan."
        )


def grid_spots(
    image: np.ndarray | str | os.PathLike,
    *,
    um_per_px: float,
    spacing_um: float = 100.0,
    spot_diameter_um: float = 55.0,
    genes: Sequence[str] | None = None,
    tissue_threshold: float | None = None,
    library_id: str = "slide",
    min_tissue_fraction: float = 0.5,
) -> AnnData:
    """Pseudo-spots on a hexagonal grid over the tissue of an H&E-only image.

    Tissue is found on a copy downsampled to ~8 µm/px: saturation (HSV) above ``tissue_threshold``
    (Otsu's threshold, at most ``SATURATION_THRESHOLD_CAP`` = 0.2, when ``None``), opened and hole-filled. A grid spot is kept when at least
    ``min_tissue_fraction`` of its disc is tissue.

    Parameters
    ----------
    image
        RGB array ``(H, W, 3)`` at full resolution, or the path of the image file (decoded once at reduced
        scale; its path is kept in ``metadata["source_image_path"]`` for full-resolution patches).
    um_per_px
        µm per pixel of the full-resolution image.
    spacing_um
        Centre-to-centre distance of the grid (µm).
    spot_diameter_um
        Diameter of each pseudo-spot (µm).
    genes
        Genes of ``var`` (e.g. a trained model's genes), so that :func:`stexp.tl.predict` can write layers.
    tissue_threshold
        Saturation threshold in [0, 1]; default: Otsu's, at most 0.2.
    library_id
        Name of the slide.
    min_tissue_fraction
        Fraction of a spot's disc that must be tissue.

    Returns
    -------
    AnnData in stexp's layout with all-zero sparse ``X`` (nothing was measured: ``uns["stexp"]["unmeasured"]
    = True``), ``obs["in_tissue"] = 1``, ``obs["tissue_fraction"]``, Visium-style hexagonal
    ``array_row``/``array_col``, ``obsm["spatial"]`` in full-resolution px and the images with scale factors.

    Raises
    ------
    TypeError
        If a numeric option is not a number (a string, ``True``...).
    ValueError
        Before the image is decoded: ``um_per_px`` outside the plausible range (0.05-50 µm/px), an option out
        of range, a spot or a spacing larger than the image, or a spacing so fine that the grid would have
        more than :data:`MAX_GRID_POINTS` points (the message names the value and the image's extent in
        µm). After: a grayscale image (tissue is found by its H&E colour), or no spot with enough tissue.
    FileNotFoundError
        If ``image`` is a path that does not exist.
    """
    um_per_px = check_um_per_px(um_per_px)
    spacing_um, spot_diameter_um, tissue_threshold, min_tissue_fraction = check_grid_options(
        spacing_um=spacing_um, spot_diameter_um=spot_diameter_um, tissue_threshold=tissue_threshold,
        min_tissue_fraction=min_tissue_fraction,
    )  # fmt: skip
    genes = check_genes(genes)

    metadata: dict = {"platform": "grid", "has_image": True}
    if isinstance(image, (str, os.PathLike)):
        from stexp.images._slide import image_size

        path = Path(image).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"image file {str(path)!r} does not exist.")
        width, height = image_size(path)  # from the header: sizes are checked before decoding
        check_grid_extent(
            width,
            height,
            um_per_px,
            spacing_um=spacing_um,
            spot_diameter_um=spot_diameter_um,
            what=f"image {str(path)!r}",
        )
        hires, (width, height) = _decode(path, THUMBNAIL_PX)
        metadata["source_image_path"] = str(path)
    else:
        from stexp.images._pixels import as_uint8_rgb

        # by the dtype's range (uint16 / 257), floats in [0, 1] or [0, 255]; never clipped
        arr = as_uint8_rgb(image, what=f"image of library {library_id!r}")
        height, width = arr.shape[:2]
        check_grid_extent(
            width,
            height,
            um_per_px,
            spacing_um=spacing_um,
            spot_diameter_um=spot_diameter_um,
            what=f"the image of library {library_id!r}",
        )
        hires = arr if max(height, width) <= THUMBNAIL_PX else _resize(arr, THUMBNAIL_PX)
    return grid_over_image(
        hires, (width, height), um_per_px=um_per_px, spacing_um=spacing_um, spot_diameter_um=spot_diameter_um, genes=genes, tissue_threshold=tissue_threshold,
        library_id=library_id, min_tissue_fraction=min_tissue_fraction, metadata=metadata,
    )  # fmt: skip


def check_genes(genes: Sequence[str] | None) -> list[str]:
    """The ``genes`` of :func:`grid_spots` as strings; a ValueError naming the duplicates."""
    genes = [] if genes is None else [str(g) for g in genes]
    if len(set(genes)) != len(genes):
        dup = sorted({g for g in genes if genes.count(g) > 1})
        raise ValueError(f"genes contains duplicates: {dup[:10]}.")
    return genes


def grid_over_image(
    hires: np.ndarray,
    size: tuple[int, int],
    *,
    um_per_px: float,
    spacing_um: float,
    spot_diameter_um: float,
    genes: list[str],
    tissue_threshold: float | None,
    library_id: str,
    min_tissue_fraction: float,
    metadata: dict,
    pixel_option: str = "um_per_px",
) -> AnnData:
    """The grid of :func:`grid_spots` from the in-memory copy ``hires`` of an image of ``size`` (w, h) full-res px.

    Options are those of :func:`grid_spots`, already checked (:func:`check_grid_options`,
    :func:`check_grid_extent`); ``um_per_px`` is of the full-resolution image. :func:`stexp.io.read_wsi`
    passes a slide's thumbnail here; ``pixel_option`` names its pixel-size argument in messages.
    """
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    width, height = size
    source = metadata.get("source_image_path")
    _check_colour(hires, f"image {source!r}" if source else f"the image of library {library_id!r}")
    hires_scalef = hires.shape[1] / width
    lowres = _resize(hires, LOWRES_PX)

    # tissue mask on a copy at ~MASK_UM_PER_PX (never finer than the hires copy)
    mask_scalef = min(hires_scalef, um_per_px / MASK_UM_PER_PX)
    small = _resize(hires, max(8, round(max(width, height) * mask_scalef)))
    mask_scalef = small.shape[1] / width
    mask, threshold = tissue_mask(small, threshold=tissue_threshold)

    rr, cc, x, y = _hex_grid(width, height, spacing_um / um_per_px)
    if len(x) == 0:  # a slide narrower than half a row step
        raise ValueError(
            f"library {library_id!r}: no point of a {spacing_um:g} µm grid falls on the image "
            f"({width * um_per_px:,.0f} x {height * um_per_px:,.0f} µm); choose a smaller spacing_um, and check "
            f"the pixel size ({pixel_option}=)."
        )
    radius = max(spot_diameter_um / um_per_px * mask_scalef / 2, 0.5)
    fraction = _tissue_fraction(mask, x * mask_scalef, y * mask_scalef, radius)
    keep = fraction >= min_tissue_fraction
    if not keep.any():
        raise ValueError(
            f"library {library_id!r}: no grid spot (spot_diameter_um={spot_diameter_um:g}, spacing_um="
            f"{spacing_um:g}) has >= {min_tissue_fraction:g} tissue (saturation threshold "
            f"{threshold:.3f}, {mask.mean():.1%} of the image is tissue, {len(x)} grid points); lower "
            f"tissue_threshold or min_tissue_fraction, or check {pixel_option}= (the pixel size)."
        )
    rr, cc, x, y, fraction = rr[keep], cc[keep], x[keep], y[keep], fraction[keep]

    n = len(x)
    array_col = 2 * cc + (rr % 2)
    obs = pd.DataFrame(
        {
            "library_id": pd.Categorical([library_id] * n),
            "array_row": rr.astype(np.int64),
            "array_col": array_col.astype(np.int64),
            "in_tissue": 1,
            "tissue_fraction": fraction.astype(np.float32),
        },
        index=pd.Index([f"{library_id}_{r}x{c}" for r, c in zip(rr, array_col, strict=True)]),
    )
    adata = ad.AnnData(
        X=sparse.csr_matrix((n, len(genes)), dtype=np.float32),
        obs=obs,
        var=pd.DataFrame(index=pd.Index(genes, dtype=object)),
        obsm={"spatial": np.column_stack([x, y]).astype(np.float64)},
        uns={
            "spatial": {
                library_id: {
                    "images": {"hires": hires, "lowres": lowres},
                    "scalefactors": {
                        "tissue_hires_scalef": hires_scalef,
                        "tissue_lowres_scalef": lowres.shape[1] / width,
                        "spot_diameter_fullres": spot_diameter_um / um_per_px,
                        "microns_per_pixel": um_per_px,
                        "spot_diameter_um": float(spot_diameter_um),
                    },
                    "metadata": metadata,
                }
            }
        },
    )
    record(
        adata,
        "grid_spots",
        {
            "um_per_px": um_per_px,
            "spacing_um": spacing_um,
            "spot_diameter_um": spot_diameter_um,
            "tissue_threshold": threshold,
            "min_tissue_fraction": min_tissue_fraction,
            "n_spots": n,
        },
    )
    mark_unmeasured(adata)
    logger.info(
        f"grid_spots: {n} pseudo-spots ({spacing_um:g} µm hex grid, {spot_diameter_um:g} µm spots) over "
        f"{mask.mean():.1%} tissue of library {library_id!r}"
    )
    return adata
