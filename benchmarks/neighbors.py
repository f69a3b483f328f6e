"""Spatial-neighbour benchmark: stexp's per-slide k-d tree helper against squidpy's ``gr.spatial_neighbors``.

Both find the ``k`` nearest spots of every spot within its own slide (squidpy: ``coord_type="generic"``,
``library_key``). Reports seconds (best of 3) for a few sizes and whether the neighbour sets agree.

Usage::

    python benchmarks/neighbors.py --spots 20000,100000 --slides 4
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np


def _data(n: int, n_slides: int, seed: int = 0):
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    per = n // n_slides
    side = int(np.ceil(np.sqrt(per)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:per] * 100.0
    coords = np.concatenate([grid + rng.normal(0, 5, grid.shape) for _ in range(n_slides)])
    library = np.repeat([f"s{i}" for i in range(n_slides)], per)
    adata = ad.AnnData(
        X=np.zeros((len(coords), 1), np.float32), obs=pd.DataFrame({"library_id": pd.Categorical(library)})
    )
    adata.obs_names = [f"c{i}" for i in range(len(coords))]
    adata.obsm["spatial"] = coords
    return adata, coords, library


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    import squidpy as sq

    from stexp.models._neighbors import spatial_neighbors

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spots", default="20000,100000")
    p.add_argument("--slides", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    args = p.parse_args()
    rows = []
    for n in (int(s) for s in args.spots.split(",")):
        adata, coords, library = _data(n, args.slides)
        t_stexp = best_of(lambda c=coords, lib=library: spatial_neighbors(c, lib, k=args.k))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_sq = best_of(
                lambda a=adata: sq.gr.spatial_neighbors(
                    a, coord_type="generic", n_neighs=args.k, library_key="library_id", copy=True
                )
            )
            conn, _ = sq.gr.spatial_neighbors(
                adata, coord_type="generic", n_neighs=args.k, library_key="library_id", copy=True
            )
        index, mask = spatial_neighbors(coords, library, k=args.k)
        conn = conn.tocsr()
        agree = np.mean(
            [set(conn.indices[conn.indptr[i] : conn.indptr[i + 1]]) == set(index[i][mask[i]]) for i in range(n)]
        )
        rows.append(
            {"spots": n, "stexp_s": round(t_stexp, 4), "squidpy_s": round(t_sq, 4), "same_neighbours": float(agree)}
        )
        print(rows[-1], flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
