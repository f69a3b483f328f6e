"""SpatialData in and out: spots, images and units into stexp's AnnData layout, results back to the table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stexp._layout import PLATFORMS, check_um_per_px, record
from stexp._settings import logger

#: Longest side (px) of an in-memory image taken from a multiscale SpatialData image.
MAX_IMAGE_PX = 4000


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


def _image_array(element) -> tuple[np.ndarray, float]:
    """(H, W, C) numpy image and its downscale factor vs the element's full resolution."""
    import xarray as xr

    if isinstance(element, xr.DataArray):
        arr, factor = element, 1.0
    else:  # multiscale DataTree: the coarsest level whose longest side is still >= MAX_IMAGE_PX, else scale0
        levels = [element[name]["image"] for name in sorted(element.children)]
        full = max(levels[0].shape[1:])
        arr = levels[0]
        for level in levels[1:]:
            if max(level.shape[1:]) >= MAX_IMAGE_PX:
                arr = level
        factor = full / max(arr.shape[1:])
    img = np.moveaxis(np.asarray(arr.transpose("c", "y", "x").values), 0, -1)
    if img.shape[-1] == 4:  # RGBA (e.g. Space Ranger hires png): keep the colour channels
        img = img[..., :3]
    return img, float(factor)


def _res_name(key: str) -> str:
    for res in ("hires", "lowres"):
        if key.endswith(f"{res}_image") or key == res:
            return res
    return key


def from_spatialdata(
    sdata,
    *,
    table_key: str = "table",
    image_key: str | Sequence[str] | None = None,
    shapes_key: str | None = None,
    library_id: str | None = None,
    coordinate_system: str | None = None,
    spot_diameter_um: float = PLATFORMS["visium"]["spot_diameter_um"],
):
    """Turn a SpatialData (e.g. from ``spatialdata_io.visium``) into an AnnData in stexp's layout.

    Spot centres come from the circles of ``shapes_key``, expressed through spatialdata's transformations
    in the pixel frame of ``coordinate_system`` (for ``spatialdata_io.visium``, the dataset's system, whose
    frame is the full-resolution image), i.e. ``obsm["spatial"]`` in full-resolution pixels. Each image
    with an isotropic scale into that frame is kept in ``uns["spatial"][library_id]["images"]`` with its
    ``tissue_<res>_scalef``; µm per pixel comes from the circle diameter (``spot_diameter_um``, 55 µm
    for Visium).

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
        Physical spot diameter (µm) used to derive µm per pixel from the circle radius.

    Returns
    -------
    AnnData (a copy of the table's rows for the region; ``obs_names`` kept so that
    :func:`to_spatialdata` can write results back).
    """
    import pandas as pd
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import get_transformation

    table = _get(sdata.tables, table_key, "table")
    regions, region_key, instance_key = get_table_keys(table)
    regions = [regions] if isinstance(regions, str) else list(regions)
    if shapes_key is None:
        if len(regions) != 1:
            raise ValueError(f"table {table_key!r} annotates regions {regions}; pass shapes_key= naming one.")
        shapes_key = regions[0]
    shapes = _get(sdata.shapes, shapes_key, "shapes element")
    lib = str(library_id or shapes_key)

    shape_cs = get_transformation(shapes, get_all=True)
    image_keys = (
        list(sdata.images) if image_key is None else [image_key] if isinstance(image_key, str) else list(image_key)
    )
    for key in image_keys:
        _get(sdata.images, key, "image")
    if coordinate_system is None:
        identity = [cs for cs, t in shape_cs.items() if np.allclose(_affine(shapes, cs), np.eye(3))]
        shared = [
            cs for cs in shape_cs if any(cs in get_transformation(sdata.images[k], get_all=True) for k in image_keys)
        ]
        coordinate_system = (
            next((cs for cs in identity if cs in shared), None) or (shared or identity or list(shape_cs))[0]
        )
    elif coordinate_system not in shape_cs:
        raise KeyError(
            f"shapes {shapes_key!r} are not in coordinate system {coordinate_system!r} (they are in {list(shape_cs)})."
        )
    cs = coordinate_system

    # rows of the table for this region, matched to the shapes by instance id
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
    geo = shapes.loc[inst]
    matrix = _affine(shapes, cs)
    if (geo.geometry.geom_type == "Point").all():
        xy = np.column_stack([geo.geometry.x, geo.geometry.y])
        if "radius" not in geo:
            raise KeyError(f"shapes {shapes_key!r} are points without a 'radius' column; cannot size the spots.")
        diameter = 2 * np.asarray(geo["radius"], dtype=float)
    else:
        cent = geo.geometry.centroid
        xy = np.column_stack([cent.x, cent.y])
        diameter = 2 * np.sqrt(np.asarray(geo.geometry.area, dtype=float) / np.pi)
    xy = xy @ matrix[:2, :2].T + matrix[:2, 2]
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    diameter_px = float(np.median(diameter)) * scale
    mpp = check_um_per_px(spot_diameter_um / diameter_px, what=f"µm per pixel of library {lib!r} from the spot radius")

    images, scalefs = {}, {}
    for key in image_keys:
        element = sdata.images[key]
        if cs not in get_transformation(element, get_all=True):
            continue
        s = _pure_scale(_affine(element, cs), f"image {key!r}")
        img, factor = _image_array(element)
        res = _res_name(key)
        images[res] = img
        scalefs[f"tissue_{res}_scalef"] = 1.0 / (s * factor)
    if image_key is not None and not images:
        raise KeyError(f"image(s) {image_keys} are not in coordinate system {cs!r}.")
    scalefs.update(
        {"spot_diameter_fullres": diameter_px, "microns_per_pixel": mpp, "spot_diameter_um": float(spot_diameter_um)}
    )

    old = (table.uns.get("spatial") or {}).get(shapes_key) or {}
    metadata = {**dict(old.get("metadata") or {}), "has_image": bool(images), "coordinate_system": cs}
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


def to_spatialdata(adata, sdata, *, table_key: str = "table", layers: Sequence[str] | None = None) -> None:
    """Write stexp's results from ``adata`` back into a SpatialData table, matching spots by ``obs_names``.

    Written: ``layers`` (default: every layer whose name starts with ``"stexp"``), ``obsm`` keys starting
    with ``"X_stexp"``, ``obs`` columns starting with ``"stexp_"`` and ``uns["stexp"]``. Table rows absent
    from ``adata`` get NaN; genes of the table absent from ``adata`` get NaN in the written layers.

    Parameters
    ----------
    adata
        AnnData holding the results (e.g. from :func:`from_spatialdata`, then :func:`stexp.tl.predict`).
    sdata
        SpatialData to write into (modified in place).
    table_key
        Table to write into.
    layers
        Layers to write; default: the ``"stexp*"`` layers.
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
    if layers is None:
        layers = [k for k in adata.layers if k.startswith("stexp")]
    missing = [k for k in layers if k not in adata.layers]
    if missing:
        raise KeyError(f"layer(s) {missing} not in adata.layers (it has {list(adata.layers)}).")
    written = []
    gene_pos = table.var_names.get_indexer(adata.var_names)
    for key in layers:
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
