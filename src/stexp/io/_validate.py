"""Layout checks: every library has scale factors, a pixel size and (unless flagged) an image; spots lie inside it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from stexp._docs import doc_params
from stexp._layout import (
    LIBRARY_KEY,
    SPATIAL_KEY,
    counts_matrix,
    library_ids,
    library_mask,
    scalefactors,
    spatial_entry,
    spot_coords,
    spot_diameter_um,
    um_per_px,
)
from stexp.images._extent import check_spots_in_image

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


def _duplicated_names(index: pd.Index) -> list[str]:
    return list(dict.fromkeys(index[index.duplicated()].astype(str)))


def _check_counts(adata, layer: str | None = None) -> None:
    """Counts of ``X`` (or ``layers[layer]``): numeric, finite, >= 0; the message names how many and an example."""
    from scipy import sparse

    x, where = counts_matrix(adata, layer)
    if x is None:
        return
    values = x.data if sparse.issparse(x) else np.asarray(x)
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise ValueError(f"{where} must be numeric counts, got dtype {values.dtype}.")

    def example(mask: np.ndarray) -> str:
        if sparse.issparse(x):  # x.tocoo() keeps the order of x.data
            coo = x.tocoo()
            k = int(np.flatnonzero(mask)[0])
            r, c = coo.row[k], coo.col[k]
        else:
            r, c = np.argwhere(mask.reshape(values.shape))[0]
        return f"spot {str(adata.obs_names[r])!r}, gene {str(adata.var_names[c])!r}"

    if np.issubdtype(values.dtype, np.floating):
        bad = ~np.isfinite(values)
        if bad.any():
            raise ValueError(
                f"{where} holds {int(bad.sum())} NaN or infinite values (e.g. {example(bad)}); counts must be finite."
            )
    neg = values < 0
    if neg.any():
        raise ValueError(
            f"{where} holds {int(neg.sum())} negative values (min {values.min():g}, e.g. {example(neg)}); "
            "counts must be >= 0."
        )


@doc_params
def validate(adata: AnnData, *, library_key: str = LIBRARY_KEY, layer: str | None = None) -> pd.DataFrame:
    """Check that ``adata`` follows stexp's layout and summarise each library.

    Checks: ``obsm["spatial"]`` exists with finite (x, y); every library in ``obs[library_key]`` has an
    entry in ``uns["spatial"]`` with scale factors and a derivable pixel size (µm/px); each in-memory image
    has its ``tissue_<res>_scalef``; each library has an image unless its metadata flags
    ``has_image=False``; ``X`` holds no NaN or negative counts. Spots outside their image are counted
    (and warned about), not removed.

    Parameters
    ----------
    adata
        AnnData to check.
    {library_key}
    layer
        A layer of raw counts to check as well as ``X``.

    Returns
    -------
    DataFrame indexed by library id with ``n_spots``, ``um_per_px``, ``spot_diameter_um``,
    ``images`` (resolution names and shapes), ``has_image`` and ``n_outside_image`` (``NA`` without image).

    Raises
    ------
    KeyError
        A library without an ``uns["spatial"]`` entry, scale factors or pixel size, an image without its
        scale factor, a missing ``obsm["spatial"]`` or ``layer``.
    ValueError
        NaN / infinite / negative counts (the message gives their number and an example spot and gene),
        duplicated ``var_names`` or ``obs_names`` (named), non-finite coordinates, or a library without image that is not flagged
        ``metadata["has_image"] = False``.
    FileNotFoundError
        A library whose only image is a ``source_image_path`` that does not exist.
    """
    if SPATIAL_KEY not in adata.uns:
        raise KeyError("adata.uns['spatial'] is missing: stexp needs the squidpy/scanpy Visium layout.")
    xy = spot_coords(adata)
    libs = library_ids(adata, library_key)
    for axis, names in (("var_names", adata.var_names), ("obs_names", adata.obs_names)):
        dup = _duplicated_names(names)
        if dup:
            what = "gene" if axis == "var_names" else "spot"
            raise ValueError(
                f"adata.{axis} holds {len(dup)} duplicated {what} name(s), e.g. {dup[:5]}; "
                f"make them unique (adata.{axis.replace('_names', '')}_names_make_unique() renames them)."
            )
    _check_counts(adata)
    if layer is not None:
        _check_counts(adata, layer)
    rows = {}
    for lib in libs:
        mask = library_mask(adata, lib, library_key)
        bad = ~np.isfinite(xy[mask]).all(axis=1)
        if bad.any():
            raise ValueError(f"library {lib!r}: {int(bad.sum())} spots have non-finite coordinates in obsm['spatial'].")
        sf = scalefactors(adata, lib)
        entry = spatial_entry(adata, lib)
        images = entry.get("images") or {}
        for res in images:
            if f"tissue_{res}_scalef" not in sf:
                raise KeyError(
                    f"library {lib!r}: image {res!r} has no scale factor 'tissue_{res}_scalef' "
                    f"(scale factors: {sorted(sf)})."
                )
        metadata = entry.get("metadata") or {}
        source = metadata.get("source_image_path")
        has_source = source is not None and Path(str(source)).is_file()
        has_image = bool(images) or has_source
        if not has_image:
            if source is not None:
                raise FileNotFoundError(
                    f"library {lib!r}: source_image_path {str(source)!r} does not exist and no image is in memory."
                )
            if metadata.get("has_image", True):
                raise ValueError(
                    f"library {lib!r} has no image in adata.uns['spatial'][{lib!r}]['images'] and no "
                    "source_image_path; set metadata['has_image'] = False for a counts-only library."
                )
        n_outside = pd.NA
        if has_image:
            inside = check_spots_in_image(adata, lib, on_outside="drop", library_key=library_key)
            n_outside = int((~inside).sum())
        rows[lib] = {
            "n_spots": int(mask.sum()),
            "um_per_px": um_per_px(adata, lib),
            "spot_diameter_um": spot_diameter_um(adata, lib),
            "images": ", ".join(f"{res} {np.shape(img)[1]}x{np.shape(img)[0]}" for res, img in images.items()),
            "has_image": has_image,
            "n_outside_image": n_outside,
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = library_key
    return table
