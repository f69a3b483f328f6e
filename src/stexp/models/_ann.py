"""Approximate nearest-neighbour search (faiss IVF) for banks where exact search stops being cheap.

Exact blocked search (:mod:`stexp.models._retrieval`) costs queries x bank x dimensions; above
:data:`ANN_MIN_BANK` bank rows the retrieval family (kNN, ``mclstexp_plus``, the temperature choice, the
calibration's and the shift score's neighbour distances) searches an inverted-file index instead:

- the bank is split into ``nlist ≈ √n`` cells by k-means (faiss, seeded, on a fixed-size sample of the bank);
- a query scans the ``nprobe`` cells nearest to it; ``nprobe`` is chosen at build time by doubling it
  until the recall@k against exact search, measured on a seeded sample of bank rows, reaches
  :data:`TARGET_RECALL` (recorded in :attr:`AnnIndex.info`);
- the cells store the vectors uncompressed (``IndexIVFFlat``), so the similarities (distances) returned
  are exact for the neighbours found: only *which* neighbours are found is approximate.

The index is saved as its centroids and each bank row's cell (:meth:`AnnIndex.state`, a few MB) and
rebuilt at load by placing the rows into their saved cells (:meth:`AnnIndex.from_state`): no k-means and
no assignment, the same index bit for bit. faiss is optional (``pip install stexp[scale]``); without it
every search is exact and a large bank logs once that it is.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from stexp._settings import logger

#: Bank rows from which the retrieval family searches approximately (below it, exact blocked search). Chosen
#: by measurement (``benchmarks/cost_curve.py``): below ~50k rows exact search of 20k queries takes seconds
#: and an index's build costs about as much as it saves.
ANN_MIN_BANK = 50_000
#: Recall@k against exact search that the build-time choice of ``nprobe`` must reach.
TARGET_RECALL = 0.97
#: Bank rows used as queries to measure the recall at build time.
RECALL_QUERIES = 256
#: k-means training rows per cell (a fixed-size sample of the bank: the build stays linear in the bank).
TRAIN_PER_CELL = 32
METRICS = ("ip", "l2")
_warned_missing = False


def faiss_available() -> bool:
    """Whether faiss can be imported (``pip install stexp[scale]`` or ``faiss-cpu``)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def use_ann(n_bank: int, search: str = "auto") -> bool:
    """Whether a bank of ``n_bank`` rows is searched approximately.

    ``search``: ``"auto"`` (approximate from :data:`ANN_MIN_BANK` rows, when faiss is installed),
    ``"exact"`` or ``"approximate"`` (raises without faiss).
    """
    global _warned_missing
    if search not in ("auto", "exact", "approximate"):
        raise ValueError(f"search must be 'auto', 'exact' or 'approximate', got {search!r}.")
    if search == "exact" or (search == "auto" and n_bank < ANN_MIN_BANK):
        return False
    if faiss_available():
        return True
    if search == "approximate":
        raise ImportError(
            "search='approximate' needs faiss: pip install 'stexp[scale]' (or faiss-cpu); or use search='exact'."
        )
    if not _warned_missing:
        logger.info(
            f"a bank of {n_bank} spots (>= {ANN_MIN_BANK}) is searched exactly because faiss is not installed; "
            "pip install 'stexp[scale]' for approximate search (much faster on large banks)."
        )
        _warned_missing = True
    return False


def _as_rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _exact(query: np.ndarray, bank: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Exact top-``k`` bank rows of each query row (unordered), blocked."""
    out = np.empty((query.shape[0], k), dtype=np.int64)
    b2 = None if metric == "ip" else np.einsum("ij,ij->i", bank, bank)
    for s in range(0, query.shape[0], 256):
        score = query[s : s + 256] @ bank.T
        if b2 is not None:
            score = 2 * score - b2[None, :]  # -(|b|² - 2 q·b): larger is nearer
        out[s : s + 256] = np.argpartition(-score, k - 1, axis=1)[:, :k]
    return out


class AnnIndex:
    """An inverted-file faiss index over a bank's rows (see the module doc).

    Parameters
    ----------
    bank
        ``(n, D)`` float32 rows (unit rows for cosine with ``metric="ip"``).
    k
        The neighbours searched for; ``nprobe`` is chosen for this ``k``.
    metric
        ``"ip"`` (inner product; cosine on unit rows) or ``"l2"`` (Euclidean).
    seed
        Seeds the k-means sample, the k-means and the recall sample.
    nlist
        Cells; default ``√n`` (at least 16, at most 4096).
    """

    def __init__(
        self, bank: np.ndarray, *, k: int, metric: str = "ip", seed: int = 0, nlist: int | None = None
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
        bank = _as_rows(bank)
        n = bank.shape[0]
        if n < 2:
            raise ValueError(f"an approximate index needs at least 2 bank rows, got {n}.")
        self.metric, self.seed, self.dim = metric, int(seed), int(bank.shape[1])
        self.nlist = int(nlist or min(4096, max(16, round(np.sqrt(n)))))
        self.nlist = min(self.nlist, n)
        t0 = time.perf_counter()
        centroids = self._train(bank)
        self._index = self._empty(centroids)
        assign = self._index.quantizer.search(bank, 1)[1].ravel().astype(np.int64)
        self._fill(bank, assign)
        self.info: dict[str, Any] = {"nlist": self.nlist, "metric": metric, "n_bank": n}
        self.nprobe = self._choose_nprobe(bank, k)
        self.info["build_seconds"] = round(time.perf_counter() - t0, 2)

    # -- building --------------------------------------------------------------------------------
    def _train(self, bank: np.ndarray) -> np.ndarray:
        import faiss

        rng = np.random.default_rng(self.seed)
        n_train = min(bank.shape[0], TRAIN_PER_CELL * self.nlist)
        sample = bank[np.sort(rng.choice(bank.shape[0], n_train, replace=False))]
        kmeans = faiss.Kmeans(
            self.dim,
            self.nlist,
            niter=10,
            seed=self.seed,
            spherical=self.metric == "ip",
            max_points_per_centroid=TRAIN_PER_CELL,
            min_points_per_centroid=1,
            verbose=False,
        )
        kmeans.train(sample)
        return np.asarray(kmeans.centroids, dtype=np.float32)

    def _empty(self, centroids: np.ndarray):
        import faiss

        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2
        quantizer = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        quantizer.add(_as_rows(centroids))
        index = faiss.IndexIVFFlat(quantizer, self.dim, centroids.shape[0], metric)
        index.is_trained = True
        index.own_fields = False
        self._quantizer = quantizer  # kept alive with the index
        return index

    def _fill(self, bank: np.ndarray, assign: np.ndarray) -> None:
        import faiss

        self._assign = np.ascontiguousarray(assign, dtype=np.int64)
        self._index.add_core(bank.shape[0], faiss.swig_ptr(bank), None, faiss.swig_ptr(self._assign))

    def _choose_nprobe(self, bank: np.ndarray, k: int) -> int:
        """The smallest power-of-two ``nprobe`` (from 8) whose recall@k on sampled bank rows reaches the target."""
        k = min(int(k), bank.shape[0])
        rng = np.random.default_rng(self.seed + 1)
        q = bank[np.sort(rng.choice(bank.shape[0], min(RECALL_QUERIES, bank.shape[0]), replace=False))]
        exact = _exact(q, bank, k, self.metric)
        nprobe, recall = min(8, self.nlist), 0.0
        while True:
            self._index.nprobe = nprobe
            found = self._index.search(q, k)[1]
            recall = recall_at_k(found, exact)
            if recall >= TARGET_RECALL or nprobe >= self.nlist:
                break
            nprobe = min(2 * nprobe, self.nlist)
        self.info.update({"nprobe": int(nprobe), "recall_at_k": round(float(recall), 4), "recall_k": k})
        return int(nprobe)

    # -- saving ----------------------------------------------------------------------------------
    def state(self, prefix: str = "ann.") -> dict[str, np.ndarray]:
        """The arrays that rebuild this index over the same bank: centroids, each row's cell, ``nprobe``."""
        centroids = self._quantizer.reconstruct_n(0, self._quantizer.ntotal)
        return {
            prefix + "centroids": np.asarray(centroids, dtype=np.float32),
            prefix + "assign": self._assign.astype(np.int32),
            prefix + "params": np.asarray([self.nprobe, self.seed, 0 if self.metric == "ip" else 1], dtype=np.int64),
        }

    @classmethod
    def from_state(cls, bank: np.ndarray, state: dict[str, np.ndarray], prefix: str = "ann.") -> AnnIndex:
        """The index saved by :meth:`state`, rebuilt over ``bank`` (the rows it was built on) without k-means."""
        bank = _as_rows(bank)
        centroids = np.asarray(state[prefix + "centroids"], dtype=np.float32)
        assign = np.asarray(state[prefix + "assign"]).astype(np.int64)
        nprobe, seed, metric = (int(v) for v in np.asarray(state[prefix + "params"]).ravel()[:3])
        if assign.shape[0] != bank.shape[0] or centroids.shape[1] != bank.shape[1]:
            raise ValueError(
                f"the saved approximate index covers {assign.shape[0]} rows of {centroids.shape[1]} dimensions, the "
                f"bank has {bank.shape}; the model folder is inconsistent."
            )
        self = cls.__new__(cls)
        self.metric, self.seed, self.dim = METRICS[metric], seed, int(bank.shape[1])
        self.nlist = int(centroids.shape[0])
        t0 = time.perf_counter()
        self._index = self._empty(centroids)
        self._fill(bank, assign)
        self.nprobe = nprobe
        self.info = {"nlist": self.nlist, "metric": self.metric, "n_bank": int(bank.shape[0]), "nprobe": nprobe}
        self.info["load_seconds"] = round(time.perf_counter() - t0, 2)
        return self

    # -- searching -------------------------------------------------------------------------------
    @property
    def n_bank(self) -> int:
        return int(self._index.ntotal)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, scores)`` of the ``k`` nearest bank rows of each query row.

        Scores are inner products (``"ip"``) or squared Euclidean distances (``"l2"``), exact for the rows
        found. A query with fewer than ``k`` rows in its probed cells gets its missing neighbours by exact
        search (rare: a cell of a handful of rows).
        """
        query = _as_rows(query)
        k = min(int(k), self.n_bank)
        self._index.nprobe = self.nprobe
        scores, idx = self._index.search(query, k)
        short = (idx < 0).any(axis=1)
        if short.any():  # too few rows in the probed cells: widen the search for those queries
            self._index.nprobe = self.nlist
            scores[short], idx[short] = self._index.search(query[short], k)
            self._index.nprobe = self.nprobe
        return idx.astype(np.int64), scores.astype(np.float64)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbours (``exact``, ``(q, k)``) that ``found`` contains."""
    found, exact = np.asarray(found), np.asarray(exact)
    if exact.size == 0:
        return 1.0
    hits = [np.intersect1d(f, e, assume_unique=False).size / e.size for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits))
