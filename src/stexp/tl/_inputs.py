"""Turn an AnnData into what a model trains or predicts on, checking every input on the way."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from stexp._layout import UNS_KEY, as_list, library_labels, library_mask, spot_coords, um_per_px
from stexp.images._encoders import DEFAULT_ENCODER
from stexp.models._data import SpotData
from stexp.pp._hvg import PANEL_KEY

if TYPE_CHECKING:  # pragma: no cover
    from stexp.images._spec import EncoderSpec
    from stexp.models._recipe import Recipe


def features_spec(adata, features_key: str | None) -> EncoderSpec:
    """The :class:`~stexp.images.EncoderSpec` recorded by :func:`stexp.pp.embed_images` for ``obsm[features_key]``.

    Empty (``bool(spec) is False``) for features a user brought without a spec.
    """
    from stexp.images._spec import EncoderSpec

    return EncoderSpec.from_mapping(adata.uns.get(UNS_KEY, {}).get("features", {}).get(features_key))


def resolve_recipe(
    model: str | Recipe | None,
    *,
    hparams: dict[str, Any] | None = None,
    training_options: dict[str, Any] | None = None,
    smoothing: float | str | None = None,
    calibrate: bool | None = None,
    calibration_folds: int | None = None,
    calibration_score: str | None = None,
) -> Recipe:
    """The :class:`~stexp.models.Recipe` that ``fit`` / ``cross_validate`` train.

    ``model=None``: :data:`stexp.models.DEFAULT_RECIPE`; a name: that model with its defaults, no smoothing,
    calibration as the model class prefers; a :class:`~stexp.models.Recipe`: itself. Then every option that
    is not ``None`` replaces the recipe's (``hparams`` update its hyper-parameters). Any option the model
    does not take raises a TypeError that lists what it accepts.
    """
    from stexp.models._recipe import DEFAULT_RECIPE, Recipe

    if model is None:
        recipe = DEFAULT_RECIPE
    elif isinstance(model, Recipe):
        recipe = model
    elif isinstance(model, str):
        recipe = Recipe(model)
    else:
        raise TypeError(f"model must be a registered model name, a stexp.models.Recipe or None, got {model!r}.")
    recipe = recipe.with_hparams(**(hparams or {})).with_training_options(**(training_options or {}))
    changes = {
        "smoothing": smoothing,
        "calibrate": calibrate,
        "calibration_folds": calibration_folds,
        "calibration_score": calibration_score,
    }
    return recipe.replace(**{k: v for k, v in changes.items() if v is not None})


def check_var_names(adata) -> None:
    """Refuse duplicated ``adata.var_names``, naming them: which column a gene names would be ambiguous.

    Checked once, where ``fit``, ``predict`` and ``cross_validate`` first read the AnnData (before any
    embedding or training).

    Raises
    ------
    ValueError
        Naming the duplicated genes and the fix (``adata.var_names_make_unique()``).
    """
    names = adata.var_names
    if names.is_unique:
        return
    dup = list(dict.fromkeys(names[names.duplicated()].astype(str)))
    raise ValueError(
        f"adata.var_names holds {len(dup)} duplicated gene name(s): {dup[:10]}{' ...' if len(dup) > 10 else ''}; "
        "which column such a gene names would be ambiguous. Make them unique with adata.var_names_make_unique() "
        "(it renames the later copies, e.g. 'G-1'), or drop the duplicates first."
    )


def resolve_genes(adata, genes: str | Sequence[str] | None) -> list[str]:
    """The gene panel: ``genes`` when given, else ``var[PANEL_KEY]`` from :func:`stexp.pp.select_hvg`, else all genes.

    Raises
    ------
    KeyError
        If some genes are not in ``adata.var_names``.
    ValueError
        If ``adata.var_names`` or the panel hold duplicates (named).
    """
    check_var_names(adata)
    genes = as_list(genes)
    if genes is None:
        if PANEL_KEY in adata.var:
            genes = adata.var_names[adata.var[PANEL_KEY].to_numpy(dtype=bool)].tolist()
        else:
            genes = adata.var_names.tolist()
    if len(genes) == 0:
        raise ValueError("the gene panel is empty.")
    if len(set(genes)) != len(genes):
        dup = list(dict.fromkeys(g for i, g in enumerate(genes) if g in genes[:i]))
        raise ValueError(f"the gene panel names {len(dup)} gene(s) twice: {dup[:10]}.")
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"{len(missing)} of {len(genes)} panel genes are not in adata.var_names, e.g. {missing[:5]}.")
    return list(genes)


def resolve_features(adata, features_key: str | None, *, library_key: str, encoder: str = DEFAULT_ENCODER) -> str:
    """The ``obsm`` key of the image features; embeds images with ``encoder`` when ``features_key`` is None.

    ``adata.var_names`` are checked first (:func:`check_var_names`), before any embedding.
    """
    check_var_names(adata)
    if features_key is None:
        from stexp.pp import embed_images
        from stexp.pp._embed import default_key

        key = default_key(encoder)
        stored = adata.uns.get(UNS_KEY, {}).get("features", {}).get(key) if key in adata.obsm else None
        views = {}
        if stored:  # features the user embedded (e.g. stain_norm=None): their view options stand, checked as such
            from stexp.images._spec import VIEW_FIELDS, EncoderSpec

            spec = EncoderSpec.from_mapping(stored)
            views = {name: getattr(spec, name) for name in VIEW_FIELDS}
        embed_images(adata, encoder=encoder, library_key=library_key, **views)
        return key
    if features_key not in adata.obsm:
        raise KeyError(
            f"features key {features_key!r} not in adata.obsm (it has {list(adata.obsm)}); "
            "run stexp.pp.embed_images first or pass features_key=None."
        )
    return features_key


def spot_data(
    adata,
    *,
    features_key: str | None,
    library_key: str,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    patches: EncoderSpec | None = None,
) -> SpotData:
    """Collect features, target and depth (when ``genes`` is given), array and physical coordinates of every spot.

    ``features_key=None`` gives ``(n_spots, 0)`` features. ``patches``: the spec of a fine-tuned image
    encoder; the spots then carry their patches (a :class:`stexp.images.PatchSource` at the spec's patch
    size), so the model reads patches without seeing the AnnData.

    Raises
    ------
    ValueError
        If the features contain NaN or have the wrong number of rows, the AnnData is empty, or its
        ``var_names`` hold duplicates.
    """
    from stexp.pp._target import expression_target_and_depth

    if adata.n_obs == 0:
        raise ValueError("the AnnData has no spots.")
    check_var_names(adata)
    if features_key is None:
        feats = np.zeros((adata.n_obs, 0), dtype=np.float32)
    else:
        feats = _features(adata.obsm[features_key])
    if feats.ndim != 2:
        raise ValueError(f"adata.obsm[{features_key!r}] must be 2-D (spots x features), got shape {feats.shape}.")
    bad = _non_finite_rows(feats)
    if bad.any():
        raise ValueError(
            f"adata.obsm[{features_key!r}] has NaN/inf features for {int(bad.sum())} spots "
            f"(e.g. {adata.obs_names[bad][:3].tolist()})."
        )
    library = library_labels(adata, library_key)
    xy = spot_coords(adata)
    coords_um = np.empty_like(xy)
    for lib in dict.fromkeys(library):
        m = library_mask(adata, lib, library_key)
        coords_um[m] = xy[m] * um_per_px(adata, lib)
    if {"array_row", "array_col"} <= set(adata.obs):
        array_rc = adata.obs[["array_row", "array_col"]].to_numpy(dtype=np.int64)
    else:  # no array grid: derive one from the spot pitch
        array_rc = np.round(coords_um[:, ::-1] / 50.0).astype(np.int64)
    if genes is None:
        target, depth = None, None
    elif _on_disk(adata, layer):
        target, depth = _target_in_chunks(adata, genes, layer=layer)
    else:
        target, depth = expression_target_and_depth(adata, genes, layer=layer)
    patient = adata.obs["patient"].astype(str).to_numpy() if "patient" in adata.obs else None
    return SpotData(
        features=feats,
        library=np.asarray(library, dtype=object),
        array_rc=array_rc,
        coords_um=coords_um,
        target=target,
        patient=patient,
        obs_names=adata.obs_names.to_numpy(),
        depth=None if depth is None else np.asarray(depth, dtype=np.float64),
        patches=None if patches is None else _patch_source(adata, patches, library_key),
    )


#: Rows read at a time from features or counts that live on disk (a backed AnnData, a memory map).
CHUNK_ROWS = 16_384


def _features(values) -> np.ndarray:
    """The features as float32 rows: an in-memory float32 array or memory map is used as it is (no copy).

    Anything else with rows (another dtype, an h5py / zarr / dask array) is read into memory in chunks of
    :data:`CHUNK_ROWS` rows, so no temporary larger than a chunk is made on the way.
    """
    if isinstance(values, np.ndarray) and values.dtype == np.float32:
        return values
    if isinstance(values, np.ndarray) or not hasattr(values, "shape") or len(values.shape) != 2:
        return np.asarray(values, dtype=np.float32)
    out = np.empty(tuple(int(v) for v in values.shape), dtype=np.float32)
    for start in range(0, out.shape[0], CHUNK_ROWS):
        out[start : start + CHUNK_ROWS] = np.asarray(values[start : start + CHUNK_ROWS], dtype=np.float32)
    return out


def _non_finite_rows(feats: np.ndarray) -> np.ndarray:
    """Rows holding NaN or inf, checked :data:`CHUNK_ROWS` rows at a time (no full-size temporary)."""
    bad = np.zeros(feats.shape[0], dtype=bool)
    for start in range(0, feats.shape[0], CHUNK_ROWS):
        bad[start : start + CHUNK_ROWS] = ~np.isfinite(feats[start : start + CHUNK_ROWS]).all(axis=1)
    return bad


def _on_disk(adata, layer: str | None) -> bool:
    """Whether the counts live on disk (a backed AnnData's ``X``; layers of a backed AnnData are in memory)."""
    return bool(getattr(adata, "isbacked", False)) and layer is None


def _target_in_chunks(adata, genes: Sequence[str], *, layer: str | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`stexp.pp._target.expression_target_and_depth` of counts on disk, read :data:`CHUNK_ROWS` rows at a time.

    Each chunk is checked and transformed as in memory (the target of a spot needs only its own row), so the
    result is the same; peak memory is one chunk of counts plus the ``(n_spots, n_genes)`` target.
    """
    import anndata as ad

    from stexp.pp._target import expression_target_and_depth

    target = np.empty((adata.n_obs, len(genes)), dtype=np.float32)
    depth = np.empty(adata.n_obs, dtype=np.float64)
    var = adata.var[[]]
    for start in range(0, adata.n_obs, CHUNK_ROWS):
        rows = slice(start, min(start + CHUNK_ROWS, adata.n_obs))
        chunk = ad.AnnData(X=adata.X[rows], obs=adata.obs.iloc[rows][[]], var=var)
        target[rows], depth[rows] = expression_target_and_depth(chunk, genes, layer=layer)
    return target, depth


def _patch_source(adata, spec: EncoderSpec, library_key: str):
    from stexp.images._patches import PatchSource

    # One patch size for every library, else each library's default (a per-library mapping names only the
    # training slides).
    return PatchSource.from_adata(adata, patch_um=spec.patch_um_value, library_key=library_key)
