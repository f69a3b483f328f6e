"""Approximate nearest-neighbour search (faiss IVF) for banks where exact search stops being cheap.

Exact blocked search (:mod:`stexp.models._retrieval`) costs queries x bank x dimensions; above
:data:`ANN_MIN_BANK` bank rows the retrieval family (kNN, ``mclstexp_plus``, the temperature choice, the
calibration's and the shift score's neighbour distances) searches an inverted-file index instead:

- the bank is split into ``nlist ≈ √n`` cells by k-means (faiss, seeded, on a fixed-size sample of the bank);
- a query scans the ``nprobe`` cells nearest to it; ``nprobe`` is chosen at build time by raising it (8, 12,
  16, 24, 32, 48, ...: half-steps between powers of two) until the recall@k against exact search, measured on
  a seeded sample of bank rows, reaches :data:`TARGET_RECALL` (recorded in :attr:`AnnIndex.info`);
- the index keeps each cell's list of bank rows and searches the bank itself (no copy of it: at a million
  1,704-d rows a copy would be 6.8 GB), so the similarities (distances) returned are exact for the neighbours
  found: only *which* neighbours are found is approximate;
- a search may exclude bank rows (``exclude=``: the rows of held-out slides when a choice is made on inner
  folds of the bank itself, :mod:`stexp.models._retrieval`). Its ``nprobe`` is chosen for that exclusion
  the first time it is seen, on a sample of the search's own queries, as at build time: a query's nearest
  cells may hold mostly its own (excluded) slide.

faiss gives the k-means and the coarse quantizer (which cells a query probes). The cells are scanned here,
a block of queries at a time, as one matrix product per cell: faiss's ``IndexIVFFlat`` scans each query on
its own, which measured (one thread, 2,000 queries, a 50k bank of 1,704-d rows) 5.0 s of CPU for 7% of the
bank against 4.9 s for exact search of all of it; the per-cell products took 1.9 s.

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
#: by measurement (``benchmarks/cost_curve.py --mode retrieval``, 20,000 queries, k=200, 1,704-d, 2 cores):
#: 30k bank spots 11.6 s approximate vs 26.7 s exact, 100k 18.5 s vs 99.5 s, the same PCC(ACG) to four
#: decimals (recall@200 0.978 and 0.996). Below ~10k spots exact search costs a few seconds and needs no index.
ANN_MIN_BANK = 50_000
#: Recall@k against exact search that the build-time choice of ``nprobe`` must reach.
TARGET_RECALL = 0.97
#: Bank rows used as queries to measure the recall at build time.
RECALL_QUERIES = 256
#: k-means training rows per cell (a fixed-size sample of the bank: the build stays linear in the bank).
TRAIN_PER_CELL = 32
METRICS = ("ip", "l2")
#: Bytes of the running top-k buffers of one block of queries (a cell's rows are gathered once per block).
BUFFER_BYTES = 2**28
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


def _exact(query: np.ndarray, bank: np.ndarray, k: int, metric: str, exclude: np.ndarray | None = None) -> np.ndarray:
    """Exact top-``k`` bank rows of each query row (unordered), blocked; never a row of ``exclude`` (a mask)."""
    out = np.empty((query.shape[0], k), dtype=np.int64)
    b2 = None if metric == "ip" else np.einsum("ij,ij->i", bank, bank)
    excluded = None if exclude is None else np.flatnonzero(exclude)
    block = max(1, 2**26 // max(1, bank.shape[0]))  # query rows per block: a 256 MB score matrix at most
    for s in range(0, query.shape[0], block):
        score = query[s : s + block] @ bank.T
        if b2 is not None:
            score = 2 * score - b2[None, :]  # -(|b|² - 2 q·b): larger is nearer
        if excluded is not None:
            score[:, excluded] = -np.inf
        out[s : s + block] = np.argpartition(-score, k - 1, axis=1)[:, :k]
    return out


def _next_nprobe(nprobe: int) -> int:
    """The next ``nprobe`` to try: 8, 12, 16, 24, 32, 48, ... (each power of two and the half-step after it).

    Doubling overshot: a bank whose exclusions needed a recall between ``nprobe`` 32 and 64 scanned at 64.
    """
    power = 1 << (max(1, int(nprobe)).bit_length() - 1)
    return power * 3 // 2 if nprobe == power and power >= 2 else 2 * power


def _mask_key(exclude: np.ndarray, k: int) -> str:
    """A short key of an exclusion mask and ``k`` (the ``nprobe`` chosen for them is remembered under it)."""
    import hashlib

    return f"{k}:" + hashlib.blake2b(np.packbits(exclude).tobytes(), digest_size=16).hexdigest()


class AnnIndex:
    """An inverted-file index over a bank's rows: faiss k-means cells, scanned by matrix products (module doc).

    It holds the centroids, each row's cell and the rows of each cell, and searches ``bank`` itself (a
    reference, not a copy: the bank must not change while the index is used).

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
        """Each cell's rows: cell ``c`` holds bank rows ``order[offsets[c]:offsets[c + 1]]`` (the bank is not copied)."""
        self._assign = np.ascontiguousarray(assign, dtype=np.int64)
        self._order = np.argsort(self._assign, kind="stable")
        self._bank = bank
        self._sq = np.einsum("ij,ij->i", bank, bank)[self._order] if self.metric == "l2" else None
        self._offsets = np.concatenate([[0], np.cumsum(np.bincount(self._assign, minlength=self.nlist))])
        self._nprobe_excluding: dict[str, int] = {}

    def _choose_nprobe(self, bank: np.ndarray, k: int) -> int:
        """The smallest ``nprobe`` (from 8, up :func:`_next_nprobe`) whose recall@k on sampled bank rows reaches the target."""
        k = min(int(k), bank.shape[0])
        rng = np.random.default_rng(self.seed + 1)
        q = bank[np.sort(rng.choice(bank.shape[0], min(RECALL_QUERIES, bank.shape[0]), replace=False))]
        nprobe, recall = self._enough_probes(q, k, None, min(8, self.nlist))
        self.info.update({"nprobe": int(nprobe), "recall_at_k": round(float(recall), 4), "recall_k": k})
        return int(nprobe)

    def _enough_probes(self, q: np.ndarray, k: int, exclude: np.ndarray | None, start: int) -> tuple[int, float]:
        """The smallest ``nprobe`` (from ``start``, up :func:`_next_nprobe`) whose recall@k on ``q`` reaches the target."""
        exact = _exact(q, self._bank, k, self.metric, exclude)
        nprobe = start
        while True:
            recall = recall_at_k(self._search(q, k, nprobe, exclude)[0], exact)
            if recall >= TARGET_RECALL or nprobe >= self.nlist:
                return nprobe, recall
            nprobe = min(_next_nprobe(nprobe), self.nlist)

    def _nprobe_for(self, query: np.ndarray, k: int, exclude: np.ndarray) -> int:
        """``nprobe`` for searches that exclude the rows of ``exclude``, chosen on a sample of ``query`` once."""
        key = _mask_key(exclude, k)
        if key not in self._nprobe_excluding:
            rng = np.random.default_rng(self.seed + 2)
            q = query[np.sort(rng.choice(query.shape[0], min(RECALL_QUERIES, query.shape[0]), replace=False))]
            nprobe, recall = self._enough_probes(q, k, exclude, self.nprobe)
            self._nprobe_excluding[key] = nprobe
            self.info.setdefault("nprobe_excluding", []).append(
                {"excluded": int(exclude.sum()), "nprobe": int(nprobe), "recall_at_k": round(float(recall), 4)}
            )
        return self._nprobe_excluding[key]

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
        return int(self._order.size)

    def search(self, query: np.ndarray, k: int, *, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(indices, scores)`` of the ``k`` nearest bank rows of each query row (unordered).

        Scores are inner products (``"ip"``) or squared Euclidean distances (``"l2"``), exact for the rows
        found. A query whose probed cells hold fewer than ``k`` rows (not excluded) gets the rows of its nearest
        further cells (its probe list alone is widened: k-means leaves some cells nearly empty, and widening
        every query's probes for them cost a million-spot bank 32x the scan). ``exclude``: a boolean mask of bank rows never returned (``k`` is
        then at most the rows left); ``nprobe`` is chosen for that mask (module docstring).
        """
        query = _as_rows(query)
        if exclude is None:
            return self._search(query, k, self.nprobe, None)
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != (self.n_bank,):
            raise ValueError(f"exclude must be a mask of the {self.n_bank} bank rows, got shape {exclude.shape}.")
        k = min(int(k), int(self.n_bank - exclude.sum()))
        if k < 1:
            raise ValueError("every bank row is excluded: nothing to search.")
        nprobe = self._nprobe_for(query, k, exclude) if query.shape[0] else self.nprobe
        return self._search(query, k, nprobe, exclude)

    def _search(
        self, query: np.ndarray, k: int, nprobe: int, exclude: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        k = min(int(k), self.n_bank)
        nprobe = min(nprobe, self.nlist)
        excluded = None if exclude is None else exclude[self._order]  # the mask in cell order
        idx = np.empty((query.shape[0], k), dtype=np.int64)
        score = np.empty((query.shape[0], k), dtype=np.float64)
        block = max(64, BUFFER_BYTES // (_RunningTopK.BYTES_PER_SLOT * 3 * k))  # queries whose top-k buffers fit
        for s in range(0, query.shape[0], block):
            q = query[s : s + block]
            probes = self._quantizer.search(q, nprobe)[1]
            i, sc = self._scan(q, probes, k, excluded)
            short = np.flatnonzero(~np.isfinite(sc).all(axis=1))  # probed cells held fewer than k rows not excluded
            wider = nprobe
            while short.size and wider < self.nlist:
                wider = min(2 * wider, self.nlist)
                probes = self._quantizer.search(q[short], wider)[1]
                i[short], sc[short] = self._scan(q[short], probes, k, excluded)
                short = short[~np.isfinite(sc[short]).all(axis=1)]
            idx[s : s + block], score[s : s + block] = i, sc
        if self.metric == "l2":  # |q|² - (2 q·x - |x|²)
            score = np.einsum("ij,ij->i", query, query)[:, None].astype(np.float64) - score
        return idx, score

    def _scan(
        self, q: np.ndarray, probes: np.ndarray, k: int, excluded: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of the probed cells of a block of queries: one matrix product per cell.

        Each query's nearest probed cell is scanned first (column 0 of ``probes``): its best rows set the
        query's threshold, so that the other cells add to its running top-``k`` only the few rows above it
        (:class:`_RunningTopK`). ``excluded``: the exclusion mask in cell order (rows skipped), or ``None``.
        """
        best = _RunningTopK(q.shape[0], k)
        for part in (probes[:, :1], probes[:, 1:]):
            for qi, positions in self._probed_cells(part, excluded):
                sim = q[qi] @ self._bank[self._order[positions]].T
                if self._sq is not None:
                    sim = 2 * sim - self._sq[positions][None, :]
                best.add(qi, positions, sim)
        positions, score = best.result()
        return self._order[positions], score.astype(np.float64)

    def _probed_cells(self, probes: np.ndarray, excluded: np.ndarray | None):
        """Yield ``(queries, positions)``: for each probed cell, the queries probing it and its rows (cell order)."""
        flat = probes.ravel()
        by_cell = np.argsort(flat, kind="stable")
        cells, starts = np.unique(flat[by_cell], return_index=True)
        ends = np.append(starts[1:], flat.size)
        for cell, a, b in zip(cells, starts, ends, strict=True):
            if cell < 0:
                continue
            positions = np.arange(self._offsets[cell], self._offsets[cell + 1])
            if excluded is not None:
                positions = positions[~excluded[positions]]
            if positions.size:
                yield by_cell[a:b] // probes.shape[1], positions


class _RunningTopK:
    """Each query's best ``k`` (score, position) pairs so far, kept in a buffer of ``3k`` cut back when full.

    A query's threshold is the ``k``-th best score it has kept at the last cut (``-inf`` before it has ``k``):
    rows at or below it can never enter its top-``k``, so a cell adds only the rows above it.
    """

    BYTES_PER_SLOT = 12  # float32 score and int64 position

    def __init__(self, n: int, k: int) -> None:
        self.k, self.capacity = int(k), 3 * int(k)
        self.score = np.full((n, self.capacity), -np.inf, dtype=np.float32)
        self.position = np.zeros((n, self.capacity), dtype=np.int64)
        self.fill = np.zeros(n, dtype=np.int64)
        self.threshold = np.full(n, -np.inf, dtype=np.float32)

    def _cut(self, rows: np.ndarray) -> None:
        """Keep the top-``k`` of ``rows``' buffers (in their first ``k`` slots) and raise their thresholds."""
        k = self.k
        score = self.score[rows]
        keep = np.argpartition(-score, k - 1, axis=1)[:, :k]
        kept = np.take_along_axis(score, keep, axis=1)
        self.position[rows, :k] = np.take_along_axis(self.position[rows], keep, axis=1)
        self.score[rows, k:] = -np.inf
        self.score[rows, :k] = kept
        self.fill[rows] = np.minimum(self.fill[rows], k)
        self.threshold[rows] = kept.min(axis=1)  # -inf while fewer than k rows were seen

    def add(self, queries: np.ndarray, positions: np.ndarray, sim: np.ndarray) -> None:
        """Offer the rows ``positions`` with similarities ``sim`` (``(queries, positions)``) to distinct ``queries``."""
        hit = sim > self.threshold[queries, None]
        count = hit.sum(axis=1)
        full = self.fill[queries] + count > self.capacity
        if full.any():
            self._cut(queries[full])
            hit[full] = sim[full] > self.threshold[queries[full], None]
            count[full] = hit[full].sum(axis=1)
            many = np.flatnonzero(self.fill[queries] + count > self.capacity)
            if many.size:  # still more than fit (a large cell): offer only the cell's own top-k of these rows
                top = np.argpartition(-sim[many], self.k - 1, axis=1)[:, : self.k]
                mask = np.zeros((many.size, sim.shape[1]), dtype=bool)
                np.put_along_axis(mask, top, True, axis=1)
                hit[many] = mask
                count[many] = self.k
        r, c = np.nonzero(hit)
        if r.size == 0:
            return
        slot = self.fill[queries][r] + np.arange(r.size) - (np.cumsum(count) - count)[r]
        self.score[queries[r], slot] = sim[r, c]
        self.position[queries[r], slot] = positions[c]
        self.fill[queries] += count

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(positions, scores)`` of each query's top-``k`` (unordered; score ``-inf`` where fewer were seen)."""
        self._cut(np.arange(self.fill.size))
        return self.position[:, : self.k], self.score[:, : self.k]


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each row's exact neighbours (``exact``, ``(q, k)``) that ``found`` contains."""
    found, exact = np.asarray(found), np.asarray(exact)
    if exact.size == 0:
        return 1.0
    hits = [np.intersect1d(f, e, assume_unique=False).size / e.size for f, e in zip(found, exact, strict=True)]
    return float(np.mean(hits))
