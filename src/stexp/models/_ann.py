"""Approximate nearest-neighbour search (faiss IVF) for banks where exact search stops being cheap.

Exact blocked search (:mod:`stexp.models._retrieval`) costs queries x bank x dimensions; above
:data:`ANN_MIN_BANK` bank rows the retrieval family (kNN, ``mclstexp_plus``, the temperature choice, the
calibration's and the shift score's neighbour distances) searches an inverted-file index instead:

- the bank is split into ``nlist ≈ √n`` cells by k-means (faiss, seeded, on a fixed-size sample of the bank);
- a query scans the ``nprobe`` cells nearest to it; ``nprobe`` is chosen at build time by doubling it
  until the recall@k against exact search, measured on a seeded sample of bank rows, reaches
  :data:`TARGET_RECALL` (recorded in :attr:`AnnIndex.info`);
- the cells hold the bank rows uncompressed, sorted by cell, so the similarities (distances) returned are
  exact for the neighbours found: only *which* neighbours are found is approximate.

faiss gives the k-means and the coarse quantizer (which cells a query probes). The cells are scanned here,
a block of queries at a time, as one matrix product per cell: faiss's ``IndexIVFFlat`` scans each query on
its own, which measured (one thread, 2,000 queries, a 50k bank of 1,704-d rows) 5.0 s of CPU for 7% of the
bank against 4.9 s for exact search of all of it; the per-cell products took 1.9 s. With threaded BLAS on a
busy machine the small products cost several times more CPU (see :data:`ANN_MIN_BANK`).

The index is saved as its centroids and each bank row's cell (:meth:`AnnIndex.state`, a few MB beside the
bank) and rebuilt at load by sorting the rows into their saved cells (:meth:`AnnIndex.from_state`): no
k-means and no assignment, the same index bit for bit. faiss is optional (``pip install stexp[scale]``); without it
every search is exact and a large bank logs once that it is.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from stexp._settings import logger

#: Bank rows from which the retrieval family searches approximately (below it, exact blocked search). Chosen
#: by measurement (``benchmarks/cost_curve.py --mode retrieval``, 20,000 queries, k=200, 1,704-d, on the shared
#: 2-core machine): at 100k bank spots the index found the exact neighbours (recall 1.0) but cost 274 s of CPU
#: against 113 s for exact search (its per-cell matrix products are small, and threaded BLAS spends on them);
#: its scan stays about constant in the bank size (``nprobe`` cells of ~√n rows) while exact search grows
#: linearly, so it pays from roughly 250k spots (extrapolated, not measured).
ANN_MIN_BANK = 250_000
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
    """An inverted-file index over a bank's rows: faiss k-means cells, scanned by matrix products (module doc).

    It holds a copy of the bank sorted by cell (``n x D`` float32, like faiss's ``IndexIVFFlat``), the
    centroids and each row's cell.

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
        self._quantizer = self._empty(centroids)
        assign = self._quantizer.search(bank, 1)[1].ravel().astype(np.int64)
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
        """The coarse quantizer: a flat faiss index over the centroids."""
        import faiss

        quantizer = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        quantizer.add(_as_rows(centroids))
        return quantizer

    def _fill(self, bank: np.ndarray, assign: np.ndarray) -> None:
        """Sort the bank rows by cell (a copy): cell ``c`` holds ``rows[offsets[c]:offsets[c + 1]]``."""
        self._assign = np.ascontiguousarray(assign, dtype=np.int64)
        order = np.argsort(self._assign, kind="stable")
        self._order = order
        self._rows = bank[order]
        self._sq = np.einsum("ij,ij->i", self._rows, self._rows) if self.metric == "l2" else None
        self._offsets = np.concatenate([[0], np.cumsum(np.bincount(self._assign, minlength=self.nlist))])

    def _choose_nprobe(self, bank: np.ndarray, k: int) -> int:
        """The smallest power-of-two ``nprobe`` (from 8) whose recall@k on sampled bank rows reaches the target."""
        k = min(int(k), bank.shape[0])
        rng = np.random.default_rng(self.seed + 1)
        q = bank[np.sort(rng.choice(bank.shape[0], min(RECALL_QUERIES, bank.shape[0]), replace=False))]
        exact = _exact(q, bank, k, self.metric)
        nprobe, recall = min(8, self.nlist), 0.0
        while True:
            self.nprobe = nprobe
            found = self.search(q, k)[0]
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
        self._quantizer = self._empty(centroids)
        self._fill(bank, assign)
        self.nprobe = nprobe
        self.info = {"nlist": self.nlist, "metric": self.metric, "n_bank": int(bank.shape[0]), "nprobe": nprobe}
        self.info["load_seconds"] = round(time.perf_counter() - t0, 2)
        return self

    # -- searching -------------------------------------------------------------------------------
    @property
    def n_bank(self) -> int:
        return int(self._rows.shape[0])

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, scores)`` of the ``k`` nearest bank rows of each query row (unordered).

        Scores are inner products (``"ip"``) or squared Euclidean distances (``"l2"``), exact for the rows
        found. A query whose probed cells hold fewer than ``k`` rows gets the rows of its nearest further
        cells (its probe list is widened).
        """
        query = _as_rows(query)
        k = min(int(k), self.n_bank)
        nprobe = min(self.nprobe, self.nlist)
        sizes = np.diff(self._offsets)
        while nprobe < self.nlist and np.sort(sizes)[:nprobe].sum() < k:  # even the smallest cells must hold k
            nprobe = min(2 * nprobe, self.nlist)
        idx = np.empty((query.shape[0], k), dtype=np.int64)
        score = np.empty((query.shape[0], k), dtype=np.float64)
        block = max(64, 16_000_000 // (nprobe * k))  # candidates held per block of queries
        for s in range(0, query.shape[0], block):
            q = query[s : s + block]
            probes = self._quantizer.search(q, nprobe)[1]
            i, sc = self._scan(q, probes, k)
            idx[s : s + block], score[s : s + block] = i, sc
        if self.metric == "l2":  # |q|² - (2 q·x - |x|²)
            score = np.einsum("ij,ij->i", query, query)[:, None].astype(np.float64) - score
        return idx, score

    def _scan(self, q: np.ndarray, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of the probed cells of a block of queries: one matrix product per cell."""
        nq, nprobe = probes.shape
        cand_score = np.full((nq, nprobe * k), -np.inf, dtype=np.float32)
        cand_row = np.zeros((nq, nprobe * k), dtype=np.int64)
        flat = probes.ravel()
        by_cell = np.argsort(flat, kind="stable")
        cells, starts = np.unique(flat[by_cell], return_index=True)
        ends = np.append(starts[1:], flat.size)
        for cell, a, b in zip(cells, starts, ends, strict=True):
            if cell < 0:
                continue
            lo, hi = self._offsets[cell], self._offsets[cell + 1]
            if hi == lo:
                continue
            which = by_cell[a:b]
            qi, slot = np.divmod(which, nprobe)
            sim = q[qi] @ self._rows[lo:hi].T
            if self._sq is not None:
                sim = 2 * sim - self._sq[lo:hi][None, :]
            take = min(k, hi - lo)
            top = np.argpartition(-sim, take - 1, axis=1)[:, :take] if take < hi - lo else np.arange(hi - lo)[None, :]
            top = np.broadcast_to(top, (qi.size, take))
            cols = slot[:, None] * k + np.arange(take)[None, :]
            cand_score[qi[:, None], cols] = np.take_along_axis(sim, top, axis=1)
            cand_row[qi[:, None], cols] = lo + top
        best = np.argpartition(-cand_score, k - 1, axis=1)[:, :k]
        rows = np.take_along_axis(cand_row, best, axis=1)
        return self._order[rows], np.take_along_axis(cand_score, best, axis=1).astype(np.float64)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbours (``exact``, ``(q, k)``) that ``found`` contains."""
    found, exact = np.asarray(found), np.asarray(exact)
    if exact.size == 0:
        return 1.0
    hits = [np.intersect1d(f, e, assume_unique=False).size / e.size for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits))
