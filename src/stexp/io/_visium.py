"""10x Visium Space Ranger folders, read through squidpy, with stexp's physical units added."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from stexp._layout import PLATFORMS, check_um_per_px, record
from stexp._settings import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


def add_visium_units(
    adata: AnnData, library_id: str, *, spot_diameter_um: float = PLATFORMS["visium"]["spot_diameter_um"]
) -> None:
    """Add ``microns_per_pixel`` and ``spot_diameter_um`` to a Visium library's scale factors (in place).

    ``microns_per_pixel = spot_diameter_um / spot_diameter_fullres``; keys already present are kept.
    """
    sf = adata.uns["spatial"][library_id].setdefault("scalefactors", {})
    if "spot_diameter_fullres" not in sf and "microns_per_pixel" not in sf:
        raise KeyError(
            f"library {library_id!r}: scale factors lack 'spot_diameter_fullres' (have {sorted(sf)}); "
            "cannot derive µm per pixel."
        )
    sf.setdefault("spot_diameter_um", float(spot_diameter_um))
    if "microns_per_pixel" not in sf:
        sf["microns_per_pixel"] = check_um_per_px(
            float(sf["spot_diameter_um"]) / float(sf["spot_diameter_fullres"]),
            what=f"µm per pixel of library {library_id!r} (spot diameter {sf['spot_diameter_um']:g} µm)",
        )


def read_visium(
    path: str | os.PathLike,
    *,
    library_id: str | None = None,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    load_images: bool = True,
    source_image_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> AnnData:
    """Read a 10x Visium Space Ranger output folder with :func:`squidpy.read.visium`.

    The result is squidpy's AnnData unchanged, plus ``obs["library_id"]`` (categorical) and, in
    ``uns["spatial"][library_id]["scalefactors"]``, ``spot_diameter_um = 55`` and
    ``microns_per_pixel = 55 / spot_diameter_fullres``. AnnData from ``squidpy.read.visium`` or
    ``scanpy.read_visium`` also works as is with every stexp function.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (with ``spatial/``).
    library_id
        Library name; default: squidpy's (from the h5 file, or ``"custom"``).
    counts_file
        Counts file inside ``path``.
    load_images
        Load the hires / lowres images.
    source_image_path
        Path of the full-resolution H&E (kept in ``metadata["source_image_path"]`` for full-res patches).
    **kwargs
        Passed to :func:`squidpy.read.visium`.

    Returns
    -------
    AnnData in stexp's layout.
    """
    import pandas as pd
    import squidpy as sq

    adata = sq.read.visium(
        path,
        counts_file=counts_file,
        library_id=library_id,
        load_images=load_images,
        source_image_path=source_image_path,
        **kwargs,
    )
    (lib,) = list(adata.uns["spatial"])
    add_visium_units(adata, lib)
    adata.uns["spatial"][lib].setdefault("metadata", {})["platform"] = "visium"
    adata.obs["library_id"] = pd.Categorical([lib] * adata.n_obs)
    record(adata, "read_visium", {"path": str(path), "library_id": lib, "counts_file": counts_file})
    sf = adata.uns["spatial"][lib]["scalefactors"]
    logger.info(
        f"read Visium library {lib!r}: {adata.n_obs} spots x {adata.n_vars} genes, {sf['microns_per_pixel']:.3f} µm/px"
    )
    return adata
