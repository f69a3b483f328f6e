"""Cost curve of the default pipeline: fit and predict time and peak memory against training-set size.

Synthetic cohorts of 1,704-d image features and 785 genes (slides of 4,000 spots, two slides per patient;
features and expression share a latent tissue state, so retrieval has something to find): the default
pipeline (``stexp.tl.fit(adata, features_key=...)``: kNN k=200, temperature, smoothing σ and calibration
chosen on inner folds) is fitted on 10k, 100k (and, with ``--sizes``, 1M) spots, with exact search
(``search="exact"``) and approximate search (``search="approximate"``, a faiss index), then predicts 20,000
spots of other patients. Each point runs in its own process, so its peak memory (``VmHWM``) is its own.

``--mode retrieval`` measures the retrieval alone (kNN k=200 at a fixed temperature, no smoothing or
calibration): the bank, the index and the search of the 20,000 query spots.

Output: ``benchmarks/results/cost_curve.{json,md}`` (``cost_curve_retrieval.*`` for ``--mode retrieval``) with
the fitted exponent of CPU time in the training size.
Wall times on a shared machine are indicative. Public API only.

Usage::

    nice -n 15 python benchmarks/cost_curve.py                      # 10k and 100k, exact and approximate
    nice -n 15 python benchmarks/cost_curve.py --sizes 10000,100000,1000000
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _memory import AnonymousPeak, peak_rss_mb

N_FEATURES, N_GENES, SLIDE_SPOTS, N_QUERY = 1704, 785, 4000, 20_000
KEY = "X_synthetic"


def cohort(n_spots: int, *, seed: int, first_patient: int = 0, features_path: Path | None = None):
    """A synthetic AnnData of ``n_spots`` spots (slides of SLIDE_SPOTS) with features in ``obsm[KEY]``.

    ``features_path``: the features are written there (a ``.npy`` file, block by block) instead of ``obsm``.
    """
    import anndata as ad
    import pandas as pd
    from scipy import sparse

    shared = np.random.default_rng(12345)  # the "biology": the same for every cohort
    n_latent, n_domains = 16, 8
    domain_centres = shared.normal(0, 1.5, (n_domains, n_latent))
    to_features = shared.normal(0, 1, (n_latent, N_FEATURES)).astype(np.float32) / np.sqrt(n_latent)
    to_genes = shared.normal(0, 0.4, (n_latent, N_GENES)) * (shared.random((n_latent, N_GENES)) < 0.3)
    base = shared.normal(-1.0, 1.0, N_GENES)
    rng = np.random.default_rng(seed)
    n_slides = int(np.ceil(n_spots / SLIDE_SPOTS))
    side = int(np.ceil(np.sqrt(SLIDE_SPOTS)))
    parts, obs, xy, latent_all = [], [], [], []
    for s in range(n_slides):
        m = min(SLIDE_SPOTS, n_spots - s * SLIDE_SPOTS)
        r, c = np.divmod(np.arange(m), side)
        # smooth domains: blocks of ~10 x 10 spots share a domain
        block = (r // 10) * 1000 + (c // 10)
        dom = np.random.default_rng(seed * 7919 + s).integers(0, n_domains, block.max() + 1)[block]
        latent = domain_centres[dom] + rng.normal(0, 0.7, (m, n_latent))
        latent_all.append(latent)
        rate = np.exp(np.clip(base + latent @ to_genes, -10, 4)) * rng.lognormal(0, 0.3, (m, 1))
        parts.append(sparse.csr_matrix(rng.poisson(rate).astype(np.float32)))
        lib = f"s{seed}_{s}"
        obs.append(
            pd.DataFrame(
                {
                    "library_id": lib,
                    "patient": f"p{first_patient + s // 2}",
                    "array_row": r.astype(np.int64),
                    "array_col": c.astype(np.int64),
                },
                index=[f"{lib}_{i}" for i in range(m)],
            )
        )
        xy.append(np.column_stack([c * 100.0, r * 100.0]))
    latent = np.vstack(latent_all)
    if features_path is None:
        features = np.empty((n_spots, N_FEATURES), dtype=np.float32)
    else:
        features = np.lib.format.open_memmap(features_path, mode="w+", dtype=np.float32, shape=(n_spots, N_FEATURES))
    for start in range(0, n_spots, 50_000):  # bounded temporaries
        chunk = latent[start : start + 50_000].astype(np.float32) @ to_features
        features[start : start + 50_000] = chunk + rng.normal(0, 1.0, chunk.shape).astype(np.float32)
    adata = ad.AnnData(
        X=sparse.vstack(parts).tocsr(),
        obs=pd.concat(obs),
        var=pd.DataFrame(index=[f"g{i:03d}" for i in range(N_GENES)]),
    )
    adata.obs["library_id"] = adata.obs["library_id"].astype("category")
    adata.obsm["spatial"] = np.vstack(xy)
    if features_path is None:
        adata.obsm[KEY] = features
    else:
        features.flush()
        del features
    adata.uns["spatial"] = {
        lib: {"images": {}, "scalefactors": {"microns_per_pixel": 1.0, "spot_diameter_fullres": 55.0}}
        for lib in adata.obs["library_id"].cat.categories
    }
    return adata


def make_on_disk(n_spots: int, folder: Path) -> None:
    """Write the training cohort to ``folder``: counts in ``train.h5ad``, features in ``features.npy``."""
    adata = cohort(n_spots, seed=1, features_path=folder / "features.npy")
    adata.write_h5ad(folder / "train.h5ad")


def training_cohort(n_spots: int, storage: str, folder: Path):
    """The training AnnData: in memory, or (``storage="disk"``) backed counts with memory-mapped features.

    On disk, the cohort is generated and written by a child process, so this process's peak memory is the
    fit's own.
    """
    if storage == "memory":
        return cohort(n_spots, seed=1)
    import anndata as ad

    subprocess.run([sys.executable, __file__, "--make", str(n_spots), str(folder)], check=True)
    adata = ad.read_h5ad(folder / "train.h5ad", backed="r")
    adata.obsm[KEY] = np.load(folder / "features.npy", mmap_mode="r")
    return adata


def point(n_spots: int, search: str, mode: str = "pipeline", storage: str = "memory") -> dict:
    """Fit on ``n_spots`` and predict N_QUERY spots; times, peak memory, scores.

    ``mode="pipeline"``: the default pipeline; ``"retrieval"``: its retrieval alone (kNN k=200 at a fixed
    temperature, no smoothing, no calibration: the bank, the index and the search). ``storage="disk"``: the
    training counts and features live on disk (a backed AnnData, a memory-mapped ``.npy``).
    """
    import tempfile

    import stexp

    stexp.settings.verbosity = 1
    with tempfile.TemporaryDirectory(prefix="stexp_cost_") as tmp:
        t0 = time.perf_counter()
        train = training_cohort(n_spots, storage, Path(tmp))
        query = cohort(N_QUERY, seed=2, first_patient=10_000)
        t_data, mem_data = time.perf_counter() - t0, peak_rss_mb()
        options = {} if mode == "pipeline" else {"model": "knn", "k": 200, "temperature": 0.1, "calibrate": False}
        with AnonymousPeak() as anon_fit:
            t0, c0 = time.perf_counter(), time.process_time()
            model = stexp.tl.fit(train, features_key=KEY, search=search, **options)
            t_fit, c_fit, mem_fit = time.perf_counter() - t0, time.process_time() - c0, peak_rss_mb()
        del train
        with AnonymousPeak() as anon:
            t0, c0 = time.perf_counter(), time.process_time()
            stexp.tl.predict(query, model)
            t_predict, c_predict = time.perf_counter() - t0, time.process_time() - c0
    scores = stexp.tl.evaluate(query)
    h = model.history
    return {
        "n_train": n_spots,
        "search": search,
        "mode": mode,
        "storage": storage,
        "peak_anon_mb_fit": round(anon_fit.mb),
        "peak_anon_mb": round(max(anon.mb, anon_fit.mb)),
        "data_seconds": round(t_data, 1),
        "fit_seconds": round(t_fit, 1),
        "predict_seconds": round(t_predict, 1),
        "fit_cpu_seconds": round(c_fit, 1),
        "predict_cpu_seconds": round(c_predict, 1),
        "peak_mb_data": round(mem_data),
        "peak_mb_fit": round(mem_fit),
        "peak_mb": round(peak_rss_mb()),
        "pcc_acg": round(float(scores["pcc_acg"].mean()), 4),
        "temperature": h.get("temperature"),
        "sigma_um": model.smoothing.get("sigma_um") or 0.0,
        "n_queries_temperature": h.get("n_queries"),
        "n_queries_smoothing": model.smoothing.get("n_queries"),
        "n_calibration": None if model.calibration is None else model.calibration.n_calibration,
        "ann": h.get("ann"),
        "commit": _commit(),
    }


def _commit() -> str | None:
    """The checkout's commit (the code a point measured), or None outside a git checkout."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).parent)  # fmt: skip
    return proc.stdout.strip() or None


def exponent(rows: list[dict], key: str) -> float | None:
    """Slope of log(key) against log(n_train) between the smallest and largest size."""
    rows = sorted(rows, key=lambda r: r["n_train"])
    if len(rows) < 2 or rows[0][key] <= 0:
        return None
    return round(float(np.log(rows[-1][key] / rows[0][key]) / np.log(rows[-1]["n_train"] / rows[0]["n_train"])), 2)


def report(runs: list[dict], command: str) -> str:
    what = "retrieval alone" if runs and runs[0].get("mode") == "retrieval" else "the default pipeline"
    lines = [
        f"# Cost curve of {what} (synthetic 1,704-d features, 785 genes)",
        "",
        f"`{command}` on {platform.node()} ({platform.processor() or platform.machine()}, "
        "2 cores; CPU seconds count all threads of the process; each row names the commit it ran at). Fit = `stexp.tl.fit(adata, features_key=...)`"
        " (temperature, σ and calibration on inner folds, each scoring at most 20,000 held-out spots); predict = "
        f"`stexp.tl.predict` of {N_QUERY:,} spots of other patients. Peak memory: the process's VmHWM (which "
        "counts the pages of memory-mapped features it read) and, where measured, its peak anonymous memory "
        "(RssAnon sampled every 50 ms: its own arrays). Storage: training counts and features in memory, or on "
        "disk (backed AnnData, memory-mapped features).",
        "",
        "| training spots | storage | search | fit CPU s | fit wall s | predict CPU s | predict wall s "
        "| peak MB (fit) | peak MB | peak anonymous MB | PCC(ACG) | temperature | σ µm "
        "| inner queries (T / σ / cal.) | index | commit |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["n_train"], r.get("storage", "memory"), r["search"])):
        ann = r.get("ann") or {}
        idx = f"nlist {ann['nlist']}, nprobe {ann['nprobe']}, recall@200 {ann['recall_at_k']}" if ann else "exact"
        lines.append(
            f"| {r['n_train']:,} | {r.get('storage', 'memory')} | {r['search']} | {r['fit_cpu_seconds']} "
            f"| {r['fit_seconds']} | {r['predict_cpu_seconds']} | {r['predict_seconds']} | {r['peak_mb_fit']} "
            f"| {r['peak_mb']} | {r.get('peak_anon_mb', '')} | {r['pcc_acg']} | {r['temperature']} | {r['sigma_um']:.0f} "
            f"| {r['n_queries_temperature']} / {r['n_queries_smoothing']} / {r['n_calibration']} | {idx} "
            f"| {r.get('commit') or ''} |"
        )
    lines += ["", "Exponent of CPU time in the training size (log-log slope, smallest to largest size):", ""]
    for search in sorted({r["search"] for r in runs}):
        rows = [r for r in runs if r["search"] == search]
        lines.append(
            f"- {search}: fit {exponent(rows, 'fit_cpu_seconds')}, predict {exponent(rows, 'predict_cpu_seconds')}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--searches", default="exact,approximate")
    parser.add_argument("--mode", default="pipeline", choices=["pipeline", "retrieval"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--storage", default="memory", choices=["memory", "disk"], help="training data in memory or on disk"
    )
    parser.add_argument("--point", nargs=3, metavar=("N", "SEARCH", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=2, metavar=("N", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make:
        make_on_disk(int(args.make[0]), Path(args.make[1]))
        return
    if args.point:
        row = point(int(args.point[0]), args.point[1], args.point[2], args.storage)
        print("RESULT " + json.dumps(row), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.mode == "pipeline" else "_retrieval"
    # points of earlier invocations are kept (merged by size and search); a point run again replaces its row
    previous = out / f"cost_curve{suffix}.json"
    runs = json.loads(previous.read_text())["runs"] if previous.exists() else []
    for n in (int(s) for s in args.sizes.split(",")):
        for search in args.searches.split(","):
            proc = subprocess.run(
                [sys.executable, __file__, "--point", str(n), search, args.mode, "--storage", args.storage],
                capture_output=True,
                text=True,
                check=False,
            )
            result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not result:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"the point n={n} search={search} failed (exit {proc.returncode})")
            point_row = json.loads(result[-1][len("RESULT ") :])
            same = (n, search, args.storage)
            runs = [r for r in runs if (r["n_train"], r["search"], r.get("storage", "memory")) != same] + [point_row]
            print(point_row, flush=True)
            (out / f"cost_curve{suffix}.json").write_text(json.dumps({"runs": runs}, indent=1))
    command = "python benchmarks/cost_curve.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / f"cost_curve{suffix}.md").write_text(report(runs, command.strip()))
    print(report(runs, command.strip()))


if __name__ == "__main__":
    main()
