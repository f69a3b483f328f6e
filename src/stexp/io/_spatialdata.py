"""SpatialData in and out: spots, images and units into stexp's AnnData layout, results back to the table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from stexp._layout import PLATFORMS, THUMBNAIL_PX, check_um_per_px, record
from stexp._settings import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from spatialdata import SpatialData


#: Encoder input side (px) assumed when choosing the level patches are read from (the default encoders' 224).
PATCH_INPUT_PX = 224


def _get(container, key: str, what: str):
    if key not in container:
        raise KeyError(f"SpatialData has no {what} {key!r}; it has {what}s {list(container)}.")
    return container[key]


def _affine(element, cs: str) -> np.ndarray:
    """3x3 affine (x, y) of an element's intrinsic frame into coordinate system ``cs``."""
    from spatialdata.transformations import get_transformation

    return np.asarray(get_transformation(element, cs).to_affine_matrix(("x", "y"), ("x", "y")), dtype=float)


def _pure_scale(matrix: np.ndarray, what: str) -> float:
    sx, sy = matrix[0, 0], matrix[1, 1]
    off = np.abs([matrix[0, 1], matrix[1, 0], matrix[0, 2], matrix[1, 2]]).max()
    if off > 1e-6 * max(abs(sx), 1.0) or not np.isclose(sx, sy, rtol=1e-4) or sx <= 0:
        raise ValueError(
            f"{what} maps to the coordinate system by {matrix[:2].tolist()}, not an isotropic scale; stexp's "
            "scale factors cannot express it (pick another image_key or coordinate system)."
        )
    return float(sx)


def _levels(element) -> list:
    """The levels of an image element, finest first, each an xarray ``(c, y, x)`` (lazy: dask-backed)."""
    import xarray as xr

    if isinstance(element, xr.DataArray):
        return [element.transpose("c", "y", "x")]
    return [element[name]["image"].transpose("c", "y", "x") for name in sorted(element.children)]


def _level_rgb(level) -> np.ndarray:
    """One level computed into memory as ``(H, W, C)`` (RGBA -> RGB)."""
    img = np.moveaxis(np.asarray(level.values), 0, -1)
    if img.shape[-1] == 4:  # RGBA (e.g. Space Ranger hires png): keep the colour channels
        img = img[..., :3]
    return img


def _element_store(sdata, key: str):
    """The on-disk OME-Zarr folder of image ``key`` when its data are read from it (not changed in memory)."""
    from pathlib import Path

    root = getattr(sdata, "path", None)
    if root is None:
        return None
    path = (Path(root) / "images" / key).resolve()
    if not path.is_dir():
        return None
    try:
        from spatialdata import get_dask_backing_files

        backing = [Path(f).resolve() for f in get_dask_backing_files(sdata.images[key])]
    except Exception:  # noqa: BLE001 - an older spatialdata: trust the store
        return path
    return path if any(b == path or path in b.parents for b in backing) else None


def _res_name(key: str) -> str:
    for res in ("hires", "lowres"):
        if key.endswith(f"{res}_image") or key == res:
            return res
    return key


def _coordinate_system(sdata, shapes, shapes_key: str, image_keys: list[str], coordinate_system: str | None) -> str:
    """The given coordinate system (checked), else one where the shapes are the identity and the images are.

    Default order: an identity system of the shapes shared with an image, any system shared with an
    image, an identity system, the shapes' first system.
    """
    from spatialdata.transformations import get_transformation

    shape_cs = get_transformation(shapes, get_all=True)
    if coordinate_system is None:
        identity = [cs for cs, t in shape_cs.items() if np.allclose(_affine(shapes, cs), np.eye(3))]
        shared = [
            cs for cs in shape_cs if any(cs in get_transformation(sdata.images[k], get_all=True) for k in image_keys)
        ]
        return next((cs for cs in identity if cs in shared), None) or (shared or identity or list(shape_cs))[0]
    if coordinate_system not in shape_cs:
        raise KeyError(
            f"shapes {shapes_key!r} are not in coordinate system {coordinate_system!r} (they are in {list(shape_cs)})."
        )
    return coordinate_system


def _region_rows(table, table_key: str, shapes, shapes_key: str, region_key: str, instance_key: str):
    """A copy of the table's rows for region ``shapes_key`` and their shapes, matched by instance id."""
    import pandas as pd

    rows = table.obs[region_key].astype(str).to_numpy() == shapes_key
    if not rows.any():
        raise ValueError(f"table {table_key!r} has no rows for region {shapes_key!r} (column {region_key!r}).")
    adata = table[rows].copy()
    inst = adata.obs[instance_key].to_numpy()
    missing = ~pd.Index(inst).isin(shapes.index)
    if missing.any():
        raise KeyError(
            f"{int(missing.sum())} table rows have {instance_key!r} values absent from shapes {shapes_key!r}."
        )
    return adata, shapes.loc[inst]


def _spot_geometry(geo, shapes, shapes_key: str, cs: str) -> tuple[np.ndarray, float, bool]:
    """Spot centres (x, y) in the pixel frame of ``cs``, the median spot diameter there (px), and whether circles.

    Circles are measured by their radius; other shapes (Visium HD squares, cell polygons) by the diameter
    of the circle of the same area, around their centroid.
    """
    matrix = _affine(shapes, cs)
    circles = bool((geo.geometry.geom_type == "Point").all())
    if circles:
        xy = np.column_stack([geo.geometry.x, geo.geometry.y])
        if "radius" not in geo:
            raise KeyError(f"shapes {shapes_key!r} are points without a 'radius' column; cannot size the spots.")
        diameter = 2 * np.asarray(geo["radius"], dtype=float)
    else:  # squares (Visium HD bins), cell polygons (Xenium): the diameter of the circle of equal area
        cent = geo.geometry.centroid
        xy = np.column_stack([cent.x, cent.y])
        diameter = 2 * np.sqrt(np.asarray(geo.geometry.area, dtype=float) / np.pi)
    xy = xy @ matrix[:2, :2].T + matrix[:2, 2]
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    return xy, float(np.median(diameter)) * scale, circles


def _pixel_size(
    table, shapes_key: str, geo, lib: str, diameter_px: float, circles: bool, *, um_per_px, spot_diameter_um: float
) -> tuple[float, float]:
    """µm per pixel of the frame and the spot diameter (µm), as :func:`from_spatialdata` documents them.

    Circles: µm/px from ``spot_diameter_um`` unless ``um_per_px`` is given. Other shapes: µm/px from
    ``um_per_px`` or the table's ``microns_per_pixel`` (else a ValueError), the diameter measured.
    """
    if um_per_px is None and not circles:
        old_sf = ((table.uns.get("spatial") or {}).get(shapes_key) or {}).get("scalefactors") or {}
        um_per_px = old_sf.get("microns_per_pixel")
        if um_per_px is None:
            raise ValueError(
                f"shapes {shapes_key!r} are {geo.geometry.geom_type.iloc[0]}s, not circles of a known size: pass "
                "um_per_px= (µm per pixel of the coordinate system; e.g. 1.0 when it is in µm, as Xenium's "
                "'global') so the spot size can be measured from the geometry."
            )
    if um_per_px is not None:
        mpp = check_um_per_px(um_per_px, what="um_per_px")
        if not circles:
            spot_diameter_um = diameter_px * mpp
    else:
        mpp = check_um_per_px(
            spot_diameter_um / diameter_px, what=f"µm per pixel of library {lib!r} from the spot radius"
        )
    return mpp, spot_diameter_um


def _keep_images(sdata, image_keys: list[str], cs: str, mpp: float, spot_diameter_um: float):
    """The in-memory images, their ``tissue_<res>_scalef`` and the OME-Zarr folder to read patches from (or None).

    Images outside ``cs`` are skipped. A single-scale image is kept whole. A multiscale one is never
    computed whole: a thumbnail of about :data:`THUMBNAIL_PX` for plots, plus, unless its full-resolution
    frame is read lazily from its zarr store, the coarsest level fine enough for the default patches.
    """
    from spatialdata.transformations import get_transformation

    from stexp.images._patches import patch_um_for_spots

    images, scalefs = {}, {}
    source = None
    patch_um_per_px = patch_um_for_spots(spot_diameter_um) / PATCH_INPUT_PX  # what the default patches need
    for key in image_keys:
        element = sdata.images[key]
        if cs not in get_transformation(element, get_all=True):
            continue
        s = _pure_scale(_affine(element, cs), f"image {key!r}")
        levels = _levels(element)
        full = max(levels[0].shape[1:])
        res = _res_name(key)
        if len(levels) == 1:  # a single-scale image (e.g. Space Ranger's hires / lowres PNG): in memory
            images[res], factor = _level_rgb(levels[0]), 1.0
        else:
            store = _element_store(sdata, key)
            if store is not None and source is None and np.isclose(s, 1.0, rtol=1e-4):
                source = store  # the full-resolution frame itself, read lazily from the zarr store
            if store is None or not np.isclose(s, 1.0, rtol=1e-4):
                # no store to read lazily: the coarsest level that still has the µm/px the patches need
                level_mpp = [mpp * s * full / max(lv.shape[1:]) for lv in levels]
                ok = [i for i, m in enumerate(level_mpp) if m <= patch_um_per_px * (1 + 1e-3)] or [0]
                chosen = levels[max(ok)]
                images[res] = _level_rgb(chosen)
                scalefs[f"tissue_{res}_scalef"] = max(chosen.shape[1:]) / full / s
            # a thumbnail for plots: the coarsest level that is still >= THUMBNAIL_PX (computed alone)
            thumb = next((lv for lv in reversed(levels) if max(lv.shape[1:]) >= THUMBNAIL_PX), levels[0])
            res_thumb = f"{res}_thumbnail" if res in images else res
            images[res_thumb] = _level_rgb(thumb)
            scalefs[f"tissue_{res_thumb}_scalef"] = max(thumb.shape[1:]) / full / s
            continue
        scalefs[f"tissue_{res}_scalef"] = 1.0 / (s * factor)
    return images, scalefs, source


def from_spatialdata(
    sdata: SpatialData,
    *,
    table_key: str = "table",
    image_key: str | Sequence[str] | None = None,
    shapes_key: str | None = None,
    library_id: str | None = None,
    coordinate_system: str | None = None,
    spot_diameter_um: float = PLATFORMS["visium"]["spot_diameter_um"],
    um_per_px: float | None = None,
) -> AnnData:
    """Turn a SpatialData (e.g. from ``spatialdata_io.visium``) into an AnnData in stexp's layout.

    Spot centres come from the shapes of ``shapes_key`` (circles' centres, polygons' centroids), expressed
    through spatialdata's transformations in the pixel frame of ``coordinate_system`` (for
    ``spatialdata_io.visium``, the dataset's system, whose frame is the full-resolution image), i.e.
    ``obsm["spatial"]`` in full-resolution pixels.

    Spot size and µm per pixel: for **circles** (Visium spots) µm per pixel comes from the circle diameter
    (``spot_diameter_um``, 55 µm for Visium) unless ``um_per_px`` is given. For **other shapes** (Visium HD
    squares, Xenium / segmentation polygons) the spot is measured from the geometry: its diameter is that
    of the circle of the same area (median over spots), in µm through ``um_per_px`` (or the table's
    ``uns["spatial"][...]["scalefactors"]["microns_per_pixel"]``), never a 55 µm circle.

    Images: each image with an isotropic scale into that frame is kept in
    ``uns["spatial"][library_id]["images"]`` with its ``tissue_<res>_scalef``. A multiscale image is not
    computed whole: a thumbnail of about 2,000 px is kept for plots, and the patches are read region by
    region at the pyramid level they need, from the image's OME-Zarr folder (when ``sdata`` is backed by a
    zarr store: ``metadata["source_image_path"]``) or else from the finest level whose µm per pixel a
    patch of 1.5 spot diameters at 224 px still needs.

    Parameters
    ----------
    sdata
        The SpatialData object.
    table_key
        Table holding the counts.
    image_key
        Image element(s) to keep; default: every image in the coordinate system.
    shapes_key
        Circles of the spots; default: the region the table annotates.
    library_id
        Library name; default: ``shapes_key``.
    coordinate_system
        Coordinate system of the full-resolution pixel frame; default: one where the shapes have an
        identity transformation, else the first shared by the shapes and images.
    spot_diameter_um
        Physical spot diameter (µm) used to derive µm per pixel from the circle radius (circles only).
    um_per_px
        µm per pixel of the coordinate system's frame. Required for non-circle shapes when the table does
        not record ``microns_per_pixel``; for circles it overrides the value from ``spot_diameter_um``.

    Returns
    -------
    AnnData (a copy of the table's rows for the region; ``obs_names`` kept so that
    :func:`to_spatialdata` can write results back).
    """
    import pandas as pd
    from spatialdata.models import get_table_keys

    table = _get(sdata.tables, table_key, "table")
    regions, region_key, instance_key = get_table_keys(table)
    regions = [regions] if isinstance(regions, str) else list(regions)
    if shapes_key is None:
        if len(regions) != 1:
            raise ValueError(f"table {table_key!r} annotates regions {regions}; pass shapes_key= naming one.")
        shapes_key = regions[0]
    shapes = _get(sdata.shapes, shapes_key, "shapes element")
    lib = str(library_id or shapes_key)
    image_keys = (
        list(sdata.images) if image_key is None else [image_key] if isinstance(image_key, str) else list(image_key)
    )
    for key in image_keys:
        _get(sdata.images, key, "image")
    cs = _coordinate_system(sdata, shapes, shapes_key, image_keys, coordinate_system)

    adata, geo = _region_rows(table, table_key, shapes, shapes_key, region_key, instance_key)
    xy, diameter_px, circles = _spot_geometry(geo, shapes, shapes_key, cs)
    mpp, spot_diameter_um = _pixel_size(
        table, shapes_key, geo, lib, diameter_px, circles, um_per_px=um_per_px, spot_diameter_um=spot_diameter_um
    )
    images, scalefs, source = _keep_images(sdata, image_keys, cs, mpp, spot_diameter_um)
    if image_key is not None and not images:
        raise KeyError(f"image(s) {image_keys} are not in coordinate system {cs!r}.")
    scalefs.update(
        {"spot_diameter_fullres": diameter_px, "microns_per_pixel": mpp, "spot_diameter_um": float(spot_diameter_um)}
    )

    old = (table.uns.get("spatial") or {}).get(shapes_key) or {}
    metadata = {**dict(old.get("metadata") or {}), "has_image": bool(images), "coordinate_system": cs}
    if source is not None:
        metadata["source_image_path"] = str(source)
    adata.uns["spatial"] = {lib: {"images": images, "scalefactors": scalefs, "metadata": metadata}}
    adata.obsm["spatial"] = xy.astype(np.float64)
    adata.obs["library_id"] = pd.Categorical([lib] * adata.n_obs)
    record(
        adata,
        "from_spatialdata",
        {"table_key": table_key, "shapes_key": shapes_key, "images": list(images), "coordinate_system": cs},
    )
    logger.info(
        f"from SpatialData: library {lib!r}, {adata.n_obs} spots, images {list(images)}, {mpp:.3f} µm/px "
        f"(coordinate system {cs!r})"
    )
    return adata


def to_spatialdata(
    adata: AnnData, sdata: SpatialData, *, table_key: str = "table", layers: Sequence[str] | None = None
) -> None:
    """Write stexp's results from ``adata`` back into a SpatialData table, matching spots by ``obs_names``.

    Written: the predictions ``layers`` (default: every prediction whose key starts with ``"stexp"``: a
    layer, or a panel-only ``obsm`` gene DataFrame (see :func:`stexp.tl.predict`), written as the same
    DataFrame), ``obsm`` keys starting with ``"X_stexp"``, ``obs`` columns starting with ``"stexp_"`` and
    ``uns["stexp"]``. Table rows absent from ``adata`` get NaN; genes of the table absent from ``adata``
    get NaN in the written layers.

    Parameters
    ----------
    adata
        AnnData holding the results (e.g. from :func:`from_spatialdata`, then :func:`stexp.tl.predict`).
    sdata
        SpatialData to write into (modified in place).
    table_key
        Table to write into.
    layers
        Predictions to write (layer or ``obsm`` DataFrame keys); default: the ``"stexp*"`` ones.
    """
    import pandas as pd
    from scipy import sparse

    table = _get(sdata.tables, table_key, "table")
    pos = table.obs_names.get_indexer(adata.obs_names)
    n_match = int((pos >= 0).sum())
    if n_match == 0:
        raise ValueError(
            f"no spot of adata ({adata.n_obs}, e.g. {list(adata.obs_names[:3])}) is in table {table_key!r} "
            f"({table.n_obs}, e.g. {list(table.obs_names[:3])}); obs_names must match."
        )
    if n_match < adata.n_obs:
        logger.warning(
            f"{adata.n_obs - n_match} spots of adata are not in table {table_key!r}; their results are skipped."
        )
    ok = pos >= 0
    rows = pos[ok]
    # a prediction is a layer or a panel-only obsm gene DataFrame (the rule of stexp.tl._storage)
    frames = [k for k in adata.obsm if isinstance(adata.obsm[k], pd.DataFrame)]
    if layers is None:
        layers = [k for k in [*adata.layers, *frames] if k.startswith("stexp")]
    missing = [k for k in layers if k not in frames and k not in adata.layers]
    if missing:
        raise KeyError(f"layer(s) {missing} not in adata.layers (it has {list(adata.layers)}).")
    written = []
    gene_pos = table.var_names.get_indexer(adata.var_names)
    for key in [k for k in layers if k in frames]:  # panel-only predictions: an obsm gene DataFrame, as is
        frame = adata.obsm[key]
        out = pd.DataFrame(np.nan, index=table.obs_names.copy(), columns=frame.columns, dtype=np.float32)
        out.iloc[rows] = frame.to_numpy()[ok]
        table.obsm[key] = out
        written.append(f"obsm[{key!r}]")
    for key in [k for k in layers if k not in frames]:
        values = adata.layers[key]
        values = values.toarray() if sparse.issparse(values) else np.asarray(values)
        out = np.full(table.shape, np.nan, dtype=np.float32)
        gok = gene_pos >= 0
        out[np.ix_(rows, gene_pos[gok])] = values[np.ix_(ok, gok)]
        table.layers[key] = out
        written.append(f"layers[{key!r}]")
    for key in [k for k in adata.obsm if k.startswith("X_stexp")]:
        values = np.asarray(adata.obsm[key], dtype=np.float32)
        out = np.full((table.n_obs, values.shape[1]), np.nan, dtype=np.float32)
        out[rows] = values[ok]
        table.obsm[key] = out
        written.append(f"obsm[{key!r}]")
    for col in [c for c in adata.obs if c.startswith("stexp_")]:
        table.obs[col] = pd.Series(adata.obs[col].to_numpy()[ok], index=table.obs_names[rows]).reindex(table.obs_names)
        if isinstance(adata.obs[col].dtype, pd.CategoricalDtype):
            table.obs[col] = pd.Categorical(table.obs[col], categories=adata.obs[col].cat.categories)
        written.append(f"obs[{col!r}]")
    if "stexp" in adata.uns:
        table.uns["stexp"] = adata.uns["stexp"]
        written.append("uns['stexp']")
    logger.info(f"wrote {', '.join(written) or 'nothing'} into table {table_key!r} ({n_match} spots matched)")
