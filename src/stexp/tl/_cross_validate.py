"""``stexp.tl.cross_validate``: out-of-fold predictions and scores, by patient (or by slide when asked)."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stexp._docs import doc_params
from stexp._layout import LIBRARY_KEY, as_list, library_labels, record
from stexp._process import leaves_process_state
from stexp._settings import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


#: Scores averaged over test slides in :attr:`CVResult.summary`.
SUMMARY_METRICS = ("pcc_acg", "pcc_heg", "pcc_hvg", "mse", "mae")


@dataclass
class CVResult:
    """What :func:`stexp.tl.cross_validate` returns.

    Attributes
    ----------
    per_fold
        One row per (model, test slide): the :func:`stexp.tl.evaluate` columns plus ``model``,
        ``fold``, ``test_group`` (the held-out value of ``split_by``), ``library_id``,
        ``n_train_spots``, ``fit_seconds`` and ``predict_seconds`` (of the fold).
    summary
        One row per model: mean and standard deviation over test slides of each score
        (``pcc_acg``, ``pcc_acg_std``, ...), the number of slides and the total fit/predict time.
    folds
        One row per fold: the held-out group, its test slides, the training slides and the size of
        the fold's gene panel.
    panels
        The gene panel of each fold (fixed from its training slides only).
    layers
        The key of each model's out-of-fold prediction (``adata.layers[key]`` when the fold panels cover
        every gene of ``var``, else the gene DataFrame ``adata.obsm[key]``; see :func:`stexp.tl.predict`).
    models
        With ``keep_models=True``, the fitted model of each fold, by model name; else ``None``.
    """

    per_fold: pd.DataFrame
    summary: pd.DataFrame
    folds: pd.DataFrame
    panels: dict[int, list[str]] = field(repr=False)
    layers: dict[str, str] = field(default_factory=dict)
    models: dict[str, list] | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        cols = [c for c in ("pcc_acg", "pcc_heg", "pcc_hvg", "mse", "mae") if c in self.summary]
        return (
            f"CVResult({len(self.folds)} folds, models {list(self.summary.index)})\n"
            f"{self.summary[cols].round(3).to_string()}"
        )


def _groups(adata, split_by: str, library_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Group of every spot and library of every spot, checking each library lies in one group."""
    if split_by not in adata.obs:
        hint = (
            f" There is no patient column: pass split_by={library_key!r} for leave-one-slide-out."
            if split_by == "patient"
            else ""
        )
        raise KeyError(f"split_by={split_by!r} is not a column of adata.obs (it has {list(adata.obs.columns)}).{hint}")
    col = adata.obs[split_by]
    if col.isna().any():
        raise ValueError(
            f"adata.obs[{split_by!r}] has {int(col.isna().sum())} missing values; every spot needs a group."
        )
    groups = col.astype(str).to_numpy()
    libs = library_labels(adata, library_key)
    per_lib = pd.Series(groups).groupby(libs).nunique()
    split_libs = per_lib.index[per_lib > 1].tolist()
    if split_libs:
        raise ValueError(
            f"slide(s) {split_libs[:5]} hold spots of several {split_by!r} groups; a slide must lie in one group "
            "so that it is either trained on or tested on."
        )
    return groups, libs


def _sister_sections(adata, libs: np.ndarray, patient_key: str = "patient") -> dict[str, list[str]]:
    """Patients with more than one slide (their sister sections leak in leave-one-slide-out)."""
    if patient_key not in adata.obs:
        return {}
    patients = adata.obs[patient_key].astype(str).to_numpy()
    by_patient = pd.Series(libs).groupby(patients).unique()
    return {p: sorted(map(str, v)) for p, v in by_patient.items() if len(v) > 1}


def _split_kwargs(models: list[str], fit_kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-model hyper-parameters: the shared training options, and each other keyword where a model declares it."""
    from stexp.models import get_model_class
    from stexp.tl._inputs import TRAINING_OPTIONS

    classes = {m: get_model_class(m) for m in models}
    unused = [
        k for k in fit_kwargs if k not in TRAINING_OPTIONS and not any(k in c.default_hparams for c in classes.values())
    ]
    if unused:
        raise TypeError(f"no model among {models} takes the hyper-parameter(s) {unused}.")
    return {
        m: {k: v for k, v in fit_kwargs.items() if k in TRAINING_OPTIONS or k in cls.default_hparams}
        for m, cls in classes.items()
    }


def _fold_panel(adata, rows: np.ndarray, *, library_key: str, layer: str | None, **hvg_kwargs: Any) -> list[str]:
    """The gene panel :func:`stexp.pp.select_hvg` selects on the spots ``rows`` (counts only, images not copied)."""
    import anndata as ad

    from stexp.pp import select_hvg
    from stexp.pp._hvg import PANEL_KEY
    from stexp.pp._target import raw_counts

    counts = raw_counts(adata, layer)[rows]
    light = ad.AnnData(X=counts, obs=adata.obs.iloc[rows][[library_key]].copy(), var=adata.var[[]].copy())
    select_hvg(light, library_key=library_key, layer=None, key_added=PANEL_KEY, **hvg_kwargs)
    return light.var_names[light.var[PANEL_KEY].to_numpy(dtype=bool)].tolist()


@leaves_process_state
@doc_params
def cross_validate(
    adata: AnnData,
    *,
    model: str | Sequence[str] = "mclstexp",
    split_by: str = "patient",
    features_key: str | None = None,
    genes: str | Sequence[str] | None = None,
    n_top_genes: int = 1000,
    min_spots: int | None = None,
    library_key: str = LIBRARY_KEY,
    layer: str | None = None,
    key_added: str = "stexp_cv",
    top_n: int = 50,
    keep_models: bool = False,
    model_params: dict[str, dict[str, Any]] | None = None,
    device: str = "auto",
    devices: int | Sequence[int] | None = None,
    **fit_kwargs: Any,
) -> CVResult:
    """Cross-validate one or several models: train on all groups but one, predict the held-out group.

    Folds leave one patient out (``split_by="patient"``), or one slide out
    (``split_by=library_key``; this warns when a patient column shows that sister sections of the
    held-out slide's patient stay in training). For each fold, everything learnt comes from the
    training slides only: the gene panel (:func:`stexp.pp.select_hvg` on the training slides, unless
    ``genes`` is given), every normalisation inside the models, and the models themselves; no
    checkpoint, gene or hyper-parameter is chosen on the held-out slides. All models run on the same
    folds and panels.

    Parameters
    ----------
    adata
        AnnData in stexp's layout with raw counts and image features.
    model
        A registered model name, or a list of names (see :func:`stexp.models.available_models`).
    split_by
        ``obs`` column whose values form the folds: ``"patient"`` (default) or the library key.
    features_key
        ``obsm`` key of frozen image features; ``None`` embeds the images first (once, for all folds).
    genes
        A fixed gene panel for every fold (e.g. the HER2+ 785 genes). ``None``: select per fold.
    n_top_genes, min_spots
        Passed to :func:`stexp.pp.select_hvg` when the panel is selected per fold (``min_spots=None``
        keeps its default).
    {library_key}
    {layer}
    key_added
        Key of the out-of-fold predictions (NaN outside the fold's panel), stored over the union of
        the fold panels as :func:`stexp.tl.predict` stores predictions (a layer when that union is all
        of ``var``, else an ``obsm`` gene DataFrame): ``key_added`` for a single model name,
        ``f"{key_added}_{model}"`` for each model of a list. A ``"_std"`` key follows where the model
        gives a spread.
    top_n
        Number of highest-expressed and most variable genes of the HEG and HVG scores.
    keep_models
        Keep every fold's fitted model in :attr:`CVResult.models`.
    model_params
        Hyper-parameters per model name, e.g. ``{"mlp": {"hidden_dim": 128}}``.
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...: where the models train and predict.
    devices
        Train each fold's neural models with DDP over this many devices (see :func:`stexp.tl.fit`).
    **fit_kwargs
        Training options of every model (``max_epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``seed``;
        see :func:`stexp.tl.fit`) and hyper-parameters, given to the models that declare them.

    Returns
    -------
    A :class:`CVResult` with ``per_fold`` (one row per model and test slide) and ``summary``
    (mean and std per model). Also writes the out-of-fold layer(s), per-gene scores
    (``adata.var[f"{layer}_pcc"]``, ``adata.uns["stexp"]["evaluate"][layer]``) and a record in
    ``adata.uns["stexp"][key_added]``.

    Raises
    ------
    KeyError
        If ``split_by``, the features or a gene is missing.
    ValueError
        If ``split_by`` has a single group, a slide spans several groups, or ``validation`` is passed
        (a checkpoint chosen on held-out slides would leak).
    """
    from stexp._settings import settings
    from stexp.tl._evaluate import score_prediction
    from stexp.tl._inputs import TRAINING_OPTIONS, features_spec, make_model, resolve_features, resolve_genes, spot_data

    models = as_list(model)
    if not models:
        raise ValueError("model= is empty.")
    if len(set(models)) != len(models):
        raise ValueError(f"model= lists a model twice: {models}.")
    if "validation" in fit_kwargs:
        raise ValueError(
            "cross_validate takes no validation= slides: choosing a checkpoint on slides outside the "
            "training folds would leak; set max_epochs instead."
        )
    model_params = dict(model_params or {})
    unknown = sorted(set(model_params) - set(models))
    if unknown:
        raise KeyError(f"model_params names model(s) {unknown} that are not in model={models}.")
    per_model_kwargs = _split_kwargs(models, fit_kwargs)
    for m, params in model_params.items():
        per_model_kwargs[m] = {**per_model_kwargs[m], **params}
    layer_of = {m: key_added if isinstance(model, str) else f"{key_added}_{m}" for m in models}

    groups, libs = _groups(adata, split_by, library_key)
    order = list(dict.fromkeys(groups.tolist()))
    if len(order) < 2:
        raise ValueError(
            f"adata.obs[{split_by!r}] has a single group ({order}); cross-validation needs at least two "
            f"(e.g. split_by={library_key!r} to leave one slide out)."
        )
    if split_by == library_key or (len(order) == len(set(libs.tolist())) and split_by != "patient"):
        sisters = _sister_sections(adata, libs)
        if sisters:
            example = next(iter(sisters.items()))
            warnings.warn(
                f"leave-one-slide-out with {len(sisters)} patient(s) having several slides (e.g. patient "
                f"{example[0]!r}: {example[1]}): sister sections of a held-out slide stay in training, so the "
                "scores are optimistic. Use split_by='patient' for an honest estimate.",
                UserWarning,
                stacklevel=2,
            )
    if genes is not None:
        genes = resolve_genes(adata, genes)
    features_key = resolve_features(adata, features_key, library_key=library_key)
    spec = features_spec(adata, features_key)
    # Panels first (each from its training slides only), then every array once: features, geometry, and the
    # measured target of every gene of any panel; each fold takes its rows and its panel's columns.
    fold_rows, panels, fold_of_lib = [], {}, {}
    for fold, group in enumerate(order):
        is_test = groups == group
        test_libs = list(dict.fromkeys(libs[is_test].tolist()))
        train_libs = list(dict.fromkeys(libs[~is_test].tolist()))
        for lib in test_libs:
            fold_of_lib[lib] = fold
        if genes is None:
            hvg_kwargs = {"n_top_genes": n_top_genes, **({} if min_spots is None else {"min_spots": min_spots})}
            panels[fold] = _fold_panel(
                adata, np.flatnonzero(~is_test), library_key=library_key, layer=layer, **hvg_kwargs
            )
        else:
            panels[fold] = list(genes)
        fold_rows.append(
            {
                "fold": fold,
                "test_group": group,
                "test_libraries": ", ".join(test_libs),
                "train_libraries": ", ".join(train_libs),
                "n_train_spots": int((~is_test).sum()),
                "n_test_spots": int(is_test.sum()),
                "n_genes": len(panels[fold]),
            }
        )
    union = list(dict.fromkeys(g for fold in panels for g in panels[fold]))
    column = {g: j for j, g in enumerate(union)}
    reads_patches = any(bool(per_model_kwargs[m].get("finetune_encoder", False)) for m in models)
    data = spot_data(
        adata,
        features_key=features_key,
        library_key=library_key,
        genes=union,
        layer=layer,
        patches=spec if reads_patches else None,
    )

    # out-of-fold predictions over the union of the fold panels only (never n_obs x n_vars)
    oof = {m: np.full((adata.n_obs, len(union)), np.nan, dtype=np.float32) for m in models}
    oof_std: dict[str, np.ndarray] = {}
    timing: dict[tuple[str, int], tuple[float, float]] = {}
    fitted: dict[str, list] = {m: [] for m in models}
    for fold, group in enumerate(order):
        is_test = groups == group
        panel = panels[fold]
        var_idx = np.asarray([column[g] for g in panel])  # columns of the union
        train = data.subset(~is_test).with_genes(np.asarray([column[g] for g in panel]))
        test = data.subset(is_test)
        test.target = None
        row = fold_rows[fold]
        logger.info(
            f"fold {fold + 1}/{len(order)}: test {split_by}={group!r} ({row['test_libraries']}), "
            f"train on {len(row['train_libraries'].split(', '))} slide(s), {len(panel)} genes"
        )
        for m in models:
            t0 = time.perf_counter()
            kw = per_model_kwargs[m]
            options = {"seed": settings.seed} | {k: kw[k] for k in TRAINING_OPTIONS if k in kw}
            params = {k: v for k, v in kw.items() if k not in TRAINING_OPTIONS}
            est = make_model(m, panel, features_key=features_key, encoder_spec=spec, options=options, **params)
            est.fit(train, device=device, devices=devices)
            t1 = time.perf_counter()
            mean, spread = est.predict(test)
            t2 = time.perf_counter()
            rows = np.flatnonzero(is_test)
            oof[m][np.ix_(rows, var_idx)] = mean
            if spread is not None:
                oof_std.setdefault(m, np.full_like(oof[m], np.nan))[np.ix_(rows, var_idx)] = spread
            timing[(m, fold)] = (t1 - t0, t2 - t1)
            if keep_models:
                fitted[m].append(est)

    from ._storage import write_prediction

    tables = []
    where_of: dict[str, str] = {}
    assert data.target is not None  # spot_data(genes=union) computed it
    target = (union, data.target)
    for m in models:
        name = layer_of[m]
        where_of[m] = write_prediction(adata, name, union, oof[m])
        if m in oof_std:
            write_prediction(adata, f"{name}_std", union, oof_std[m])
        scores = score_prediction(
            adata, pred_key=name, library_key=library_key, top_n=top_n, layer=layer, target=target
        )
        scores = scores.reset_index(names="library_id")
        scores.insert(0, "model", m)
        scores.insert(1, "fold", scores["library_id"].map(fold_of_lib).astype(int))
        scores.insert(2, "test_group", scores["fold"].map(dict(enumerate(order))))
        scores["n_train_spots"] = scores["fold"].map({r["fold"]: r["n_train_spots"] for r in fold_rows})
        scores["fit_seconds"] = scores["fold"].map(lambda f, m=m: timing[(m, f)][0])
        scores["predict_seconds"] = scores["fold"].map(lambda f, m=m: timing[(m, f)][1])
        tables.append(scores)
    per_fold = pd.concat(tables, ignore_index=True)
    summary = summarize(per_fold)

    record(
        adata,
        key_added,
        {
            "models": models,
            "layers": layer_of,
            "split_by": split_by,
            "library_key": library_key,
            "features_key": features_key,
            "genes": "per fold (stexp.pp.select_hvg on the training slides)"
            if genes is None
            else f"{len(genes)} given",
            "n_top_genes": n_top_genes if genes is None else None,
            "min_spots": min_spots,
            "folds": {str(r["fold"]): r["test_libraries"] for r in fold_rows},
            "fit_kwargs": per_model_kwargs,
            "device": device,
            "per_fold": per_fold,
        },
    )
    added = ", ".join(where_of.values())
    logger.info(f"added {added}, adata.uns['stexp'][{key_added!r}]")
    return CVResult(
        per_fold=per_fold,
        summary=summary,
        folds=pd.DataFrame(fold_rows).set_index("fold"),
        panels=panels,
        layers=layer_of,
        models=fitted if keep_models else None,
    )


def summarize(per_fold: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over test slides of each score, per model (the ``summary`` of a CV run)."""
    metrics = [c for c in SUMMARY_METRICS if c in per_fold]
    grouped = per_fold.groupby("model", sort=False)
    out = pd.DataFrame(index=pd.Index(list(grouped.groups), name="model"))
    for c in metrics:
        out[c] = grouped[c].mean()
        out[f"{c}_std"] = grouped[c].std(ddof=1)
    out["n_slides"] = grouped.size()
    for c in ("fit_seconds", "predict_seconds"):
        if c in per_fold:
            # Per fold, not per slide: a fold with several test slides repeats its time on each row.
            out[c] = per_fold.drop_duplicates(["model", "fold"]).groupby("model", sort=False)[c].sum()
    return out
