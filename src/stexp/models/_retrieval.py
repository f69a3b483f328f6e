"""Nearest-neighbour retrieval: cosine top-k with softmax weights, its temperature, and Euclidean neighbours.

Used by the kNN baseline (the default pipeline), ``mclstexp_plus`` and the calibration's difficulty scores.
Exact, blocked brute force in numpy: memory is bounded by ``chunk`` query rows times the bank.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stexp._metrics import mean_gene_pearson

from ._data import SpotData
from ._folds import INNER_FOLDS, inner_folds

#: Softmax temperatures that ``temperature="auto"`` chooses from (``None``: equal weights).
TEMPERATURE_GRID: tuple[float | None, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, None)


def _neighbour_weights(sim: np.ndarray, temperature: float | None) -> np.ndarray:
    """Row-normalised weights of the retrieved neighbours: ``softmax(sim / temperature)`` or equal."""
    if temperature is None:
        w = np.ones_like(sim)
    else:
        w = np.exp((sim - sim.max(axis=1, keepdims=True)) / float(temperature))
    return w / w.sum(axis=1, keepdims=True)


def _top_k(query: np.ndarray, bank: np.ndarray, k: int, chunk: int):
    """Yield ``(rows, top, sim)``: for each block of query rows, the ``k`` most similar bank rows and their similarity."""
    for start in range(0, query.shape[0], chunk):
        sim = query[start : start + chunk] @ bank.T
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        yield slice(start, start + chunk), top, np.take_along_axis(sim, top, axis=1).astype(np.float64)


def euclidean_neighbours(query: np.ndarray, bank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and Euclidean distances of the ``k`` nearest bank rows of every query row (blocked)."""
    k = min(k, bank.shape[0])
    idx = np.empty((query.shape[0], k), dtype=np.int64)
    dist = np.empty((query.shape[0], k), dtype=np.float64)
    b2 = np.einsum("ij,ij->i", bank, bank)
    for s in range(0, query.shape[0], 1024):
        q = query[s : s + 1024]
        d2 = np.einsum("ij,ij->i", q, q)[:, None] + b2[None, :] - 2 * q @ bank.T
        top = np.argpartition(d2, k - 1, axis=1)[:, :k]
        idx[s : s + 1024] = top
        dist[s : s + 1024] = np.sqrt(np.maximum(np.take_along_axis(d2, top, axis=1), 0))
    return idx, dist


def temperature_state(temperature: float | None) -> np.ndarray:
    """The temperature in use as a saved array (``nan``: equal weights)."""
    return np.asarray([np.nan if temperature is None else float(temperature)], dtype=np.float64)


def temperature_from_state(array: np.ndarray) -> float | None:
    """Inverse of :func:`temperature_state`."""
    t = float(np.asarray(array).ravel()[0])
    return None if np.isnan(t) else t


def weighted_retrieval(
    query_unit: np.ndarray,
    bank_unit: np.ndarray,
    bank_target: np.ndarray,
    *,
    k: int,
    temperature: float | None,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-``k`` retrieval with softmax weights: the weighted mean and standard deviation of the neighbours."""
    mean = np.empty((query_unit.shape[0], bank_target.shape[1]), dtype=np.float32)
    spread = np.empty_like(mean)
    for rows, top, sim in _top_k(query_unit, bank_unit, k, chunk):
        w = _neighbour_weights(sim, temperature)
        neighbours = bank_target[top]  # (chunk, k, genes)
        m = np.einsum("qk,qkg->qg", w, neighbours)
        var = np.einsum("qk,qkg->qg", w, (neighbours - m[:, None, :]) ** 2)
        mean[rows] = m
        spread[rows] = np.sqrt(np.maximum(var, 0.0))
    return mean, spread


def retrieval_by_temperature(
    bank_unit: np.ndarray, bank_target: np.ndarray, query_unit: np.ndarray, *, k: int, chunk: int = 256
) -> dict[float | None, np.ndarray]:
    """Retrieval predictions of ``query_unit`` from a bank (cosine top-``k``), one per temperature of the grid."""
    k = min(int(k), bank_unit.shape[0])
    preds = {t: np.empty((query_unit.shape[0], bank_target.shape[1]), dtype=np.float32) for t in TEMPERATURE_GRID}
    for rows, top, sim in _top_k(query_unit, bank_unit, k, chunk):
        neighbours = bank_target[top]
        for t in TEMPERATURE_GRID:
            preds[t][rows] = np.einsum("qk,qkg->qg", _neighbour_weights(sim, t), neighbours)
    return preds


def choose_temperature(
    train_unit: np.ndarray,
    train: SpotData,
    *,
    k: int,
    validation_unit: np.ndarray | None = None,
    validation: SpotData | None = None,
    default: float | None = 0.1,
    n_folds: int = INNER_FOLDS,
) -> tuple[float | None, dict[str, Any]]:
    """The retrieval temperature of :data:`TEMPERATURE_GRID` that predicts held-out spots best.

    On the validation spots (retrieving from every training spot) when given with a target, else on the
    training spots' inner folds (:func:`stexp.models._folds.inner_folds`): each fold retrieves from the
    others. Score: PCC(ACG) as :func:`stexp.tl.evaluate` computes it (a block of a single slide scored as
    a slide).

    Parameters
    ----------
    train_unit, validation_unit
        Unit-norm embeddings of the training (bank) and validation spots.
    train, validation
        Their :class:`~stexp.models.SpotData` (target, slides, patients, coordinates).
    k
        Neighbours retrieved (at most the bank size).
    default
        The temperature returned when nothing can be scored (too few spots).
    n_folds
        Inner folds.

    Returns
    -------
    The temperature and ``{"temperature", "temperature_grid", "inner_pcc", "inner_cv"}`` for the history.
    """
    target = np.asarray(train.target, dtype=np.float32)
    if validation_unit is not None and validation is not None and validation.target is not None:
        how = "the validation slides"
        preds = retrieval_by_temperature(train_unit, target, validation_unit, k=k)
        truth, lib = np.asarray(validation.target, dtype=np.float32), np.asarray(validation.library).astype(str)
    elif train.n_spots >= 2:
        folds = inner_folds(train, n_folds)
        how = folds.how
        preds = {t: np.full(target.shape, np.nan, dtype=np.float32) for t in TEMPERATURE_GRID}
        for fit_idx, held_idx in folds.splits:
            bank_pred = retrieval_by_temperature(train_unit[fit_idx], target[fit_idx], train_unit[held_idx], k=k)
            for t, pred in bank_pred.items():
                preds[t][held_idx] = pred
        truth, lib = target, folds.scoring_library(train.library)
    else:
        preds, truth, lib, how = {}, target, np.asarray(train.library).astype(str), "one training spot"
    scores = [mean_gene_pearson(preds[t], truth, lib) if preds else float("nan") for t in TEMPERATURE_GRID]
    finite = [s if np.isfinite(s) else -np.inf for s in scores]
    if np.isfinite(max(finite)):
        chosen = TEMPERATURE_GRID[int(np.argmax(finite))]
    else:  # too few spots to validate
        chosen, how = default, how + " (nothing to score: the default)"
    return chosen, {
        "temperature": chosen,
        "temperature_grid": list(TEMPERATURE_GRID),
        "inner_pcc": scores,
        "inner_cv": how,
    }
