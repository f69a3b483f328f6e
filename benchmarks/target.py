"""Prediction-target benchmark: time and memory of ``expression_target`` on a large sparse counts matrix.

Synthetic data (no files): 20,000 spots x 18,000 genes CSR float32 raw counts at ~5% density (values
1..20), and a 785-gene panel (the HER2+ panel's size) drawn at random. Measured, each in the same
process after building the matrix:

- ``time``: wall time of ``expression_target(adata, panel)`` (best of ``--repeat``).
- ``peak``: the largest extra memory the call allocates (``tracemalloc``, which numpy and scipy report
  to), in MiB; the input matrix itself (~140 MiB) is not counted. The output (20,000 x 785 float32) is
  ~60 MiB.

Usage::

    python benchmarks/target.py                  # the default sizes (~1 min, ~1.5 GB)
    python benchmarks/target.py --spots 2000     # smaller
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np


def synthetic_counts(n_spots: int, n_genes: int, density: float, seed: int = 0):
    from scipy import sparse

    rng = np.random.default_rng(seed)
    per_row = int(round(density * n_genes))
    indices = rng.integers(0, n_genes, n_spots * per_row, dtype=np.int32)
    data = rng.integers(1, 21, n_spots * per_row).astype(np.float32)
    indptr = np.arange(0, n_spots * per_row + 1, per_row, dtype=np.int64)
    X = sparse.csr_matrix((data, indices, indptr), shape=(n_spots, n_genes))
    X.sum_duplicates()  # sorted, unique column indices per row (duplicates add up: still integer counts)
    return X


def main() -> None:
    import anndata as ad

    from stexp.pp._target import expression_target

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=18_000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--panel", type=int, default=785)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    t0 = time.perf_counter()
    X = synthetic_counts(args.spots, args.genes, args.density)
    adata = ad.AnnData(X=X)
    adata.var_names = [f"G{i}" for i in range(args.genes)]
    panel = list(np.random.default_rng(1).choice(adata.var_names, args.panel, replace=False))
    print(
        f"counts: {X.shape[0]:,} spots x {X.shape[1]:,} genes, {X.nnz:,} non-zeros "
        f"({X.nnz / np.prod(X.shape):.1%}), built in {time.perf_counter() - t0:.1f} s; panel {len(panel)} genes"
    )
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = expression_target(adata, panel)
        times.append(time.perf_counter() - t0)
        del out
    tracemalloc.start()
    out = expression_target(adata, panel)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        f"expression_target(panel): time {min(times):.3f} s (best of {args.repeat}), peak extra memory {peak / 2**20:.0f} MiB"
    )
    print(
        f"output: {out.shape} {out.dtype} ({out.nbytes / 2**20:.0f} MiB), checksum {float(out.sum(dtype=np.float64)):.6e}"
    )


if __name__ == "__main__":
    main()
