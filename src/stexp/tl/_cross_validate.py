"""``stexp.tl.cross_validate``: out-of-fold predictions and scores, by patient (or by slide when asked).

Each fold fits its recipes with :func:`stexp.models._recipe.fit_recipe`, the function behind
:func:`stexp.tl.fit`, and predicts as :func:`stexp.tl.predict` does (intervals included).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stexp._devices import check_device
from stexp._docs import doc_params
from stexp._layout import LIBRARY_KEY, library_labels, record
from stexp._process import leaves_process_state
from stexp._settings import logger
from stexp.models._data import SpotData
from stexp.models._recipe import Recipe

from ._evaluate import spearman
from ._inputs import features_spec, resolve_features, resolve_genes, spot_data
from ._keys import write_prediction_set
from ._storage import where

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
        With ``keep_models=True``, the fitted model of each fold, by model label; else ``None``.
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


def _recipes(
    model: str | Recipe | Sequence[str | Recipe] | None,
    *,
    model_params: dict[str, dict[str, Any]] | None,
    hparams: dict[str, Any],
    training_options: dict[str, Any],
    smoothing: float | str | None,
    calibrate: bool | None,
    coverage: float | None = None,
) -> tuple[list[Recipe], bool]:
    """The recipes to cross-validate (and whether ``model`` was a single one), every option checked.

    With several models, each keyword (a hyper-parameter or a training option) goes to the models that
    take it; one that no model takes raises. With one model it must take them all (:func:`resolve_recipe`).
    """
    from stexp.models._recipe import TRAINING_OPTIONS

    from ._inputs import resolve_recipe

    single = model is None or isinstance(model, (str, Recipe))
    items: list[str | Recipe | None] = [model] if single else list(model)  # type: ignore[list-item, arg-type]
    if not items:
        raise ValueError("model= is empty: pass None (the default pipeline), a model name, a Recipe or a list.")
    base = [resolve_recipe(m) for m in items]
    labels = [r.label for r in base]
    if len(set(labels)) != len(labels):
        raise ValueError(f"model= lists a model twice: {labels}; give Recipes distinct names.")
    params = dict(model_params or {})
    unknown = sorted(set(params) - set(labels))
    if unknown:
        raise KeyError(f"model_params names model(s) {unknown} that are not in model= ({labels}).")
    given = {k: v for k, v in {**training_options, **hparams}.items() if v is not None}
    takes = lambda r, k: k in r.model_class.default_hparams or (k == "seed" and k in TRAINING_OPTIONS)
    unused = sorted(k for k in given if not any(takes(r, k) for r in base))
    if unused:
        accepted = {r.label: sorted(r.model_class.default_hparams) for r in base}
        raise TypeError(f"no model among {labels} takes {unused}; they take {accepted}.")
    recipes = []
    for item, r in zip(items, base, strict=True):
        own = {k: v for k, v in given.items() if single or takes(r, k)}
        recipes.append(
            resolve_recipe(
                item,
                hparams={**{k: v for k, v in own.items() if k not in TRAINING_OPTIONS}, **params.get(r.label, {})},
                training_options={k: v for k, v in own.items() if k in TRAINING_OPTIONS},
                smoothing=smoothing,
                calibrate=calibrate,
            )
        )
    if coverage is not None:  # intervals need a calibration: on for the recipes that leave it to the model
        if any(r.calibrate is False for r in recipes):
            raise ValueError("coverage= needs calibrated models; drop calibrate=False or coverage=.")
        recipes = [r if r.wants_calibration() else r.replace(calibrate=True) for r in recipes]
    return recipes, single


def _plan_folds(
    adata, groups: np.ndarray, libs: np.ndarray, genes: list[str] | None, *, library_key: str, layer, hvg_kwargs
) -> tuple[list[dict[str, Any]], dict[int, list[str]]]:
    """One row per fold (held-out group, its slides, the training slides, sizes) and each fold's gene panel."""
    rows, panels = [], {}
    for fold, group in enumerate(dict.fromkeys(groups.tolist())):
        is_test = groups == group
        panels[fold] = (
            list(genes)
            if genes is not None
            else _fold_panel(adata, np.flatnonzero(~is_test), library_key=library_key, layer=layer, **hvg_kwargs)
        )
        rows.append(
            {
                "fold": fold,
                "test_group": group,
                "test_libraries": ", ".join(dict.fromkeys(libs[is_test].tolist())),
                "train_libraries": ", ".join(dict.fromkeys(libs[~is_test].tolist())),
                "n_train_spots": int((~is_test).sum()),
                "n_test_spots": int(is_test.sum()),
                "n_genes": len(panels[fold]),
            }
        )
    return rows, panels


def inner_validation_split(train: SpotData) -> np.ndarray:
    """Validation spots among a fold's training spots: its last inner group (slide; block of a single slide).

    The groups are the inner folds' (:func:`stexp.models._folds.inner_folds`); the last in sorted order is held out.
    """
    from stexp.models._folds import inner_folds

    groups = inner_folds(train).groups
    return groups == np.unique(groups)[-1]


def _fit_fold(recipes: list[Recipe], train: SpotData, val: SpotData | None, **fit_kw: Any) -> dict[str, tuple]:
    """Each recipe's model fitted on the fold, with its fit seconds.

    A model whose class trains exactly as another recipe of the list (``trains_as``, same training
    hyper-parameters) is made from that recipe's fitted model without training again (``from_trained``),
    then finished (smoothing, calibration) on its own.
    """
    from stexp.models._feature_norm import normalise_spots
    from stexp.models._recipe import finish_recipe, fit_recipe

    fitted: dict[str, tuple] = {}
    for recipe in recipes:
        t0 = time.perf_counter()
        base = _trained_as(recipe, recipes, fitted)
        if base is None:
            model = fit_recipe(recipe, train, val, **fit_kw)
            fitted[recipe.label] = (model, time.perf_counter() - t0)
            continue
        base_model, base_seconds = fitted[base.label]
        own_train = normalise_spots(train, recipe.feature_norm)  # the base model's feature space (same norm)
        own_val = None if val is None else normalise_spots(val, recipe.feature_norm)
        derived = recipe.model_class.from_trained(base_model, own_train, own_val, **recipe.hparams)
        model = finish_recipe(recipe, derived, own_train, own_val, seed=fit_kw.get("seed", 0))
        fitted[recipe.label] = (model, base_seconds + time.perf_counter() - t0)
    return fitted


def _trained_as(recipe: Recipe, recipes: list[Recipe], fitted: dict[str, tuple]) -> Recipe | None:
    """The already fitted recipe whose training ``recipe`` shares (``trains_as``), if any."""
    cls = recipe.model_class
    parent = getattr(cls, "trains_as", None)
    if parent is None:
        return None
    own = {**cls.default_hparams, **recipe.hparams}
    for other in recipes:
        if other.model != parent or other.label not in fitted or other.feature_norm != recipe.feature_norm:
            continue
        theirs = {**other.model_class.default_hparams, **other.hparams}
        if all(own.get(k) == v for k, v in theirs.items()):
            return other
    return None


@dataclass
class _OutOfFold:
    """Out-of-fold arrays of one (model, test features) pair over the union of the fold panels."""

    mean: np.ndarray
    std: np.ndarray | None = None
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    expected: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: dict[int, tuple[float, float]] = field(default_factory=dict)
    shift: np.ndarray | None = None
    shift_slides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def put(self, name: str, rows: np.ndarray, cols: np.ndarray, values: np.ndarray | None) -> None:
        if values is None:
            return
        if getattr(self, name) is None:
            setattr(self, name, np.full_like(self.mean, np.nan))
        getattr(self, name)[np.ix_(rows, cols)] = values


def _predict_fold(model, test: SpotData, coverage: float | None, device: str) -> tuple:
    """``(mean, spread, lo, hi)`` of a fold's model on its held-out spots (bounds ``None`` without coverage)."""
    if coverage is None:
        return (*model.predict(test, device=device), None, None)
    return model.predict_intervals(test, coverage, device=device)


@leaves_process_state
@doc_params
def cross_validate(
    adata: AnnData,
    *,
    model: str | Recipe | Sequence[str | Recipe] | None = None,
    split_by: str = "patient",
    features_key: str | None = None,
    test_features: Mapping[str, str] | None = None,
    genes: str | Sequence[str] | None = None,
    n_top_genes: int = 1000,
    min_spots: int | None = None,
    library_key: str = LIBRARY_KEY,
    layer: str | None = None,
    key_added: str = "stexp_cv",
    top_n: int = 50,
    smoothing: float | str | None = None,
    calibrate: bool | None = None,
    coverage: float | None = None,
    inner_validation: bool = False,
    keep_models: bool = False,
    model_params: dict[str, dict[str, Any]] | None = None,
    max_epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    seed: int | None = None,
    device: str = "auto",
    devices: int | Sequence[int] | None = None,
    **hparams: Any,
) -> CVResult:
    """Cross-validate the default pipeline (or other models): train on all groups but one, predict the held-out group.

    Every fold is fitted exactly as :func:`stexp.tl.fit` fits (the same recipe, through the same function),
    so the out-of-fold scores are those of ``fit`` + ``predict`` + ``evaluate`` on the same folds. Folds
    leave one patient out (``split_by="patient"``), or one slide out (``split_by=library_key``; this warns
    when sister sections of the held-out slide's patient stay in training). Everything learnt comes from
    the training slides only: the gene panel (:func:`stexp.pp.select_hvg` on them, unless ``genes`` is
    given), every normalisation and choice inside the models (σ, temperatures, penalties, calibration), and
    the models themselves.

    Parameters
    ----------
    adata
        AnnData in stexp's layout with raw counts and image features.
    model
        ``None``: the default pipeline (:data:`stexp.models.DEFAULT_RECIPE`), as :func:`stexp.tl.fit`. A
        registered model name, a :class:`stexp.models.Recipe`, or a list of them (scored side by side on
        the same folds and panels; labelled by name).
    split_by
        ``obs`` column whose values form the folds: ``"patient"`` (default) or the library key.
    features_key
        ``obsm`` key of frozen image features; ``None`` embeds the images first (once, for all folds).
    test_features
        Other renderings of the same spots, ``{name: obsm key}`` (e.g. the slides embedded from a
        lower-resolution or stain-shifted image): each fold's models also predict the held-out slides from
        them, scored as model ``"<label>@<name>"``. Training always reads ``features_key``.
    genes
        A fixed gene panel for every fold (e.g. the HER2+ 785 genes). ``None``: select per fold.
    n_top_genes, min_spots
        Passed to :func:`stexp.pp.select_hvg` when the panel is selected per fold (``min_spots=None``
        keeps its default).
    {library_key}
    {layer}
    key_added
        Key of the out-of-fold predictions (NaN outside the fold's panel), stored as :func:`stexp.tl.predict`
        stores predictions (a layer when the union of the fold panels is all of ``var``, else an ``obsm``
        gene DataFrame): ``key_added`` for a single model, ``f"{{key_added}}_{{label}}"`` for each of a list
        (``"@"`` of a test rendering becomes ``"_"``). A ``"_std"`` key follows where the model gives a
        spread, ``"_lo"`` / ``"_hi"`` with ``coverage``.
    top_n
        Number of highest-expressed and most variable genes of the HEG and HVG scores.
    smoothing, calibrate
        As in :func:`stexp.tl.fit` (``None``: each recipe's own).
    coverage
        Write each fold's split-conformal intervals (the models are calibrated; see :func:`stexp.tl.predict`)
        and report ``coverage``, ``interval_width``, ``unc_spot_spearman`` and ``expected_pcc_spearman``.
    inner_validation
        Hold one training slide of each fold out of the fit (a spatial block of a single training slide) as
        its validation slide: early stopping, and σ / temperatures chosen there (never a held-out slide).
    keep_models
        Keep every fold's fitted model in :attr:`CVResult.models`.
    model_params
        Hyper-parameters per model label, e.g. ``{{"mlp": {{"hidden_dim": 128}}}}``.
    max_epochs, batch_size, lr, weight_decay, seed
        Training options, as in :func:`stexp.tl.fit` (with a list: given to the models that take them).
    device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...: where the models train and predict.
    devices
        Train each fold's neural models with DDP over this many devices (see :func:`stexp.tl.fit`).
    **hparams
        Model hyper-parameters (with a list: given to the models that declare them).

    Returns
    -------
    A :class:`CVResult` with ``per_fold`` (one row per model and test slide) and ``summary``
    (mean and std per model). Also writes the out-of-fold predictions, per-gene scores
    (``adata.var[f"{{key}}_pcc"]``, ``adata.uns["stexp"]["evaluate"][key]``) and a record in
    ``adata.uns["stexp"][key_added]``.

    Raises
    ------
    KeyError
        If ``split_by``, the features or a gene is missing.
    TypeError
        If an option is taken by no model (the message lists what each accepts).
    ValueError
        If ``split_by`` has a single group, a slide spans several groups, or ``validation`` is passed
        (a checkpoint chosen on held-out slides would leak; see ``inner_validation``).
    """
    from stexp._settings import settings

    device = check_device(device)
    if "validation" in hparams:
        raise ValueError(
            "cross_validate takes no validation= slides: choosing a checkpoint on slides outside the "
            "training folds would leak; use inner_validation=True (a training slide of each fold) instead."
        )
    if coverage is not None:
        from stexp.models._calibration import check_coverage

        check_coverage(coverage)
    seed = settings.seed if seed is None else seed
    training = {"max_epochs": max_epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay}
    recipes, single = _recipes(
        model,
        model_params=model_params,
        hparams=hparams,
        training_options={**training, "seed": seed},
        smoothing=smoothing,
        calibrate=calibrate,
        coverage=coverage,
    )
    groups, libs = _groups(adata, split_by, library_key)
    order = list(dict.fromkeys(groups.tolist()))
    _check_split(adata, order, libs, split_by=split_by, library_key=library_key)
    if genes is not None:
        genes = resolve_genes(adata, genes)
    features_key = resolve_features(adata, features_key, library_key=library_key)
    renderings = {features_key: features_key, **_test_renderings(adata, test_features, features_key)}
    hvg_kwargs = {"n_top_genes": n_top_genes, **({} if min_spots is None else {"min_spots": min_spots})}
    fold_rows, panels = _plan_folds(
        adata, groups, libs, genes, library_key=library_key, layer=layer, hvg_kwargs=hvg_kwargs
    )
    union = list(dict.fromkeys(g for fold in panels for g in panels[fold]))
    spec = features_spec(adata, features_key)
    reads_patches = any(r.hparams.get("finetune_encoder", False) for r in recipes)
    patches = spec if reads_patches else None  # a fine-tuned encoder reads the training slides' patches
    data = _rendering_data(
        adata, renderings, features_key, union, layer=layer, library_key=library_key, patches=patches
    )
    names = {
        (r.label, name): r.label if name == features_key else f"{r.label}@{name}"
        for r in recipes
        for name in renderings
    }
    oof, fitted = _run_folds(
        recipes,
        data,
        names,
        groups=groups,
        panels=panels,
        main=features_key,
        inner_validation=inner_validation,
        coverage=coverage,
        describe=lambda fold: f"test {split_by}={order[fold]!r} ({fold_rows[fold]['test_libraries']})",
        seed=int(seed or 0),
        features_key=features_key,
        encoder_spec=spec,
        device=device,
        devices=devices,
    )
    assert data[features_key].target is not None  # spot_data(genes=union) computed it
    target = (union, data[features_key].target)
    keys = {pair: _cv_key(key_added, pair, single=single, main=features_key) for pair in names}
    per_fold = pd.concat(
        [
            _score(
                adata,
                keys[pair],
                names[pair],
                out,
                union,
                panels,
                fold_rows,
                target,
                top_n=top_n,
                library_key=library_key,
                layer=layer,
            )
            for pair, out in oof.items()
        ],
        ignore_index=True,
    )
    layers = {names[pair]: keys[pair] for pair in names}
    record(
        adata,
        key_added,
        {
            "models": [str(r) for r in recipes],
            "recipes": [r.to_dict() for r in recipes],
            "layers": layers,
            "split_by": split_by,
            "library_key": library_key,
            "features_key": features_key,
            "test_features": dict(renderings),
            "genes": f"{len(genes)} given" if genes is not None else "per fold (select_hvg on the training slides)",
            "n_top_genes": n_top_genes if genes is None else None,
            "min_spots": min_spots,
            "folds": {str(r["fold"]): r["test_libraries"] for r in fold_rows},
            "coverage": coverage,
            "inner_validation": inner_validation,
            "device": device,
            "per_fold": per_fold,
        },
    )
    logger.info(f"added {', '.join(where(adata, k) for k in layers.values())}, adata.uns['stexp'][{key_added!r}]")
    return CVResult(
        per_fold=per_fold,
        summary=summarize(per_fold),
        folds=pd.DataFrame(fold_rows).set_index("fold"),
        panels=panels,
        layers=layers,
        models=fitted if keep_models else None,
    )


def _run_folds(
    recipes: list[Recipe],
    data: dict[str, SpotData],
    names: dict[tuple[str, str], str],
    *,
    groups: np.ndarray,
    panels: dict[int, list[str]],
    main: str,
    inner_validation: bool,
    coverage: float | None,
    describe: Callable[[int], str],
    device: str,
    **fit_kw: Any,
) -> tuple[dict[tuple[str, str], _OutOfFold], dict[str, list]]:
    """Fit every recipe on each fold (``data[main]``), predict the held-out spots of every rendering.

    Returns the out-of-fold arrays per (model label, rendering) and each label's fitted models by fold.
    """
    union = list(dict.fromkeys(g for fold in panels for g in panels[fold]))
    column = {g: j for j, g in enumerate(union)}
    n_obs = data[main].n_spots
    oof = {pair: _OutOfFold(np.full((n_obs, len(union)), np.nan, dtype=np.float32)) for pair in names}
    fitted: dict[str, list] = {r.label: [] for r in recipes}
    for fold, group in enumerate(dict.fromkeys(groups.tolist())):
        is_test, rows = groups == group, np.flatnonzero(groups == group)
        cols = np.asarray([column[g] for g in panels[fold]])
        train, val = data[main].subset(~is_test).with_genes(cols), None
        if inner_validation:
            is_val = inner_validation_split(train)
            train, val = train.subset(~is_val), train.subset(is_val)
        logger.info(f"fold {fold + 1}: {describe(fold)}, {len(panels[fold])} genes, {[r.label for r in recipes]}")
        models = _fit_fold(recipes, train, val, genes=panels[fold], device=device, **fit_kw)
        for (label, name), out in oof.items():
            model, fit_seconds = models[label]
            test = data[name].subset(is_test)
            test.target = None
            t0 = time.perf_counter()
            mean, spread, lo, hi = _predict_fold(model, test, coverage, device)
            out.seconds[fold] = (fit_seconds, time.perf_counter() - t0)
            for what, values in (("mean", mean), ("std", spread), ("lo", lo), ("hi", hi)):
                out.put(what, rows, cols, values)
            if model.calibration is not None:
                out.expected[fold] = np.asarray(model.calibration.expected_pcc, dtype=np.float64)
            shift = model.shift_scores(test)
            if shift is not None:
                out.shift = np.full(n_obs, np.nan) if out.shift is None else out.shift
                out.shift[rows] = shift
                out.shift_slides.update(model.shift.summary(shift, test.library))
        for label, (model, _) in models.items():
            fitted[label].append(model)
    return oof, fitted


def _rendering_data(
    adata, renderings: dict[str, str], main: str, union: list[str], *, layer, library_key: str, patches
) -> dict[str, SpotData]:
    """Spot arrays of each rendering; the measured target (over the fold panels' union) and patches only for ``main``."""
    return {
        name: spot_data(
            adata,
            features_key=key,
            library_key=library_key,
            genes=union if name == main else None,
            layer=layer,
            patches=patches if name == main else None,
        )
        for name, key in renderings.items()
    }


def _cv_key(key_added: str, pair: tuple[str, str], *, single: bool, main: str) -> str:
    """The key of a (model label, rendering) pair: ``key_added[_<label>][_<rendering>]``."""
    label, rendering = pair
    parts = [key_added] + ([] if single else [label]) + ([] if rendering == main else [rendering])
    return "_".join(parts)


def _check_split(adata, order: list[str], libs: np.ndarray, *, split_by: str, library_key: str) -> None:
    """At least two groups; a warning when leave-one-slide-out keeps sister sections in training."""
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
                stacklevel=3,
            )


def _test_renderings(adata, test_features: Mapping[str, str] | None, features_key: str) -> dict[str, str]:
    """``{name: obsm key}`` of the other renderings, checked (present, as wide as the training features)."""
    out = dict(test_features or {})
    width = np.shape(adata.obsm[features_key])[1]
    for name, key in out.items():
        if name == features_key or "@" in str(name):
            raise ValueError(f"test_features: the name {name!r} is the training features' key or contains '@'.")
        if key not in adata.obsm:
            raise KeyError(f"test_features[{name!r}] = {key!r} is not in adata.obsm (it has {list(adata.obsm)}).")
        if np.shape(adata.obsm[key])[1] != width:
            raise ValueError(
                f"test_features[{name!r}] ({key!r}) has {np.shape(adata.obsm[key])[1]} features, "
                f"{features_key!r} has {width}: a test rendering must come from the same encoder spec."
            )
    return out


def _score(
    adata,
    key: str,
    name: str,
    out: _OutOfFold,
    union,
    panels,
    fold_rows,
    target,
    *,
    top_n: int,
    library_key: str,
    layer,
) -> pd.DataFrame:
    """Write one model's out-of-fold predictions under ``key`` and score them per held-out slide."""
    from ._evaluate import score_prediction

    write_prediction_set(
        adata,
        key,
        union,
        out.mean,
        std=out.std,
        lo=out.lo,
        hi=out.hi,
        shift=out.shift,
        record={"model": name, "out_of_fold": True, "target": "log1p of counts per 10,000"},
    )
    scores = score_prediction(adata, pred_key=key, library_key=library_key, top_n=top_n, layer=layer, target=target)
    scores = scores.reset_index(names="library_id")
    fold_of_lib = {lib: r["fold"] for r in fold_rows for lib in r["test_libraries"].split(", ")}
    scores.insert(0, "model", name)
    scores.insert(1, "fold", scores["library_id"].map(fold_of_lib).astype(int))
    scores.insert(2, "test_group", scores["fold"].map({r["fold"]: r["test_group"] for r in fold_rows}))
    scores["n_train_spots"] = scores["fold"].map({r["fold"]: r["n_train_spots"] for r in fold_rows})
    scores["fit_seconds"] = scores["fold"].map(lambda f: out.seconds[f][0])
    scores["predict_seconds"] = scores["fold"].map(lambda f: out.seconds[f][1])
    if out.expected:  # each slide's realised per-gene PCC against its fold's expected PCC
        realised = adata.uns["stexp"]["evaluate"][key]["pcc"]
        scores["expected_pcc_spearman"] = [
            spearman(out.expected[f], realised.reindex(panels[f])[lib].to_numpy()) if f in out.expected else np.nan
            for f, lib in zip(scores["fold"], scores["library_id"], strict=True)
        ]
    if out.shift_slides:  # the slide's shift score against its fold's training range
        slide = lambda lib, what: out.shift_slides.get(str(lib), {}).get(what, np.nan)
        scores["shift_score"] = [slide(lib, "score") for lib in scores["library_id"]]
        scores["shift_flagged"] = [slide(lib, "flagged") for lib in scores["library_id"]]
        scores["shift_range_max"] = [slide(lib, "range_max") for lib in scores["library_id"]]
        factor = np.asarray([slide(lib, "expected_pcc_factor") for lib in scores["library_id"]], dtype=float)
        scores["expected_pcc_factor"] = factor
        if out.expected:
            base = [_finite_mean(out.expected[f]) if f in out.expected else np.nan for f in scores["fold"]]
            scores["expected_pcc"] = np.asarray(base) * factor
    return scores


def _finite_mean(values) -> float:
    """Mean of the finite values; NaN when there are none (e.g. a constant model's expected PCCs), silently."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else np.nan


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
