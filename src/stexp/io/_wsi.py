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
    ValueError
        If ``mpp`` is not given and the file has no pixel size, or x and y disagree, or the value is not
        plausible; the message asks for ``mpp=``.
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
    ValueError
        If the file cannot be read, has no usable pixel size (pass ``mpp=``), or no tissue is found.
    """
    from stexp.images._slide import RegionReader, decode_image, is_region_file

    from ._grid import grid_spots

    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"slide file {str(path)!r} does not exist.")
    library_id = str(library_id or path.name.split(".")[0])
    um_per_px = slide_um_per_px(path, mpp)
    if is_region_file(path):
        with RegionReader(path) as reader:
            thumb, _ = reader.thumbnail(THUMBNAIL_PX)
            width, height = reader.dimensions
            levels = [list(d) for d in reader.level_dimensions]
            reader_name = reader.kind
    else:  # JPEG / PNG: decoded once at reduced scale, then the same steps as a slide's thumbnail
        image, (width, height) = decode_image(path, max_px=THUMBNAIL_PX, resample="BILINEAR")
        thumb, levels, reader_name = np.asarray(image), [[width, height]], "pillow"
    f = width / thumb.shape[1]  # level-0 px per thumbnail px
    adata = grid_spots(
        thumb, um_per_px=um_per_px * f, spacing_um=spacing_um, spot_diameter_um=spot_diameter_um, genes=genes,
        tissue_threshold=tissue_threshold, library_id=library_id, min_tissue_fraction=min_tissue_fraction,
    )  # fmt: skip
    adata.obsm["spatial"] = adata.obsm["spatial"] * f
    entry = adata.uns["spatial"][library_id]
    sf = entry["scalefactors"]
    for res in entry["images"]:
        sf[f"tissue_{res}_scalef"] = float(sf[f"tissue_{res}_scalef"]) / f
    sf["spot_diameter_fullres"] = spot_diameter_um / um_per_px
    sf["microns_per_pixel"] = um_per_px
    adata.uns["stexp"]["grid_spots"]["um_per_px"] = um_per_px  # of the slide, not of the thumbnail
    entry["metadata"].update({"source_image_path": str(path), "image_width": int(width), "image_height": int(height)})
    adata.uns["spatial"][library_id]["metadata"]["platform"] = "wsi"
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
