"""Reader for legacy Spatial Transcriptomics folders (counts tsv, spot selection file, H&E jpg)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from stexp._layout import LOWRES_PX, PLATFORMS, THUMBNAIL_PX, check_um_per_px, record
from stexp._settings import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


def _spot_ids(x, y) -> pd.Index:
    return pd.Index([f"{int(a)}x{int(b)}" for a, b in zip(x, y, strict=True)])


def _read_text(path: Path, what: str) -> str:
    """The text of a (optionally gzipped) tsv; a truncated, damaged or non-UTF-8 file raises a ValueError naming it."""
    import gzip
    import zlib

    try:
        with open(path, "rb") as fh:
            is_gzip = fh.read(2) == b"\x1f\x8b"
        opener = gzip.open if is_gzip else open
        with opener(path, "rt", encoding="utf-8") as fh:
            return fh.read()
    except EOFError as err:
        raise ValueError(f"{what} {str(path)!r} is truncated (the gzip stream ends early: {err}).") from err
    except (gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(f"{what} {str(path)!r} is a damaged gzip file: {err}.") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text ({err}); is it a counts table?") from err
    except IsADirectoryError as err:
        raise FileNotFoundError(f"{what} {str(path)!r} is a directory, not a file.") from err


def _duplicated(names) -> list[str]:
    return list(dict.fromkeys(pd.Index(names)[pd.Index(names).duplicated()].astype(str)))


def _unquote(name: str) -> str:
    return name[1:-1] if len(name) >= 2 and name[0] == name[-1] == '"' else name


def _parse_counts_fast(path: Path, what: str = "counts file") -> pd.DataFrame | None:
    """Parse a spots x genes tsv(.gz) with numpy; ``None`` when its values need pandas' rules.

    pandas' C parser spends seconds on the ~15,000 columns of an ST counts table; numpy reads the same
    numbers ~10x faster. Values numpy cannot take (empty or NA fields, text) return ``None`` so the caller
    falls back to :func:`pandas.read_csv` and its behaviour. Problems of the table's shape raise a
    :class:`ValueError` naming the file instead, because pandas would read them silently wrong: an empty
    file, no spot rows, duplicated gene names (pandas renames ``G2`` to ``G2.1``), rows with another
    number of fields than the header (pandas shifts them into the index or pads them with NaN).
    """
    text = _read_text(path, what)
    lines = [line for line in text.splitlines() if line]  # a line of tabs is a (header) row, not blank
    del text
    if not lines:
        raise ValueError(f"{what} {str(path)!r} is empty.")
    header = [_unquote(h) for h in lines[0].split("\t")]  # R's write.table quotes names: "G1"
    n_fields = [line.count("\t") + 1 for line in lines[1:]]
    # a header with an (often empty) index name, or R's write.table header without one
    r_style = header[0] != "" and bool(n_fields) and all(n == len(header) + 1 for n in n_fields)
    genes = header if r_style else header[1:]
    bad = [i for i, n in enumerate(n_fields) if n != len(genes) + 1]
    if bad:
        i = bad[0]
        raise ValueError(
            f"{what} {str(path)!r}: {len(bad)} row(s) have another number of fields than the header's "
            f"{len(genes)} genes + the spot id, e.g. line {i + 2} has {n_fields[i]} fields."
        )
    dup = _duplicated(genes)
    if dup:
        raise ValueError(f"{what} {str(path)!r}: {len(dup)} gene name(s) appear more than once: {dup[:10]}.")
    if any(not g.strip() for g in genes):
        raise ValueError(f"{what} {str(path)!r}: the header has an empty gene name (column {genes.index('') + 2}).")
    if len(lines) < 2:
        return pd.DataFrame(np.zeros((0, len(genes)), dtype=np.float32), columns=pd.Index(genes))
    ids, rest = zip(*(line.split("\t", 1) for line in lines[1:]), strict=True)
    ids = tuple(_unquote(i) for i in ids)
    del lines
    try:
        # float32 holds every integer count up to 2**24 exactly (X is float32 anyway) at half the memory
        values = np.loadtxt(rest, delimiter="\t", dtype=np.float32, ndmin=2)
    except ValueError:
        return None
    if values.shape != (len(ids), len(genes)):
        return None
    return pd.DataFrame(values, index=pd.Index(ids), columns=pd.Index(genes))


def _read_counts(counts: str | os.PathLike | pd.DataFrame, library_id: str) -> tuple[pd.DataFrame, str]:
    """The counts table and how to name it in messages (``"counts file '<path>'"`` or ``"counts DataFrame"``)."""
    if isinstance(counts, pd.DataFrame):
        df, source = counts.copy(deep=False), "counts DataFrame"  # its index is re-typed below: not the user's
    else:
        path = Path(counts)
        if not path.is_file():
            raise FileNotFoundError(f"library {library_id!r}: counts file {str(path)!r} does not exist.")
        what = f"library {library_id!r}: counts file"
        source = f"counts file {str(path)!r}"
        df = _parse_counts_fast(path, what)
        if df is None:
            df = pd.read_csv(path, sep="\t", index_col=0)
    df.index = df.index.astype(str)
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise ValueError(f"library {library_id!r}: the {source} is empty ({df.shape[0]} spots x {df.shape[1]} genes).")
    dup = df.index[df.index.duplicated()]
    if len(dup):
        raise ValueError(
            f"library {library_id!r}: {len(dup)} duplicated spot ids in the {source}, e.g. {list(dup[:3])}."
        )
    dup_genes = _duplicated(df.columns)
    if dup_genes:
        raise ValueError(
            f"library {library_id!r}: {len(dup_genes)} gene name(s) appear more than once in the {source}: "
            f"{dup_genes[:10]}."
        )
    non_numeric = [c for c, t in df.dtypes.items() if not np.issubdtype(t, np.number) or np.issubdtype(t, np.bool_)]
    if non_numeric:
        raise ValueError(f"library {library_id!r}: non-numeric count columns {non_numeric[:5]} in the {source}.")
    return df, source


def _check_image_scale(image_scale) -> float:
    import numbers

    if isinstance(image_scale, bool) or not isinstance(image_scale, numbers.Real):
        raise TypeError(f"image_scale must be a positive number, got {type(image_scale).__name__} {image_scale!r}.")
    if not np.isfinite(float(image_scale)) or image_scale <= 0:
        raise ValueError(f"image_scale must be a positive number, got {image_scale!r}.")
    return float(image_scale)


def _read_table(path: Path, what: str) -> pd.DataFrame:
    """A small tsv (spot or labels file) read with pandas; an empty or undecodable file raises a ValueError naming it."""
    try:
        return pd.read_csv(path, sep="\t")
    except pd.errors.EmptyDataError as err:
        raise ValueError(f"{what} {str(path)!r} is empty.") from err
    except (pd.errors.ParserError, UnicodeDecodeError, EOFError, OSError) as err:
        raise ValueError(f"{what} {str(path)!r} cannot be read as a tab-separated table: {err}") from err


def _numeric_columns(df: pd.DataFrame, columns, source: str) -> pd.DataFrame:
    """``df`` with ``columns`` as float; text values raise a ValueError naming the column and an example."""
    out = df.copy()
    for col in columns:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() & df[col].notna()
        if bad.any():
            raise ValueError(
                f"{source}: column {col!r} has {int(bad.sum())} non-numeric value(s), e.g. {df[col][bad].iloc[0]!r}."
            )
        out[col] = values.astype(float)
    return out


def _read_spots(spots: str | os.PathLike | pd.DataFrame, library_id: str, drop_unselected: bool) -> pd.DataFrame:
    if isinstance(spots, pd.DataFrame):
        df = spots.copy()
        name = "spot file (DataFrame)"
    else:
        path = Path(spots)
        if not path.is_file():
            raise FileNotFoundError(f"library {library_id!r}: spot file {str(path)!r} does not exist.")
        df = _read_table(path, f"library {library_id!r}: spot file")
        name = f"spot file {str(path)!r}"
    source = f"library {library_id!r}: {name}"
    missing = [c for c in ("x", "y", "pixel_x", "pixel_y") if c not in df.columns]
    if missing:
        raise KeyError(f"{source} lacks column(s) {missing} (it has {list(df.columns)}).")
    coords = ["x", "y", "pixel_x", "pixel_y"]
    df = _numeric_columns(df, coords + (["selected"] if drop_unselected and "selected" in df.columns else []), source)
    n_before = len(df)
    df = df.dropna(subset=coords)
    if len(df) < n_before:
        logger.info(f"{source}: skipped {n_before - len(df)} rows without coordinates.")
    infinite = ~np.isfinite(df[coords].to_numpy(dtype=float)).all(axis=1)
    if infinite.any():
        raise ValueError(f"{source}: {int(infinite.sum())} spots have infinite coordinates.")
    if drop_unselected and "selected" in df.columns:
        df = df[df["selected"] == 1]
    df.index = _spot_ids(df["x"].round(), df["y"].round())
    dup = df.index[df.index.duplicated()]
    if len(dup):
        raise ValueError(f"library {library_id!r}: {len(dup)} duplicated spot ids in the {name}, e.g. {list(dup[:3])}.")
    return df


def estimate_um_per_px(pixel_xy: np.ndarray, array_xy: np.ndarray, *, pitch_um: float) -> float:
    """µm per pixel from the spot pitch: median over spots of (array distance x pitch) / pixel distance.

    Each spot is paired with its nearest neighbour in pixel space, so missing spots (gaps of two or more
    array steps) do not bias the estimate.
    """
    from scipy.spatial import cKDTree

    pixel_xy = np.asarray(pixel_xy, dtype=float)
    array_xy = np.asarray(array_xy, dtype=float)
    if len(pixel_xy) < 2:
        raise ValueError(
            f"need at least 2 spots to derive µm per pixel from the pitch, got {len(pixel_xy)}; pass um_per_px=."
        )
    if not (np.isfinite(pixel_xy).all() and np.isfinite(array_xy).all()):
        raise ValueError("cannot derive µm per pixel from non-finite spot coordinates; pass um_per_px=.")
    _, idx = cKDTree(pixel_xy).query(pixel_xy, k=2)
    nn = idx[:, 1]
    if (nn >= len(pixel_xy)).any():  # distances overflow (coordinates near 1e154): no neighbour found
        raise ValueError(
            f"cannot derive µm per pixel: pixel coordinates up to {np.abs(pixel_xy).max():.3g} are out of range; "
            "check image_scale or pass um_per_px=."
        )
    d_px = np.linalg.norm(pixel_xy - pixel_xy[nn], axis=1)
    d_arr = np.linalg.norm(array_xy - array_xy[nn], axis=1)
    ok = (d_px > 0) & (d_arr > 0)
    if not ok.any():
        raise ValueError("cannot derive µm per pixel: spots coincide in pixel or array space; pass um_per_px=.")
    return float(np.median(d_arr[ok] * pitch_um / d_px[ok]))


def _load_image(path: Path, library_id: str) -> tuple[dict[str, np.ndarray], dict[str, float], tuple[int, int]]:
    """Decode an H&E once (at reduced scale where the codec allows) into hires/lowres copies."""
    from PIL import Image

    from stexp.images._slide import decode_image

    hires, (width, height) = decode_image(path, max_px=THUMBNAIL_PX, what=f"library {library_id!r}: ")
    lscale = min(1.0, LOWRES_PX / max(width, height))
    lowres_size = (max(1, round(width * lscale)), max(1, round(height * lscale)))
    lowres = hires.resize(lowres_size, Image.Resampling.LANCZOS)
    images = {"hires": np.asarray(hires), "lowres": np.asarray(lowres)}
    scalefs = {
        "tissue_hires_scalef": images["hires"].shape[1] / width,
        "tissue_lowres_scalef": images["lowres"].shape[1] / width,
    }
    return images, scalefs, (width, height)


def _read_labels(labels: str | os.PathLike | pd.DataFrame, library_id: str) -> pd.Series:
    if isinstance(labels, pd.DataFrame):
        df = labels.copy()
    else:
        path = Path(labels)
        if not path.is_file():
            raise FileNotFoundError(f"library {library_id!r}: labels file {str(path)!r} does not exist.")
        df = _read_table(path, f"library {library_id!r}: labels file")
    missing = [c for c in ("x", "y", "label") if c not in df.columns]
    if missing:
        raise KeyError(f"library {library_id!r}: labels file lacks column(s) {missing} (it has {list(df.columns)}).")
    n_before = len(df)
    df = _numeric_columns(df, ["x", "y"], f"library {library_id!r}: labels")
    df = df.dropna(subset=["x", "y"])
    df = df[np.isfinite(df[["x", "y"]].to_numpy(dtype=float)).all(axis=1)]
    if len(df) < n_before:
        logger.info(f"library {library_id!r}: skipped {n_before - len(df)} label rows without coordinates.")
    ids = _spot_ids(df["x"].round(), df["y"].round())
    out = pd.Series(df["label"].to_numpy(), index=ids)
    dup = out.index.duplicated(keep=False)
    if dup.any():
        conflicting = out[dup].groupby(level=0).nunique(dropna=False)
        conflicting = list(conflicting.index[conflicting > 1])
        if conflicting:
            raise ValueError(
                f"library {library_id!r}: {len(conflicting)} spot(s) get different labels from the labels file, "
                f"e.g. {conflicting[:3]} ({out.loc[conflicting[0]].tolist()})."
            )
    return out[~out.index.duplicated(keep="first")]


def _image_path(image: str | os.PathLike | None, library_id: str) -> Path | None:
    """The H&E's absolute path (``None`` without image); a missing file raises a FileNotFoundError naming it."""
    if image is None:
        return None
    image_path = Path(image).expanduser().resolve()
    if not image_path.is_file():
        raise FileNotFoundError(f"library {library_id!r}: image file {str(image_path)!r} does not exist.")
    return image_path


def _join_counts_and_spots(cnt: pd.DataFrame, spt: pd.DataFrame, library_id: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The counts and spot-file rows of the spots both have, in the counts' order (what is dropped is logged).

    Raises
    ------
    ValueError
        If the spot file holds no spots, or fewer than half of the spots join (the ids are not ``"{x}x{y}"``).
    """
    if len(spt) == 0:
        raise ValueError(f"library {library_id!r}: the spot file holds no (selected) spots.")
    common = cnt.index[cnt.index.isin(spt.index)]
    n_match = len(common)
    if n_match == 0 or n_match < 0.5 * min(len(cnt), len(spt)):
        raise ValueError(
            f"library {library_id!r}: counts and spot file do not join: only {n_match} of {len(cnt)} count spots "
            f"match the {len(spt)} spot-file ids (e.g. counts {list(cnt.index[:3])}, spots {list(spt.index[:3])}); "
            "both must use '{x}x{y}' integer array positions."
        )
    if n_match < len(cnt):
        logger.info(
            f"library {library_id!r}: {len(cnt) - n_match} count spots not in the (selected) spot file dropped."
        )
    if n_match < len(spt):
        logger.info(f"library {library_id!r}: {len(spt) - n_match} spot-file spots without counts dropped.")
    return cnt.loc[common], spt.loc[common]


def _count_values(cnt: pd.DataFrame, source: str, library_id: str) -> np.ndarray:
    """The counts as float32; NaN, infinite or negative values raise a ValueError with an example spot and gene."""
    values = cnt.to_numpy(dtype=np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        r, g = np.argwhere(bad)[0]
        raise ValueError(
            f"library {library_id!r}: {int(bad.sum())} NaN or infinite values in the {source} (e.g. spot "
            f"{cnt.index[r]!r}, gene {str(cnt.columns[g])!r}: {values[r, g]}); counts must be finite."
        )
    neg = values < 0
    if neg.any():
        r, g = np.argwhere(neg)[0]
        raise ValueError(
            f"library {library_id!r}: {int(neg.sum())} negative counts (min {values.min():g}) in the {source} "
            f"(e.g. spot {cnt.index[r]!r}, gene {str(cnt.columns[g])!r}); counts must be >= 0."
        )
    return values


def _spot_pixels(spt: pd.DataFrame, image_scale: float, library_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Spot centres in the image's pixels (the spot file's times ``image_scale``) and integer array (x, y)."""
    pixel_xy = spt[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64) * image_scale
    if not np.isfinite(pixel_xy).all():
        raise ValueError(
            f"library {library_id!r}: image_scale={image_scale!r} times the spot file's pixels overflows "
            "(non-finite pixel coordinates)."
        )
    array_xy = np.column_stack([spt["x"].round().astype(int), spt["y"].round().astype(int)])
    return pixel_xy, array_xy


def _pixel_size(pixel_xy: np.ndarray, array_xy: np.ndarray, um_per_px: float | None, library_id: str) -> float:
    """The checked µm per pixel: the given one, else derived from the ST spot pitch."""
    pitch_um = PLATFORMS["st"]["pitch_um"]
    if um_per_px is None:
        um_per_px = estimate_um_per_px(pixel_xy, array_xy, pitch_um=pitch_um)
        what = f"µm per pixel of library {library_id!r} derived from the {pitch_um:g} µm spot pitch"
    else:
        what = "um_per_px"
    return check_um_per_px(um_per_px, what=what)


def _assemble(
    spot_ids: pd.Index,
    values: np.ndarray,
    genes: pd.Index,
    pixel_xy: np.ndarray,
    array_xy: np.ndarray,
    library_id: str,
    image_path: Path | None,
    um_per_px: float,
) -> AnnData:
    """The library's AnnData: counts (CSR), spot ``obs``, centres, and its ``uns["spatial"]`` entry with the images."""
    import anndata as ad
    from scipy import sparse

    spot_diameter_um = PLATFORMS["st"]["spot_diameter_um"]
    scalefs: dict[str, float] = {}
    images: dict[str, np.ndarray] = {}
    metadata: dict = {"platform": "st", "has_image": image_path is not None}
    if image_path is not None:
        images, scalefs, (width, height) = _load_image(image_path, library_id)
        metadata["source_image_path"] = str(image_path)
        metadata["image_width"], metadata["image_height"] = width, height
    scalefs.update(
        {
            "spot_diameter_fullres": spot_diameter_um / um_per_px,
            "microns_per_pixel": um_per_px,
            "spot_diameter_um": spot_diameter_um,
        }
    )
    obs = pd.DataFrame(
        {
            "library_id": pd.Categorical([library_id] * len(spot_ids)),
            "spot_id": spot_ids.to_numpy(),
            "array_row": array_xy[:, 1].astype(np.int64),
            "array_col": array_xy[:, 0].astype(np.int64),
            "in_tissue": 1,
        },
        index=pd.Index([f"{library_id}_{s}" for s in spot_ids]),
    )
    return ad.AnnData(
        X=sparse.csr_matrix(values),
        obs=obs,
        var=pd.DataFrame(index=genes.astype(str)),
        obsm={"spatial": pixel_xy},
        uns={"spatial": {library_id: {"images": images, "scalefactors": scalefs, "metadata": metadata}}},
    )


def _add_labels(adata, labels: str | os.PathLike | pd.DataFrame, spot_ids: pd.Index, library_id: str) -> None:
    """Join the pathologist labels onto the spots as ``obs["label"]`` (NaN where a spot has none)."""
    lab = _read_labels(labels, library_id)
    matched = spot_ids.isin(lab.index)
    n_unused = int((~lab.index.isin(spot_ids)).sum())
    if n_unused:
        logger.warning(f"library {library_id!r}: {n_unused} labelled positions match no spot.")
    adata.obs["label"] = pd.Categorical(lab.reindex(spot_ids).to_numpy())
    logger.info(f"library {library_id!r}: labels joined for {int(matched.sum())} of {len(spot_ids)} spots.")


def _drop_outside(adata, library_id: str, on_outside: Literal["raise", "drop"]) -> tuple[AnnData, int]:
    """``adata`` without the spots outside its image (``on_outside="drop"``) and how many went; else it raises."""
    from stexp.images._extent import check_spots_in_image

    inside = check_spots_in_image(adata, library_id, on_outside=on_outside)
    if inside.all():
        return adata, 0
    return adata[inside].copy(), int((~inside).sum())


def read_st(
    counts: str | os.PathLike | pd.DataFrame,
    spots: str | os.PathLike | pd.DataFrame,
    image: str | os.PathLike | None = None,
    *,
    library_id: str,
    image_scale: float = 1.0,
    um_per_px: float | None = None,
    labels: str | os.PathLike | pd.DataFrame | None = None,
    drop_unselected: bool = True,
    on_outside: Literal["raise", "drop"] = "raise",
) -> AnnData:
    """Read one legacy Spatial Transcriptomics section into stexp's AnnData layout.

    Parameters
    ----------
    counts
        Counts table (tsv, optionally gzipped, or a DataFrame): spots x genes raw UMI counts, row index
        ``"{x}x{y}"`` (integer array positions).
    spots
        Spot selection file (tsv or DataFrame) with columns ``x y pixel_x pixel_y`` (and usually
        ``new_x new_y selected``). Joined to the counts on ``f"{x}x{y}"``.
    image
        Path of the H&E image whose pixel frame the spot file's pixels refer to (times ``image_scale``).
        It is decoded once into in-memory ``"hires"`` (longest side ~2000 px) and ``"lowres"`` (~600 px)
        copies; its path is kept in ``metadata["source_image_path"]`` for full-resolution patches.
        ``None`` reads a counts-only library (``metadata["has_image"] = False``).
    library_id
        Name of the section (``obs["library_id"]``, key of ``uns["spatial"]``).
    image_scale
        Factor from the spot file's pixels to the image's pixels (1 when the spot file refers to it).
    um_per_px
        µm per pixel of the image; default: derived from the 200 µm spot pitch (median nearest-neighbour
        distance in pixels vs in array steps).
    labels
        Optional pathologist labels (columns ``x y label``, float array positions rounded to join) into
        ``obs["label"]``; spots without a label get NaN.
    drop_unselected
        Keep only spots with ``selected == 1`` in the spot file.
    on_outside
        Spots whose centre lies outside the image: ``"raise"`` or ``"drop"`` (with a warning).

    Returns
    -------
    AnnData with raw counts in ``X`` (CSR float32), ``obs[["library_id", "spot_id", "array_row",
    "array_col", "in_tissue"]]`` (``array_row = y``, ``array_col = x``), ``obsm["spatial"]`` (x, y) in
    full-resolution image pixels and ``uns["spatial"][library_id]`` with images, scale factors
    (``microns_per_pixel``, ``spot_diameter_um = 100``) and metadata.
    """
    library_id = str(library_id)
    image_scale = _check_image_scale(image_scale)
    if on_outside not in ("raise", "drop"):
        raise ValueError(f"on_outside must be 'raise' or 'drop', got {on_outside!r}.")
    image_path = _image_path(image, library_id)

    cnt, source = _read_counts(counts, library_id)
    spt = _read_spots(spots, library_id, drop_unselected)
    cnt, spt = _join_counts_and_spots(cnt, spt, library_id)
    values = _count_values(cnt, source, library_id)
    pixel_xy, array_xy = _spot_pixels(spt, image_scale, library_id)
    um_per_px = _pixel_size(pixel_xy, array_xy, um_per_px, library_id)

    adata = _assemble(cnt.index, values, cnt.columns, pixel_xy, array_xy, library_id, image_path, um_per_px)
    if labels is not None:
        _add_labels(adata, labels, cnt.index, library_id)
    n_dropped = 0
    if image_path is not None:
        adata, n_dropped = _drop_outside(adata, library_id, on_outside)
    record(
        adata,
        "read_st",
        {
            "library_id": library_id,
            "image": str(image_path) if image_path else None,
            "image_scale": float(image_scale),
            "um_per_px": um_per_px,
            "drop_unselected": drop_unselected,
            "n_spots": adata.n_obs,
            "n_dropped_outside_image": n_dropped,
        },
    )
    logger.info(
        f"read ST library {library_id!r}: {adata.n_obs} spots x {adata.n_vars} genes, {um_per_px:.3f} µm/px"
        + ("" if image_path else " (no image)")
    )
    return adata
