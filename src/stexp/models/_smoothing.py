"""Spatial smoothing of predictions: a Gaussian average over neighbouring spots of the same slide.

Neighbouring spots share tissue, and their expression is alike; an image model's per-spot errors are
largely independent. Averaging each spot's prediction with those of its neighbours (weights
``exp(-d² / 2σ²)`` for spot centres ``d`` µm apart, within ``3σ``, spots of the same slide only)
removes part of the error and keeps the tissue-scale signal. The strength ``σ`` is chosen on
training slides only (:func:`choose_smoothing`): on the inner folds every choice of stexp uses
(:func:`stexp.models._folds.inner_folds`: patients, else slides, else spatial blocks), each ``σ`` of a
grid is scored by PCC(ACG) on the held-out spots, as :func:`stexp.tl.evaluate` computes it; ``σ = 0`` (no smoothing) is always a
candidate and wins ties, so a prediction without spatial structure is left alone.

Plain numpy / scipy; used by :func:`stexp.models._recipe.fit_recipe` (``smoothing=`` of every recipe).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from stexp._metrics import mean_gene_pearson

from ._data import MAX_INNER_QUERIES, SpotData, inner_query_sample
from ._folds import INNER_FOLDS, InnerFolds, inner_folds
from ._neighbors import radius_pairs, spot_pitch

if TYPE_CHECKING:  # pragma: no cover
    from ._base import ExpressionModel, PredictionPair

#: The σ grid of ``smoothing="auto"``, in multiples of the slide's spot pitch (median nearest-neighbour distance).
PITCH_MULTIPLES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


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


def _score_grid(pred: np.ndarray, data: SpotData, folds: InnerFolds | None, grid: Sequence[float]) -> list[float]:
    """PCC(ACG) of ``pred`` smoothed with each σ of ``grid`` (neighbours only within a held-out group)."""
    library = np.asarray(data.library).astype(str)
    if folds is not None:  # a block never borrows from the spots an inner model trained on
        library = np.char.add(np.char.add(library, "|"), np.asarray(folds.fold).astype(str))
    score_lib = library if folds is None else folds.scoring_library(data.library)
    target = np.asarray(data.target)
    return [mean_gene_pearson(smooth(pred, data.coords_um, library, s), target, score_lib) for s in grid]


def choose_smoothing(
    fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
    data: SpotData,
    *,
    multiples: Sequence[float] = PITCH_MULTIPLES,
    n_folds: int = INNER_FOLDS,
    max_queries: int | None = MAX_INNER_QUERIES,
    seed: int = 0,
) -> dict[str, Any]:
    """Choose the smoothing σ on training spots only, on their inner folds (:func:`stexp.models._folds.inner_folds`).

    At most ``max_queries`` held-out spots are predicted and scored: a slide-stratified sample of spatial
    windows (:func:`stexp.models._data.inner_query_sample`), so that the cost grows linearly with the
    training spots; a window keeps each spot's neighbours for the smoothing.

    Parameters
    ----------
    fit_predict
        ``fit_predict(fit_index, held_out_index)`` fits a fresh model on the spots ``fit_index`` and returns
        its (unsmoothed) prediction for ``held_out_index``.
    data
        The training spots with their target.
    multiples
        The σ grid in multiples of the spot pitch; ``0`` (no smoothing) must be among them.
    n_folds
        Inner folds.
    max_queries
        Held-out spots scored at most (``None``: all).
    seed
        Seeds the sample.

    Returns
    -------
    ``{"sigma_um", "pitch_um", "grid_um", "inner_pcc", "inner_cv", "n_inner_folds", "n_queries"}``: the chosen
    σ, the pitch, the grid, the inner PCC(ACG) of each σ, how the inner folds were made and the held-out spots
    scored.
    """
    if 0.0 not in [float(m) for m in multiples]:
        raise ValueError(f"the smoothing grid must contain 0 (no smoothing), got {list(multiples)}.")
    pitch = spot_pitch(data.coords_um, data.library)
    if not np.isfinite(pitch):
        return {"sigma_um": 0.0, "pitch_um": None, "grid_um": [0.0], "inner_pcc": [], "inner_cv": "no spot pairs"}
    grid = [float(m) * pitch for m in multiples]
    if data.n_spots < 2:
        return {"sigma_um": 0.0, "pitch_um": pitch, "grid_um": grid, "inner_pcc": [], "inner_cv": "too few spots"}
    folds = inner_folds(data, n_folds)
    budget = None if max_queries is None else max(1, int(max_queries) // folds.n_folds)
    held = [inner_query_sample(data, h, budget, seed=seed + f) for f, (_, h) in enumerate(folds.splits)]
    rows = np.sort(np.concatenate(held))
    position = np.searchsorted(rows, np.arange(data.n_spots))
    pred = np.full((rows.size, np.asarray(data.target).shape[1]), np.nan)
    for (fit_idx, _), held_idx in zip(folds.splits, held, strict=True):
        pred[position[held_idx]] = fit_predict(fit_idx, held_idx)
    sampled = InnerFolds(splits=[], fold=folds.fold[rows], groups=folds.groups[rows], unit=folds.unit)
    scores = _score_grid(pred, data.subset(rows), sampled, grid)
    return _best_sigma(scores, grid, pitch, folds.how) | {"n_inner_folds": folds.n_folds, "n_queries": int(rows.size)}


def _best_sigma(scores: list[float], grid: list[float], pitch: float, how: str) -> dict[str, Any]:
    """The σ of the highest score (the smallest σ wins ties; NaN scores never win)."""
    best = int(np.argmax([s if np.isfinite(s) else -np.inf for s in scores]))
    return {
        "sigma_um": float(grid[best]),
        "pitch_um": float(pitch),
        "grid_um": [float(g) for g in grid],
        "inner_pcc": [float(s) for s in scores],
        "inner_cv": how,
    }


def smoothing_option(value: float | str | None) -> float | str | None:
    """Check ``smoothing=`` of a model: ``None`` / ``0`` (none), ``"auto"`` (chosen on training slides) or σ in µm."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) or value < 0:
        raise ValueError(f"smoothing must be None, 'auto' or a number of µm >= 0, got {value!r}.")
    return float(value)


def fit_smoothing(
    model: ExpressionModel,
    option: float | str | None,
    train: SpotData,
    validation: SpotData | None = None,
    *,
    predict_held: Callable[[np.ndarray, np.ndarray], PredictionPair],
) -> dict[str, Any]:
    """The fitted smoothing of ``model`` (just trained on ``train``): its option and σ.

    ``None`` or a number is used as it is. ``"auto"`` chooses σ on the ``validation`` slides when given
    (the fitted model's predictions there; no refit), else by :func:`choose_smoothing` on the training
    slides' inner folds, where ``predict_held(fit_idx, held_idx)`` predicts held-out rows of ``train``
    unsmoothed, as an inner model fitted on ``fit_idx`` with the choices ``model`` already made fixed
    (:func:`stexp.models._recipe.inner_predictor`).
    """
    from stexp._settings import logger

    option = smoothing_option(option)
    if option is None or option != "auto":
        return {"option": option, "sigma_um": 0.0 if option is None else float(option)}
    if validation is not None and validation.target is not None and validation.n_spots >= 3:
        pitch = spot_pitch(validation.coords_um, validation.library)
        grid = [float(m) * pitch for m in PITCH_MULTIPLES] if np.isfinite(pitch) else [0.0]
        pred = model.predict(validation, smooth=False)[0]
        result = _best_sigma(_score_grid(pred, validation, None, grid), grid, pitch, "the validation slides")
    else:
        result = choose_smoothing(lambda fit_idx, held_idx: predict_held(fit_idx, held_idx)[0], train)
    logger.info(f"{model.name}: smoothing σ = {result['sigma_um']:.0f} µm, chosen by {result['inner_cv']}")
    return {"option": "auto", **result}
