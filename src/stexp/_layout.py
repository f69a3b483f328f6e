"""The one AnnData layout every stexp step reads and writes (the squidpy / scanpy Visium layout).

Per spot
    ``adata.X``                 raw UMI counts (sparse CSR), or the layer named by ``layer=``.
    ``adata.obs[library_key]``  which slide (default ``"library_id"``), categorical.
    ``adata.obs["array_row"]``, ``adata.obs["array_col"]``  integer array coordinates.
    ``adata.obsm["spatial"]``   spot centre (x, y) in **full-resolution** image pixels.

Per library, ``adata.uns["spatial"][library_id]``
    ``["images"]``              in-memory images, e.g. ``{"hires": array, "lowres": array}`` (H, W, 3).
    ``["scalefactors"]``        ``tissue_<res>_scalef`` (full-res px -> <res> px) for each image,
                                ``spot_diameter_fullres`` (px), and stexp's physical units
                                ``microns_per_pixel`` (µm per full-res px) and ``spot_diameter_um``.
    ``["metadata"]["source_image_path"]``  optional path of the full-resolution image (scanpy's key);
                                it is decoded lazily, one slide at a time.

What stexp itself did is recorded under ``adata.uns["stexp"]``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LIBRARY_KEY = "library_id"
SPATIAL_KEY = "spatial"
UNS_KEY = "stexp"

#: Physical spot geometry of the supported platforms (µm).
PLATFORMS: dict[str, dict[str, float]] = {
    "visium": {"spot_diameter_um": 55.0, "pitch_um": 100.0},
    "st": {"spot_diameter_um": 100.0, "pitch_um": 200.0},
}

#: Plausible range of a full-resolution pixel size (µm per px); outside means wrong units.
UM_PER_PX_RANGE = (0.05, 50.0)

#: Longest side (px) of the in-memory copy of a slide that the readers keep in
#: ``uns["spatial"][library_id]["images"]`` (``"hires"``, or a multiscale image's thumbnail): plots draw
#: on it and tissue is found on it; patches come from the full-resolution source when there is one.
THUMBNAIL_PX = 2000
#: Longest side (px) of the ``"lowres"`` copy kept beside it.
LOWRES_PX = 600


def check_um_per_px(value: Any, *, what: str = "um_per_px") -> float:
    """Validate a pixel size in µm per pixel and return it as a float: the one plausibility rule of stexp.

    Every µm/px that enters stexp goes through here: ``mpp=`` of :func:`stexp.io.read_wsi` and
    :func:`stexp.pp.embed_images`, ``um_per_px=`` of :func:`stexp.io.grid_spots`, :func:`stexp.io.read_st`
    and :func:`stexp.io.from_spatialdata`, the pixel size a slide file states, and a library's
    ``microns_per_pixel`` scale factor.

    Parameters
    ----------
    value
        The pixel size (a real number; a 0-d numpy array is taken as its value).
    what
        How messages name the value (e.g. ``"mpp"``).

    Raises
    ------
    TypeError
        If the value is not a real number (a string, ``True`` / ``False``, ``None``...).
    ValueError
        If it is not finite and positive, or lies outside :data:`UM_PER_PX_RANGE`
        (e.g. mm or nm given instead of µm).
    """
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{what} must be a number of µm per pixel (e.g. 0.5 for a 20x scan), got {type(value).__name__} {value!r}."
        )
    value = float(value)
    lo, hi = UM_PER_PX_RANGE
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{what} must be a positive number of µm per pixel in the plausible range [{lo}, {hi}], got {value!r}."
        )
    if not lo <= value <= hi:
        raise ValueError(
            f"{what}={value:g} µm per pixel is outside the plausible range [{lo}, {hi}]; "
            "check the units (µm, not mm or nm)."
        )
    return value


def library_ids(adata, library_key: str = LIBRARY_KEY) -> list[str]:
    """Library ids present in ``adata.obs[library_key]``, in order of appearance.

    When ``library_key`` is not a column and ``uns["spatial"]`` holds exactly one library,
    that library is used for every spot (the layout of a single ``sq.read.visium``).

    Raises
    ------
    KeyError
        If the key is missing and the library cannot be inferred, or if a library in ``obs``
        has no entry in ``adata.uns["spatial"]``.
    """
    spatial = adata.uns.get(SPATIAL_KEY, {})
    if library_key in adata.obs:
        libs = [str(lib) for lib in dict.fromkeys(adata.obs[library_key].astype(str))]
    elif len(spatial) == 1:
        libs = [str(next(iter(spatial)))]
    else:
        raise KeyError(
            f"adata.obs has no column {library_key!r} and adata.uns['spatial'] holds "
            f"{len(spatial)} libraries ({list(spatial)[:5]}); pass library_key= naming the slide column."
        )
    missing = [lib for lib in libs if lib not in spatial]
    if missing:
        raise KeyError(
            f"library id(s) {missing} in adata.obs[{library_key!r}] have no entry in adata.uns['spatial'] "
            f"(it has {list(spatial)})."
        )
    return libs


def library_mask(adata, library_id: str, library_key: str = LIBRARY_KEY) -> np.ndarray:
    """Boolean mask of the spots of one library."""
    if library_key not in adata.obs:
        libs = library_ids(adata, library_key)
        if libs != [library_id]:
            raise KeyError(f"library {library_id!r} not found; this AnnData holds {libs}.")
        return np.ones(adata.n_obs, dtype=bool)
    return (adata.obs[library_key].astype(str) == str(library_id)).to_numpy()


def library_labels(adata, library_key: str = LIBRARY_KEY) -> np.ndarray:
    """Library id of every spot as a string array (works for single-library data without the column)."""
    if library_key in adata.obs:
        return adata.obs[library_key].astype(str).to_numpy()
    (lib,) = library_ids(adata, library_key)
    return np.full(adata.n_obs, lib, dtype=object)


def spatial_entry(adata, library_id: str) -> dict[str, Any]:
    """``adata.uns["spatial"][library_id]``, with a clear error when it is missing."""
    spatial = adata.uns.get(SPATIAL_KEY)
    if spatial is None:
        raise KeyError("adata.uns['spatial'] is missing: stexp needs the squidpy/scanpy Visium layout.")
    if library_id not in spatial:
        raise KeyError(f"library {library_id!r} has no entry in adata.uns['spatial'] (it has {list(spatial)}).")
    return spatial[library_id]


def scalefactors(adata, library_id: str) -> Mapping[str, float]:
    """Scale factors of a library; raises KeyError when absent."""
    entry = spatial_entry(adata, library_id)
    sf = entry.get("scalefactors")
    if not sf:
        raise KeyError(f"adata.uns['spatial'][{library_id!r}] has no 'scalefactors'.")
    return sf


def um_per_px(adata, library_id: str) -> float:
    """µm per full-resolution pixel of a library.

    Uses ``scalefactors["microns_per_pixel"]`` when present, else derives it from the spot diameter
    (``spot_diameter_um / spot_diameter_fullres``, 55 µm for Visium when ``spot_diameter_um`` is absent).
    """
    sf = scalefactors(adata, library_id)
    if "microns_per_pixel" in sf:
        return check_um_per_px(sf["microns_per_pixel"], what=f"microns_per_pixel of library {library_id!r}")
    if "spot_diameter_fullres" not in sf:
        raise KeyError(
            f"library {library_id!r}: scale factors have neither 'microns_per_pixel' nor 'spot_diameter_fullres'; "
            "cannot tell the physical pixel size."
        )
    diam_um = float(sf.get("spot_diameter_um", PLATFORMS["visium"]["spot_diameter_um"]))
    return check_um_per_px(diam_um / float(sf["spot_diameter_fullres"]), what=f"pixel size of library {library_id!r}")


def spot_diameter_um(adata, library_id: str) -> float:
    """Spot diameter of a library in µm."""
    sf = scalefactors(adata, library_id)
    if "spot_diameter_um" in sf:
        return float(sf["spot_diameter_um"])
    if "spot_diameter_fullres" in sf:
        return float(sf["spot_diameter_fullres"]) * um_per_px(adata, library_id)
    return PLATFORMS["visium"]["spot_diameter_um"]


def spot_coords(adata, library_key: str = LIBRARY_KEY) -> np.ndarray:
    """Spot centres in full-resolution pixels, float64 ``(n_obs, 2)`` as (x, y)."""
    if SPATIAL_KEY not in adata.obsm:
        raise KeyError("adata.obsm['spatial'] is missing: stexp needs spot centres in full-resolution pixels.")
    xy = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ValueError(f"adata.obsm['spatial'] must have shape (n_spots, 2), got {xy.shape}.")
    return xy[:, :2]


def record(adata, step: str | tuple[str, ...], params: Mapping[str, Any]) -> None:
    """Record what a step did (parameters, units, package versions) in ``adata.uns["stexp"]``.

    ``step`` is a key of ``uns["stexp"]`` or a path of keys (``("features", "X_stexp_...")`` writes
    ``uns["stexp"]["features"]["X_stexp_..."]``). Values are stored in forms h5ad can write: ``None``
    values are left out (a missing key reads back as ``None``), tuples become lists, numpy scalars
    Python numbers; DataFrames and arrays are kept.
    """
    from ._versions import versions

    path = (step,) if isinstance(step, str) else tuple(step)
    node = adata.uns.setdefault(UNS_KEY, {})
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = {**_jsonable(dict(params)), "versions": versions()}


def counts_matrix(adata, layer: str | None = None) -> tuple[Any, str]:
    """The raw-count matrix (``adata.X`` or ``adata.layers[layer]``) and how to name it in messages.

    Raises
    ------
    KeyError
        If ``layer`` is not a layer of ``adata``.
    """
    if layer is None:
        return adata.X, "adata.X"
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not found; adata.layers has {list(adata.layers)}.")
    return adata.layers[layer], f"adata.layers[{layer!r}]"


def mark_unmeasured(adata) -> None:
    """Flag ``adata`` as holding no measured expression (pseudo-spots of an H&E-only slide)."""
    adata.uns.setdefault(UNS_KEY, {})["unmeasured"] = True


def is_unmeasured(adata) -> bool:
    """Whether ``adata`` was flagged by :func:`mark_unmeasured` (its ``X`` is not a measurement)."""
    return bool(adata.uns.get(UNS_KEY, {}).get("unmeasured", False))


def _jsonable(obj: Any) -> Any:
    """Turn numpy scalars, tuples and paths into types that h5ad and JSON can store; drop ``None`` values."""
    import pandas as pd

    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [float("nan") if v is None else _jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (str, int, float, bool, np.ndarray, pd.DataFrame)):
        return obj
    return str(obj)


def as_list(value: str | Sequence[str] | None) -> list[str] | None:
    """``None`` stays ``None``; a single string becomes a one-element list."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return list(value)
