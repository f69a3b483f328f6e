"""Spatial smoothing of predictions: a Gaussian average over neighbouring spots of the same slide.

Neighbouring spots share tissue, and their expression is alike; an image model's per-spot errors are
largely independent. Averaging each spot's prediction with those of its neighbours (weights
``exp(-d² / 2σ²)`` for spot centres ``d`` µm apart, within ``3σ``, spots of the same slide only)
removes part of the error and keeps the tissue-scale signal. The strength ``σ`` is chosen on
training slides only (:func:`choose_smoothing`): an inner cross-validation, grouped by slide (or, with
a single training slide, by its two spatial halves), scores each ``σ`` of a grid by the mean
per-gene Pearson correlation on the inner validation spots; ``σ = 0`` (no smoothing) is always a
candidate and wins ties, so a prediction without spatial structure is left alone.

Plain numpy / scipy; used by :class:`stexp.models.ExpressionModel` (``smoothing=`` of every model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from stexp.models._neighbors import radius_pairs, spot_pitch

#: The σ grid of ``smoothing="auto"``, in multiples of the slide's spot pitch (median nearest-neighbour distance).
PITCH_MULTIPLES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
#: Inner folds of ``smoothing="auto"`` (at most the number of training slides).
INNER_FOLDS = 3


def smoothing_matrix(coords_um: np.ndarray, library: np.ndarray, sigma_um: float):
    """Row-normalised sparse ``(n, n)`` Gaussian weights between spots of the same slide within ``3σ``.

    ``sigma_um <= 0`` gives the identity (every spot keeps its own value).
    """
    import scipy.sparse as sp

    coords = np.asarray(coords_um, dtype=np.float64)
    library = np.asarray(library).astype(str)
    n = coords.shape[0]
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords_um must have shape (n_spots, 2), got {coords.shape}.")
    if library.shape != (n,):
        raise ValueError(f"library has shape {library.shape}, expected ({n},).")
    sigma = float(sigma_um)
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma_um must be a finite number >= 0, got {sigma_um!r}.")
    if sigma == 0 or n == 0:
        return sp.identity(n, format="csr", dtype=np.float64)
    pairs = radius_pairs(coords, library, 3.0 * sigma)
    i, j = pairs[:, 0], pairs[:, 1]
    w = np.exp(-((coords[i] - coords[j]) ** 2).sum(axis=1) / (2.0 * sigma * sigma))
    diag = np.arange(n)
    rows, cols, vals = [i, j, diag], [j, i, diag], [w, w, np.ones(n)]
    W = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    norm = np.asarray(W.sum(axis=1)).ravel()
    return sp.diags(1.0 / norm) @ W


def smooth(values: np.ndarray, coords_um: np.ndarray, library: np.ndarray, sigma_um: float) -> np.ndarray:
    """``values`` (``(n_spots, ...)``) averaged over neighbouring spots of the same slide (see module doc)."""
    values = np.asarray(values)
    if float(sigma_um) == 0:
        return values
    W = smoothing_matrix(coords_um, library, sigma_um)
    flat = values.reshape(values.shape[0], -1).astype(np.float64)
    return np.asarray(W @ flat, dtype=values.dtype).reshape(values.shape)


def mean_gene_pearson(pred: np.ndarray, target: np.ndarray, library: np.ndarray) -> float:
    """Mean over slides of the mean per-gene Pearson correlation across the slide's spots (constant genes skipped)."""
    library = np.asarray(library).astype(str)
    scores = []
    for lib in np.unique(library):
        m = library == lib
        if m.sum() < 3:
            continue
        p = pred[m] - pred[m].mean(axis=0)
        t = target[m] - target[m].mean(axis=0)
        den = np.sqrt((p * p).sum(axis=0) * (t * t).sum(axis=0))
        ok = den > 1e-12
        if ok.any():
            scores.append(float(((p * t).sum(axis=0)[ok] / den[ok]).mean()))
    return float(np.mean(scores)) if scores else float("nan")


def inner_groups(coords_um: np.ndarray, library: np.ndarray) -> tuple[np.ndarray, str]:
    """Groups of the inner validation: the slides, or the two halves (longer axis) of a single slide."""
    library = np.asarray(library).astype(str)
    if len(np.unique(library)) >= 2:
        return library, "slides"
    coords = np.asarray(coords_um, dtype=np.float64)
    axis = int(np.argmax(np.ptp(coords, axis=0))) if len(coords) else 0
    half = coords[:, axis] > np.median(coords[:, axis])
    return np.where(half, "half1", "half0"), "two spatial halves of the one training slide"


def choose_smoothing(
    fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
    target: np.ndarray,
    coords_um: np.ndarray,
    library: np.ndarray,
    *,
    multiples: Sequence[float] = PITCH_MULTIPLES,
    n_folds: int = INNER_FOLDS,
) -> dict[str, Any]:
    """Choose the smoothing σ on training spots only, by inner cross-validation.

    Parameters
    ----------
    fit_predict
        ``fit_predict(train_index, val_index)`` fits a fresh model on the training spots ``train_index``
        and returns its (unsmoothed) prediction for ``val_index``.
    target
        Measured expression of the training spots ``(n, n_genes)``.
    coords_um, library
        Spot centres in µm and slide of each training spot.
    multiples
        The σ grid in multiples of the spot pitch; ``0`` (no smoothing) must be among them.
    n_folds
        Inner folds, at most the number of groups (slides, or two halves of a single slide).

    Returns
    -------
    ``{"sigma_um", "pitch_um", "grid_um", "inner_pcc", "inner_cv", "n_inner_folds"}``: the chosen σ,
    the pitch, the grid, the inner mean per-gene Pearson of each σ and how the inner folds were made.
    """
    from sklearn.model_selection import GroupKFold

    target = np.asarray(target, dtype=np.float64)
    pitch = spot_pitch(coords_um, library)
    if 0.0 not in [float(m) for m in multiples]:
        raise ValueError(f"the smoothing grid must contain 0 (no smoothing), got {list(multiples)}.")
    if not np.isfinite(pitch):
        return {"sigma_um": 0.0, "pitch_um": None, "grid_um": [0.0], "inner_pcc": [], "inner_cv": "no spot pairs"}
    grid = [float(m) * pitch for m in multiples]
    groups, how = inner_groups(coords_um, library)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        return {"sigma_um": 0.0, "pitch_um": pitch, "grid_um": grid, "inner_pcc": [], "inner_cv": "too few spots"}
    k = max(2, min(int(n_folds), n_groups))
    # The validation spots of every inner fold, scored together per slide.
    pred = np.full_like(target, np.nan)
    for tr, va in GroupKFold(n_splits=k).split(target, groups=groups):
        pred[va] = fit_predict(tr, va)
    lib = np.asarray(library).astype(str)
    # Neighbours only within the same inner validation group (a half never borrows from the training half).
    smooth_lib = np.char.add(np.char.add(lib, "|"), np.asarray(groups).astype(str))
    scores = [mean_gene_pearson(smooth(pred, coords_um, smooth_lib, s), target, smooth_lib) for s in grid]
    finite = [s if np.isfinite(s) else -np.inf for s in scores]
    best = int(np.argmax(finite))  # first maximum: the smallest σ wins ties
    return {
        "sigma_um": float(grid[best]),
        "pitch_um": float(pitch),
        "grid_um": grid,
        "inner_pcc": [float(s) for s in scores],
        "inner_cv": f"GroupKFold({k}) over {how}",
        "n_inner_folds": k,
    }


def smoothing_option(value: float | str | None) -> float | str | None:
    """Check ``smoothing=`` of a model: ``None`` / ``0`` (none), ``"auto"`` (chosen on training slides) or σ in µm."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) or value < 0:
        raise ValueError(f"smoothing must be None, 'auto' or a number of µm >= 0, got {value!r}.")
    return float(value)


def fit_smoothing(model, train, validation=None) -> dict[str, Any]:
    """The fitted smoothing of ``model`` (just trained on ``train``): its option and σ.

    A number is used as it is. ``"auto"`` chooses σ on the ``validation`` slides when given (the
    fitted model's predictions there; no refit), else by :func:`choose_smoothing` over the training
    slides (fresh models of the same class and hyper-parameters, fitted on inner folds).
    """
    from stexp._settings import logger

    option = model.smoothing.get("option")
    if option is None or option != "auto":
        return {"option": option, "sigma_um": 0.0 if option is None else float(option)}
    if validation is not None and validation.target is not None and validation.n_spots >= 3:
        pred = model.predict(validation, smooth=False)[0]
        pitch = spot_pitch(validation.coords_um, validation.library)
        grid = [float(m) * pitch for m in PITCH_MULTIPLES] if np.isfinite(pitch) else [0.0]
        scores = [
            mean_gene_pearson(
                smooth(pred, validation.coords_um, validation.library, s), validation.target, validation.library
            )
            for s in grid
        ]
        best = int(np.argmax([s if np.isfinite(s) else -np.inf for s in scores]))
        result = {"sigma_um": grid[best], "pitch_um": pitch, "grid_um": grid, "inner_pcc": scores}
        result["inner_cv"] = "the validation slides"
    else:
        # a model may fix, for these inner fits, what it already chose on all training slides (e.g. a penalty)
        inner_hparams = {**model.hparams, **getattr(model, "smoothing_inner_hparams", dict)()}

        def fit_predict(tr: np.ndarray, va: np.ndarray) -> np.ndarray:
            inner = model.inner_copy(len(tr), **inner_hparams)
            inner.fit(train.subset(tr), device=model.device, num_workers=model.num_workers)
            return inner.predict(train.subset(va), smooth=False)[0]

        result = choose_smoothing(fit_predict, train.target, train.coords_um, train.library)
    logger.info(f"{model.name}: smoothing σ = {result['sigma_um']:.0f} µm, chosen by {result['inner_cv']}")
    return {"option": "auto", **result}
