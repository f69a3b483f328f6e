"""Nearest-neighbour retrieval: cosine top-k with softmax weights, its temperature, and Euclidean neighbours.

Used by the kNN baseline (the default pipeline), ``mclstexp_plus``, the calibration's difficulty scores and
the shift score. Exact, blocked brute force in numpy (memory bounded by ``chunk`` query rows times the bank)
below :data:`stexp.models._ann.ANN_MIN_BANK` bank rows; above it, an approximate faiss index
(:class:`stexp.models._ann.AnnIndex`) when faiss is installed. The choices made on inner folds (the
temperature here) score a bounded, slide-stratified sample of held-out spots
(:func:`stexp.models._data.inner_query_sample`), so their cost grows linearly with the training spots.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stexp._metrics import mean_gene_pearson
from stexp._settings import logger

from ._ann import AnnIndex, use_ann
from ._data import MAX_INNER_QUERIES, SpotData, inner_query_sample
from ._folds import INNER_FOLDS, inner_folds

#: Query rows an approximate index searches at once (its cells are scanned as one matrix product per block).
INDEX_BLOCK = 32_768
#: Query rows whose neighbours' expression is gathered and weighted at once (``(rows, k, genes)`` float32: 10 MB
#: at k=200 and 785 genes, so that the batched matrix products run from cache; 4-5x faster than 256 rows).
WEIGHTING_ROWS = 16
#: Softmax temperatures that ``temperature="auto"`` chooses from (``None``: equal weights).
TEMPERATURE_GRID: tuple[float | None, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, None)


def _neighbour_weights(sim: np.ndarray, temperature: float | None) -> np.ndarray:
    """Row-normalised weights of the retrieved neighbours: ``softmax(sim / temperature)`` or equal."""
    if temperature is None:
        w = np.ones_like(sim)
    else:
        w = np.exp((sim - sim.max(axis=1, keepdims=True)) / float(temperature))
    return w / w.sum(axis=1, keepdims=True)


def bank_index(bank: np.ndarray, k: int, *, search: str = "auto", metric: str = "ip") -> AnnIndex | None:
    """An approximate index over ``bank`` when :func:`stexp.models._ann.use_ann` says so, else ``None`` (exact)."""
    if not use_ann(bank.shape[0], search):
        return None
    index = AnnIndex(bank, k=k, metric=metric)
    logger.debug(f"approximate index over {bank.shape[0]} rows: {index.info}")
    return index


def _top_k(
    query: np.ndarray,
    bank: np.ndarray,
    k: int,
    chunk: int,
    index: AnnIndex | None = None,
    exclude: np.ndarray | None = None,
):
    """Yield ``(rows, top, sim)``: for each block of query rows, the ``k`` most similar bank rows and their similarity.

    Exact blocked search, or ``index``'s approximate search (same similarities for the rows it finds).
    ``exclude``: a boolean mask of bank rows never retrieved (``k`` at most the rows left).
    """
    if exclude is not None:
        k = min(k, int(exclude.size - exclude.sum()))
    if index is not None:  # the index scans a cell for many queries at once: search big blocks, yield chunks
        block = max(chunk, INDEX_BLOCK)
        for b in range(0, query.shape[0], block):
            top, sim = index.search(query[b : b + block], k, exclude=exclude)
            for start in range(0, top.shape[0], chunk):
                yield slice(b + start, b + start + chunk), top[start : start + chunk], sim[start : start + chunk]
        return
    excluded = None if exclude is None else np.flatnonzero(exclude)
    for start in range(0, query.shape[0], chunk):
        sim = query[start : start + chunk] @ bank.T
        if excluded is not None:
            sim[:, excluded] = -np.inf
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        yield slice(start, start + chunk), top, np.take_along_axis(sim, top, axis=1).astype(np.float64)


def euclidean_neighbours(
    query: np.ndarray, bank: np.ndarray, k: int, *, index: AnnIndex | None = None, search: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """Indices and Euclidean distances of the ``k`` nearest bank rows of every query row (blocked).

    ``index``: an :class:`~stexp.models._ann.AnnIndex` (``metric="l2"``) over ``bank`` to search instead.
    Without one, a bank of :data:`~stexp.models._ann.ANN_MIN_BANK` rows or more is indexed for this call
    (``search="auto"``, faiss installed); ``search="exact"`` never.
    """
    k = min(k, bank.shape[0])
    if index is None and query.shape[0]:
        index = bank_index(np.asarray(bank, dtype=np.float32), k, search=search, metric="l2")
    if index is not None:
        idx, d2 = index.search(query, k)
        return idx, np.sqrt(np.maximum(d2, 0))
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


def outside(rows: np.ndarray, n: int) -> np.ndarray:
    """The mask of the ``n`` bank rows that are not in ``rows`` (the rows a left-out search excludes)."""
    mask = np.ones(n, dtype=bool)
    mask[np.asarray(rows, dtype=np.int64)] = False
    return mask


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
    index: AnnIndex | None = None,
    search: str = "exact",
    exclude: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cosine top-``k`` retrieval with softmax weights: the weighted mean and standard deviation of the neighbours.

    ``index``: an approximate index over ``bank_unit`` (:func:`bank_index`) to search instead of exact search.
    Without one, ``search="auto"`` indexes a bank of :data:`~stexp.models._ann.ANN_MIN_BANK` rows or more for
    this call (a model that keeps its bank should build the index once and pass it). ``exclude``: a boolean
    mask of bank rows never retrieved (a held-out fold of the bank; ``k`` at most the rows left).
    """
    if index is None and search != "exact" and query_unit.shape[0]:
        index = bank_index(bank_unit, k, search=search)
    mean = np.empty((query_unit.shape[0], bank_target.shape[1]), dtype=np.float32)
    spread = np.empty_like(mean)
    for rows, top, sim in _top_k(query_unit, bank_unit, k, chunk, index, exclude):
        w = _neighbour_weights(sim, temperature).astype(np.float32)
        for block, out in _weighting_blocks(rows, top.shape[0]):
            mean[out], spread[out] = _weighted_moments(w[block], bank_target[top[block]])
    return mean, spread


def _weighting_blocks(rows: slice, n: int):
    """Yield ``(block, out)``: :data:`WEIGHTING_ROWS` rows of a search chunk of ``n`` rows, and where they go."""
    for s in range(0, n, WEIGHTING_ROWS):
        yield slice(s, s + WEIGHTING_ROWS), slice(rows.start + s, rows.start + min(s + WEIGHTING_ROWS, n))


def _weighted_moments(w: np.ndarray, neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and standard deviation over the neighbours ``(q, k, genes)`` (overwritten) with weights ``(q, k)``."""
    weights = w[:, None, :]
    m = np.matmul(weights, neighbours)[:, 0]
    neighbours -= m[:, None, :]  # two passes: no cancellation of E[x²] - m²
    np.square(neighbours, out=neighbours)
    return m, np.sqrt(np.maximum(np.matmul(weights, neighbours)[:, 0], 0.0))


def retrieval_by_temperature(
    bank_unit: np.ndarray,
    bank_target: np.ndarray,
    query_unit: np.ndarray,
    *,
    k: int,
    chunk: int = 256,
    search: str = "auto",
    index: AnnIndex | None = None,
    exclude: np.ndarray | None = None,
) -> dict[float | None, np.ndarray]:
    """Retrieval predictions of ``query_unit`` from a bank (cosine top-``k``), one per temperature of the grid.

    ``index``: an approximate index over the bank; without one, a bank of
    :data:`~stexp.models._ann.ANN_MIN_BANK` rows or more is indexed for this call (``search``). ``exclude``: a
    boolean mask of bank rows never retrieved.
    """
    k = min(int(k), bank_unit.shape[0])
    if index is None and query_unit.shape[0]:
        index = bank_index(bank_unit, k, search=search)
    preds = np.empty((len(TEMPERATURE_GRID), query_unit.shape[0], bank_target.shape[1]), dtype=np.float32)
    for rows, top, sim in _top_k(query_unit, bank_unit, k, chunk, index, exclude):
        w = np.stack([_neighbour_weights(sim, t) for t in TEMPERATURE_GRID], axis=1).astype(np.float32)  # (q, T, k)
        for block, out in _weighting_blocks(rows, top.shape[0]):
            preds[:, out] = np.matmul(w[block], bank_target[top[block]]).transpose(1, 0, 2)
    return dict(zip(TEMPERATURE_GRID, preds, strict=True))


def choose_temperature(
    train_unit: np.ndarray,
    train: SpotData,
    *,
    k: int,
    validation_unit: np.ndarray | None = None,
    validation: SpotData | None = None,
    default: float | None = 0.1,
    n_folds: int = INNER_FOLDS,
    max_queries: int | None = MAX_INNER_QUERIES,
    search: str = "auto",
    index: AnnIndex | None = None,
    seed: int = 0,
) -> tuple[float | None, dict[str, Any]]:
    """The retrieval temperature of :data:`TEMPERATURE_GRID` that predicts held-out spots best.

    On the validation spots (retrieving from every training spot) when given with a target, else on the
    training spots' inner folds (:func:`stexp.models._folds.inner_folds`): each fold retrieves from the
    others (the whole bank searched with the fold's rows excluded: no copy of the bank per fold). Score: PCC(ACG) as :func:`stexp.tl.evaluate` computes it (a block of a single slide scored as
    a slide). At most ``max_queries`` held-out spots are scored, a slide-stratified sample of spatial
    windows (:func:`stexp.models._data.inner_query_sample`), so the cost is linear in the training spots.

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
    max_queries
        Held-out spots scored at most (``None``: all).
    search
        ``"auto"``, ``"exact"`` or ``"approximate"`` (:func:`stexp.models._ann.use_ann`).
    index
        An approximate index over ``train_unit`` to search (built here when ``search`` asks for one and none
        is given).
    seed
        Seeds the sample.

    Returns
    -------
    The temperature and ``{"temperature", "temperature_grid", "inner_pcc", "inner_cv", "n_queries"}`` for the
    history (``n_queries``: the held-out spots scored).
    """
    target = np.asarray(train.target, dtype=np.float32)
    if validation_unit is not None and validation is not None and validation.target is not None:
        how = "the validation slides"
        rows = inner_query_sample(validation, np.arange(validation.n_spots), max_queries, seed=seed)
        preds = retrieval_by_temperature(train_unit, target, validation_unit[rows], k=k, search=search, index=index)
        truth = np.asarray(validation.target, dtype=np.float32)[rows]
        lib = np.asarray(validation.library).astype(str)[rows]
    elif train.n_spots >= 2:
        folds = inner_folds(train, n_folds)
        how = folds.how
        budget = None if max_queries is None else max(1, int(max_queries) // folds.n_folds)
        held = [
            inner_query_sample(train, held_idx, budget, seed=seed + f) for f, (_, held_idx) in enumerate(folds.splits)
        ]
        rows = np.sort(np.concatenate(held))
        position = np.searchsorted(rows, np.arange(train.n_spots))
        preds = {t: np.full((rows.size, target.shape[1]), np.nan, dtype=np.float32) for t in TEMPERATURE_GRID}
        if index is None:
            index = bank_index(train_unit, k, search=search)
        for (fit_idx, _), held_idx in zip(folds.splits, held, strict=True):
            bank_pred = retrieval_by_temperature(
                train_unit, target, train_unit[held_idx], k=k, index=index, exclude=outside(fit_idx, train.n_spots)
            )
            for t, pred in bank_pred.items():
                preds[t][position[held_idx]] = pred
        truth, lib = target[rows], folds.scoring_library(train.library)[rows]
    else:
        rows = np.arange(train.n_spots)
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
        "n_queries": int(rows.size),
    }
