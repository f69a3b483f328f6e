"""Spatial neighbourhoods of spots: the one implementation stexp uses.

k nearest spots and spot pairs within a radius, searched within each slide, and a hypergraph over each
neighbourhood.

Used by NH2ST (the neighbour branch), the smoothing of predictions and the spatial domains; plain numpy /
scipy, no torch. Kept instead of squidpy's ``gr.spatial_neighbors`` because it was measured faster for the
same neighbours: 0.34 s vs 0.69 s for 100,000 spots on 4 slides, k=8, identical neighbour sets
(``benchmarks/neighbors.py`` of commit 4910347; the benchmark now measures the smoothing of predictions through
``stexp.tl.predict`` against the same average over squidpy's graph), and it works on the arrays of
:class:`~stexp.models.SpotData`.
"""

from __future__ import annotations

import numpy as np


def _per_slide(library: np.ndarray) -> list[np.ndarray]:
    """Row indices of the spots of each slide."""
    _, codes = np.unique(np.asarray(library).astype(str), return_inverse=True)
    return [np.flatnonzero(codes == code) for code in np.unique(codes)]


def spot_pitch(coords_um: np.ndarray, library: np.ndarray) -> float:
    """Median distance (µm) from a spot to its nearest spot of the same slide (``nan`` with no pair)."""
    from scipy.spatial import cKDTree

    coords = np.asarray(coords_um, dtype=np.float64)
    dists = [cKDTree(coords[rows]).query(coords[rows], k=2)[0][:, 1] for rows in _per_slide(library) if rows.size > 1]
    d = np.concatenate(dists) if dists else np.zeros(0)
    d = d[d > 0]
    return float(np.median(d)) if d.size else float("nan")


def radius_pairs(coords_um: np.ndarray, library: np.ndarray, radius_um: float) -> np.ndarray:
    """``(m, 2)`` row-index pairs ``i < j`` of spots of the same slide at most ``radius_um`` apart."""
    from scipy.spatial import cKDTree

    coords = np.asarray(coords_um, dtype=np.float64)
    out = [np.zeros((0, 2), dtype=np.int64)]
    for rows in _per_slide(library):
        pairs = cKDTree(coords[rows]).query_pairs(float(radius_um), output_type="ndarray")
        out.append(rows[pairs].astype(np.int64))
    return np.concatenate(out)


def spatial_neighbors(coords_um: np.ndarray, library: np.ndarray, *, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest spots of every spot, searched within its own slide.

    Distances are Euclidean between spot centres in µm (:attr:`SpotData.coords_um`); a spot is never
    its own neighbour (also when another spot has the same centre), and spots of other slides are
    never neighbours. Spots at the edge of the tissue simply get their nearest spots, however far.

    Parameters
    ----------
    coords_um
        Spot centres ``(n_spots, 2)`` in µm.
    library
        Slide of each spot ``(n_spots,)``.
    k
        Number of neighbours per spot (the neighbourhood is the spot and its ``k`` neighbours).

    Returns
    -------
    index
        ``(n_spots, k)`` int64 row indices of the neighbours, nearest first. In a slide with fewer
        than ``k + 1`` spots, every other spot of the slide is a neighbour and the remaining columns
        are padding that hold the spot's own index (a one-spot slide has only padding).
    mask
        ``(n_spots, k)`` bool, ``True`` for real neighbours and ``False`` for padding.

    Raises
    ------
    ValueError
        If the coordinates are not ``(n_spots, 2)`` finite numbers, ``library`` has another length,
        or ``k`` is negative.
    """
    from scipy.spatial import cKDTree

    coords = np.asarray(coords_um, dtype=np.float64)
    library = np.asarray(library)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords_um must have shape (n_spots, 2), got {coords.shape}.")
    n = coords.shape[0]
    if library.shape != (n,):
        raise ValueError(f"library has shape {library.shape}, expected ({n},) (one slide id per spot).")
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise ValueError(
            f"coords_um has NaN/inf for {int(bad.sum())} of {n} spots (e.g. rows {np.flatnonzero(bad)[:5].tolist()})."
        )
    if int(k) != k or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}.")
    k = int(k)

    index = np.repeat(np.arange(n, dtype=np.int64)[:, None], k, axis=1)  # padding: the spot itself
    mask = np.zeros((n, k), dtype=bool)
    if k == 0 or n == 0:
        return index, mask
    for rows in _per_slide(library):
        kk = min(k, rows.size - 1)
        if kk == 0:
            continue
        _, j = cKDTree(coords[rows]).query(coords[rows], k=kk + 1)
        j = j.reshape(rows.size, kk + 1)
        drop = j == np.arange(rows.size)[:, None]
        # With more than kk + 1 spots at one centre the spot itself may be missing from the
        # results: then drop the farthest candidate instead.
        drop[~drop.any(axis=1), -1] = True
        index[rows, :kk] = rows[j[~drop].reshape(rows.size, kk)]
        mask[rows, :kk] = True
    return index, mask


def neighborhoods(coords_um: np.ndarray, library: np.ndarray, *, k: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Every spot's neighbourhood: the spot itself first, then its ``k`` nearest spots of the same slide.

    Returns
    -------
    nodes
        ``(n_spots, k + 1)`` int64 row indices; column 0 is the spot itself.
    node_mask
        ``(n_spots, k + 1)`` bool; column 0 is always ``True``, padding is ``False``
        (see :func:`spatial_neighbors`).
    """
    index, mask = spatial_neighbors(coords_um, library, k=k)
    n = index.shape[0]
    nodes = np.concatenate([np.arange(n, dtype=np.int64)[:, None], index], axis=1)
    node_mask = np.concatenate([np.ones((n, 1), dtype=bool), mask], axis=1)
    return nodes, node_mask


def knn_hypergraph(coords_um: np.ndarray, nodes: np.ndarray, node_mask: np.ndarray, *, k: int = 3) -> np.ndarray:
    """Incidence matrices of a k-NN hypergraph over the spots of each neighbourhood.

    Each real node ``e`` of a neighbourhood spans one hyperedge: ``e`` and its ``k`` nearest real
    nodes of that neighbourhood (in µm; all of them when fewer). Padding nodes belong to no
    hyperedge and span an empty one.

    Parameters
    ----------
    coords_um
        Spot centres ``(n_spots, 2)`` in µm.
    nodes, node_mask
        Neighbourhoods from :func:`neighborhoods`, ``(n, m)``.
    k
        Neighbours per hyperedge besides its centre.

    Returns
    -------
    ``(n, m, m)`` float32 incidence ``H[s, v, e] = 1`` when node ``v`` belongs to hyperedge ``e`` of
    neighbourhood ``s``.
    """
    coords = np.asarray(coords_um, dtype=np.float64)
    nodes = np.asarray(nodes)
    node_mask = np.asarray(node_mask, dtype=bool)
    if nodes.shape != node_mask.shape or nodes.ndim != 2:
        raise ValueError(f"nodes {nodes.shape} and node_mask {node_mask.shape} must be the same (n, m) shape.")
    pts = coords[nodes]  # (n, m, 2)
    dist = np.linalg.norm(pts[:, :, None, :] - pts[:, None, :, :], axis=-1)  # (n, centre, member)
    return hypergraph_from_distances(dist, node_mask, k=k)


def hypergraph_from_distances(dist: np.ndarray, node_mask: np.ndarray, *, k: int = 3) -> np.ndarray:
    """:func:`knn_hypergraph` from any within-neighbourhood distances ``(n, m, m)`` (e.g. 1 - cosine of image features).

    Each real node spans one hyperedge: itself and its ``k`` nearest real nodes by ``dist`` (a copy is modified).
    """
    node_mask = np.asarray(node_mask, dtype=bool)
    dist = np.array(dist, dtype=np.float64)
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k!r}.")
    n, m = node_mask.shape
    if dist.shape != (n, m, m):
        raise ValueError(f"dist has shape {dist.shape}, expected {(n, m, m)} for node_mask {node_mask.shape}.")
    dist[:, np.arange(m), np.arange(m)] = -np.inf  # the centre always comes first
    dist[~node_mask[:, None, :].repeat(m, axis=1)] = np.inf  # padding is never a member
    order = np.argsort(dist, axis=-1, kind="stable")[:, :, : min(k, m - 1) + 1]
    member_ok = np.take_along_axis(node_mask[:, None, :].repeat(m, axis=1), order, axis=-1)
    member_ok &= node_mask[:, :, None]  # padding centres span no hyperedge
    incidence = np.zeros((n, m, m), dtype=np.float32)  # (n, centre e, member v)
    np.put_along_axis(incidence, order, member_ok.astype(np.float32), axis=-1)
    return np.ascontiguousarray(incidence.transpose(0, 2, 1))  # (n, v, e)
