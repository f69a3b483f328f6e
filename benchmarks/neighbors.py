"""Spatial-neighbour benchmark: the cost of stexp's spatial smoothing of predictions, against squidpy's graph.

stexp searches spatial neighbours with its own per-slide k-d trees rather than squidpy's
``gr.spatial_neighbors``; this measures what that buys through the public API. Synthetic slides (a
jittered square grid at 100 µm pitch, ``--slides`` slides, 1 µm per pixel), image features that carry the
expression, and two ridge models fitted with :func:`stexp.tl.fit` on a small training set: one with spatial
smoothing of σ = ``--sigma-um`` (a Gaussian average over the spots of the same slide within 3σ) and one
without. For each size, best of ``--repeat``:

- ``predict_s`` / ``predict_smoothed_s``: :func:`stexp.tl.predict` of every spot with each model;
  ``smoothing_s`` is the difference (the neighbour search, the weights and the averaging);
- ``squidpy_graph_s``: ``squidpy.gr.spatial_neighbors(coord_type="generic", radius=3σ, library_key=...)``,
  the same neighbour pairs as a graph; ``squidpy_smoothing_s``: that graph plus the Gaussian weights and the
  averaging of the unsmoothed prediction, done here with scipy;
- ``max_abs_diff``: the largest difference between stexp's smoothed prediction and the one averaged over
  squidpy's graph (0 up to float32 rounding: the same neighbours and weights).

Usage::

    python benchmarks/neighbors.py --spots 20000,100000 --slides 4
    python benchmarks/neighbors.py --spots 2000 --repeat 1          # quick check
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np

PITCH_UM = 100.0


def _data(n: int, n_slides: int, n_genes: int, seed: int = 0):
    """``n`` spots on ``n_slides`` slides in stexp's layout: counts, ``obsm["X_feat"]`` and coordinates (1 µm/px)."""
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    rng = np.random.default_rng(seed)
    per = max(1, n // n_slides)
    side = int(np.ceil(np.sqrt(per)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:per] * PITCH_UM
    coords = np.concatenate([grid + rng.normal(0, 5, grid.shape) for _ in range(n_slides)])
    library = np.repeat([f"s{i}" for i in range(n_slides)], per)
    # expression follows a smooth field of the tissue; the image features see that field, with noise
    field = np.sin(coords[:, :1] / 700.0) + np.cos(coords[:, 1:] / 500.0)
    signal = np.hstack([field, rng.normal(0, 1, (len(coords), 4))])
    loadings = rng.normal(0, 0.5, (signal.shape[1], n_genes))
    counts = rng.poisson(np.exp(1.0 + signal @ loadings).clip(max=50.0)).astype(np.float32)
    features = np.hstack([signal, rng.normal(0, 1, (len(coords), 27))]).astype(np.float32)
    adata = ad.AnnData(
        X=sparse.csr_matrix(counts),
        obs=pd.DataFrame({"library_id": pd.Categorical(library)}, index=[f"c{i}" for i in range(len(coords))]),
        var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]),
    )
    adata.obsm["spatial"] = coords
    adata.obsm["X_feat"] = features
    adata.uns["spatial"] = {
        lib: {"scalefactors": {"microns_per_pixel": 1.0, "spot_diameter_fullres": 55.0}} for lib in np.unique(library)
    }
    return adata


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _graph(adata, radius: float):
    """squidpy's radius graph of the spots of each slide: the sparse distances."""
    import logging

    import squidpy as sq

    logging.getLogger("spatialdata._logging").setLevel(logging.WARNING)  # squidpy logs every graph it builds there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sq.gr.spatial_neighbors(adata, coord_type="generic", radius=radius, library_key="library_id", copy=True)[
            1
        ]


def _smooth_over(dist, values: np.ndarray, sigma: float) -> np.ndarray:
    """``values`` averaged over a distance graph with stexp's weights: ``exp(-d² / 2σ²)``, the spot itself 1."""
    import scipy.sparse as sp

    weights = dist.tocsr(copy=True)
    weights.data = np.exp(-(weights.data**2) / (2.0 * sigma * sigma))
    weights = weights + sp.identity(weights.shape[0], format="csr")
    weights = sp.diags(1.0 / np.asarray(weights.sum(axis=1)).ravel()) @ weights
    return weights @ values


def measure(n: int, models: dict, args) -> dict:
    """One size: predict with and without smoothing, and the same smoothing over squidpy's graph."""
    import stexp

    sigma = args.sigma_um
    adata = _data(n, args.slides, args.genes)
    times = {}
    for smooth, model in models.items():
        key = "pred_smoothed" if smooth else "pred"
        times[smooth] = best_of(
            lambda m=model, k=key: stexp.tl.predict(adata, m, key_added=k, device="cpu"), args.repeat
        )
    plain = np.asarray(adata.layers["pred"], dtype=np.float64)
    smoothed = np.asarray(adata.layers["pred_smoothed"], dtype=np.float64)
    t_graph = best_of(lambda: _graph(adata, 3.0 * sigma), args.repeat)
    t_sq = best_of(lambda: _smooth_over(_graph(adata, 3.0 * sigma), plain, sigma), args.repeat)
    return {
        "spots": adata.n_obs,
        "genes": args.genes,
        "sigma_um": sigma,
        "predict_s": round(times[None], 4),
        "predict_smoothed_s": round(times[sigma], 4),
        "smoothing_s": round(times[sigma] - times[None], 4),
        "squidpy_graph_s": round(t_graph, 4),
        "squidpy_smoothing_s": round(t_sq, 4),
        "max_abs_diff": float(np.abs(_smooth_over(_graph(adata, 3.0 * sigma), plain, sigma) - smoothed).max()),
    }


def main() -> None:
    import stexp

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spots", default="20000,100000")
    p.add_argument("--slides", type=int, default=4)
    p.add_argument("--sigma-um", type=float, default=100.0, help="smoothing σ (µm); neighbours within 3σ")
    p.add_argument("--genes", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    stexp.settings.verbosity = 0

    train = _data(2000, 2, args.genes, seed=1)
    models = {
        smooth: stexp.tl.fit(train, model="ridge", features_key="X_feat", smoothing=smooth, calibrate=False)
        for smooth in (None, args.sigma_um)
    }
    # warm-up: the first predict and the first graph pay for imports and compilation, not for neighbours
    for model in models.values():
        stexp.tl.predict(train, model, key_added="warm_up", device="cpu")
    _graph(train, 3.0 * args.sigma_um)
    rows = []
    for n in (int(s) for s in args.spots.split(",")):
        rows.append(measure(n, models, args))
        print(rows[-1], flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
