"""``stexp.io.read_wsi``: pseudo-spots over the tissue of a whole-slide image, read lazily."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stexp._layout import THUMBNAIL_PX, check_um_per_px, record
from stexp._settings import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


def slide_um_per_px(path: str | os.PathLike, mpp: float | None = None) -> float:
    """µm per level-0 pixel of a slide file: ``mpp`` when given, else what the file says.

    Raises
    ------
    TypeError
        If ``mpp`` is not a number.
    ValueError
        If ``mpp`` is not given and the file has no pixel size, or x and y disagree, or the value is not
        plausible (:func:`stexp._layout.check_um_per_px`); the message asks for ``mpp=``.
    """
    from stexp.images._slide import RegionReader, is_region_file

    if mpp is not None:
        return check_um_per_px(mpp, what="mpp")
    path = Path(path)
    if not is_region_file(path):
        raise ValueError(
            f"{str(path)!r} is a plain image (JPEG / PNG) without a reliable pixel size; pass mpp= "
            "(µm per pixel, e.g. 0.25 for a 40x scan, 0.5 for 20x)."
        )
    with RegionReader(path) as reader:
        value = reader.um_per_px()
    if value is None:
        raise ValueError(
            f"slide {str(path)!r} does not say its pixel size (no mpp, OME PhysicalSize or TIFF resolution "
            "tags); pass mpp= (µm per pixel, e.g. 0.25 for a 40x scan, 0.5 for 20x)."
        )
    return value


def read_wsi(
    path: str | os.PathLike,
    *,
    mpp: float | None = None,
    spot_diameter_um: float = 55.0,
    spacing_um: float = 100.0,
    library_id: str | None = None,
    genes: Sequence[str] | None = None,
    tissue_threshold: float | None = None,
    min_tissue_fraction: float = 0.5,
) -> AnnData:
    """Pseudo-spots on a hexagonal grid over the tissue of a whole-slide image, for :func:`stexp.tl.predict`.

    The slide (SVS, NDPI, SCN, pyramidal or plain TIFF, OME-TIFF; MRXS with OpenSlide installed; also JPEG /
    PNG) is never decoded whole: a thumbnail of about 2,000 px is read from the smallest pyramid level that
    is large enough, tissue is found on it exactly as :func:`stexp.io.grid_spots` does, and the patches are
    read later, region by region at the pyramid level they need
    (:class:`stexp.images.RegionReader`), through ``metadata["source_image_path"]``.

    Parameters
    ----------
    path
        The slide file.
    mpp
        µm per level-0 pixel; default: from the file (OpenSlide / Aperio ``mpp``, OME ``PhysicalSizeX/Y``,
        TIFF resolution tags). Required when the file does not say, or says it inconsistently.
    spot_diameter_um
        Diameter of each pseudo-spot (µm; 55 = Visium). Patches are 1.5 x this by default (0.75 x for spots of 90 µm and more).
    spacing_um
        Centre-to-centre distance of the hexagonal grid (µm).
    library_id
        Name of the slide; default: the file name without its suffixes.
    genes
        Genes of ``var`` (e.g. ``model.genes``) so that :func:`stexp.tl.predict` writes them.
    tissue_threshold, min_tissue_fraction
        As in :func:`stexp.io.grid_spots`.

    Returns
    -------
    AnnData in stexp's layout (see :func:`stexp.io.grid_spots`): ``obsm["spatial"]`` in level-0 pixels,
    ``uns["spatial"][library_id]`` with the thumbnail as ``images["hires"]`` (and ``"lowres"``) and their
    ``tissue_<res>_scalef``, ``microns_per_pixel``, and the slide as ``metadata["source_image_path"]``.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    TypeError
        If ``mpp`` or another numeric option is not a number (``"0.5"``, ``True``...).
    ValueError
        Before any pixel is read: an option out of range (``mpp`` outside the plausible 0.05-50 µm/px),
        a spot or a spacing larger than the slide, or a spacing so fine the grid would exceed
        :data:`stexp.io._grid.MAX_GRID_POINTS` points (named with the slide's extent in µm), or no usable
        pixel size (pass ``mpp=``). Then: the file cannot be read (truncated, damaged; the message names
        it), the slide is grayscale (tissue is found by its H&E colour; give the RGB scan), or no tissue is
        found.
    """
    from stexp.images._slide import RegionReader, decode_image, image_size, is_region_file

    from ._grid import check_genes, check_grid_extent, check_grid_options, grid_over_image

    spacing_um, spot_diameter_um, tissue_threshold, min_tissue_fraction = check_grid_options(
        spacing_um=spacing_um, spot_diameter_um=spot_diameter_um, tissue_threshold=tissue_threshold,
        min_tissue_fraction=min_tissue_fraction,
    )  # fmt: skip
    genes = check_genes(genes)
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"slide file {str(path)!r} does not exist.")
    library_id = str(library_id or path.name.split(".")[0])
    um_per_px = slide_um_per_px(path, mpp)
    what = f"slide {str(path)!r}"
    if is_region_file(path):
        with RegionReader(path) as reader:
            width, height = reader.dimensions
            check_grid_extent(
                width,
                height,
                um_per_px,
                spacing_um=spacing_um,
                spot_diameter_um=spot_diameter_um,
                what=what,
                pixel_option="mpp",
            )  # before any pixel
            thumb, _ = reader.thumbnail(THUMBNAIL_PX)
            levels = [list(d) for d in reader.level_dimensions]
            reader_name = reader.kind
    else:  # JPEG / PNG: decoded once at reduced scale, then the same steps as a slide's thumbnail
        check_grid_extent(
            *image_size(path),
            um_per_px,
            spacing_um=spacing_um,
            spot_diameter_um=spot_diameter_um,
            what=what,
            pixel_option="mpp",
        )
        image, (width, height) = decode_image(path, max_px=THUMBNAIL_PX, resample="BILINEAR")
        thumb, levels, reader_name = np.asarray(image), [[width, height]], "pillow"
    metadata = {"platform": "wsi", "has_image": True, "source_image_path": str(path)}
    metadata.update({"image_width": int(width), "image_height": int(height)})
    adata = grid_over_image(
        thumb, (width, height), um_per_px=um_per_px, spacing_um=spacing_um, spot_diameter_um=spot_diameter_um, genes=genes, tissue_threshold=tissue_threshold,
        library_id=library_id, min_tissue_fraction=min_tissue_fraction, metadata=metadata, pixel_option="mpp",
    )  # fmt: skip
    record(
        adata,
        "read_wsi",
        {
            "path": str(path),
            "reader": reader_name,
            "um_per_px": um_per_px,
            "mpp_from": "argument" if mpp is not None else "file",
            "levels": levels,
            "spacing_um": spacing_um,
            "spot_diameter_um": spot_diameter_um,
            "n_spots": adata.n_obs,
        },
    )
    logger.info(
        f"read_wsi: {adata.n_obs} pseudo-spots over the tissue of {path.name} ({um_per_px:.3g} µm/px, "
        f"{len(levels)} level(s), read with {reader_name})"
    )
    return adata
