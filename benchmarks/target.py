"""Prediction-target benchmark: time and memory of ``stexp.pp.normalize_target`` on a large sparse counts matrix.

Synthetic data (no files): 20,000 spots x 18,000 genes CSR float32 raw counts at ~5% density (values
1..20), and a 785-gene panel (the HER2+ panel's size) drawn at random. Measured, each in the same
process after building the matrix:

- ``time``: wall time of ``stexp.pp.normalize_target(adata)`` (the target, log1p of counts per 10k with
  totals over all genes, of every gene as a sparse layer) and of taking the panel's columns from it as a
  dense float32 matrix (what the models train on), best of ``--repeat``.
- ``peak``: the largest extra memory the calls allocate (``tracemalloc``, which numpy and scipy report
  to), in MiB; the input matrix itself (~140 MiB) is not counted. The sparse layer holds as many values as
  the counts; the panel's dense output (20,000 x 785 float32) is ~60 MiB.
- the same target through scanpy (``sc.pp.normalize_total(target_sum=1e4)`` + ``sc.pp.log1p`` on a copy),
  for reference, and the largest difference between the two on the panel.

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


def _measure(fn, repeat: int):
    """Best wall time of ``fn()`` over ``repeat`` calls, then the peak extra memory (MiB) and result of one more."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    tracemalloc.start()
    out = fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return min(times), peak / 2**20, out


def main() -> None:
    import anndata as ad

    import stexp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=18_000)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--panel", type=int, default=785)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-scanpy", action="store_true", help="skip the scanpy reference")
    args = parser.parse_args()

    stexp.settings.verbosity = 1
    t0 = time.perf_counter()
    X = synthetic_counts(args.spots, args.genes, args.density)
    adata = ad.AnnData(X=X)
    adata.var_names = [f"G{i}" for i in range(args.genes)]
    panel = list(np.random.default_rng(1).choice(adata.var_names, args.panel, replace=False))
    cols = adata.var_names.get_indexer(panel)
    print(
        f"counts: {X.shape[0]:,} spots x {X.shape[1]:,} genes, {X.nnz:,} non-zeros "
        f"({X.nnz / np.prod(X.shape):.1%}), built in {time.perf_counter() - t0:.1f} s; panel {len(panel)} genes"
    )

    def target_layer():
        adata.layers.pop("log1p_cp10k", None)  # each call writes the layer anew
        stexp.pp.normalize_target(adata)
        return adata.layers["log1p_cp10k"]

    t_layer, peak_layer, layer = _measure(target_layer, args.repeat)
    print(
        f"normalize_target (every gene, sparse layer, {layer.nnz:,} values): time {t_layer:.3f} s "
        f"(best of {args.repeat}), peak extra memory {peak_layer:.0f} MiB"
    )
    t_panel, peak_panel, out = _measure(lambda: layer[:, cols].toarray(), args.repeat)
    print(
        f"panel columns as dense float32: time {t_panel:.3f} s (best of {args.repeat}), "
        f"peak extra memory {peak_panel:.0f} MiB"
    )
    print(
        f"output: {out.shape} {out.dtype} ({out.nbytes / 2**20:.0f} MiB), checksum {float(out.sum(dtype=np.float64)):.6e}"
    )
    if args.no_scanpy:
        return
    import scanpy as sc

    def scanpy_target():
        a = ad.AnnData(X=X.copy())
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        return a.X

    t_sc, peak_sc, ref = _measure(scanpy_target, args.repeat)
    diff = float(np.abs(ref[:, cols].toarray() - out).max())
    print(
        f"scanpy normalize_total + log1p (every gene, on a copy of the counts): time {t_sc:.3f} s "
        f"(best of {args.repeat}), peak extra memory {peak_sc:.0f} MiB; largest difference on the panel {diff:.2e}"
    )


if __name__ == "__main__":
    main()
