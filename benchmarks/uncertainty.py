"""HER2+ uncertainty benchmark: calibrated intervals and per-gene expected PCC, leave-one-patient-out.

Same data, features, panel and folds as ``benchmarks/her2st.py`` (its ``prepare`` is reused): the six
HER2+ image sections (patients B and C), EfficientNet-Lite0 frozen features, the 785-gene panel. For every
model and every difficulty score of :data:`stexp.models.CALIBRATION_SCORES`, one
``stexp.tl.cross_validate(model=stexp.models.Recipe(<model>, ..., calibrate=True, calibration_score=score),
coverage=0.9)`` call: each outer fold (train on one patient, predict the other) fits the model on the
training patient and calibrates it on the training slides only (inner refits leaving out one training
slide, or spatial blocks of the single slide of patient B), and its 90 % intervals are scored on the
held-out patient's slides. Everything goes through the public API, so each score costs its own fit and
inner refits (the scores no longer share one set of inner refits). The quantile mode is the calibration's
own (``group_max``); the ``pooled`` mode and the inner models' disagreement (an ensemble diagnostic) are
not reachable through the public API and are no longer measured.

Columns (per test slide, then averaged), as ``cross_validate`` / ``stexp.tl.evaluate`` report them:
``coverage`` (share of measured values inside the interval), ``interval_width`` (mean, log1p CP10k),
``unc_spot_spearman`` (Spearman across spots of mean width vs mean absolute error),
``expected_pcc_spearman`` (Spearman across genes of expected vs realised PCC). Computed here from public
outputs (the kept fold models' expected PCC, ``adata.uns["stexp"]["evaluate"][key]["pcc"]``,
``stexp.tl.get_prediction``): ``expected_pcc_spearman_fold`` (against the realised PCC averaged over the
fold's test slides), ``realised_retest_spearman`` (the ceiling: one test slide's realised per-gene PCC
against another's) and ``depth_error_spearman`` (measured depth vs error across spots, a diagnostic).

Usage::

    STEXP_DATA_DIR=../shared/data python benchmarks/uncertainty.py                # every model
    python benchmarks/uncertainty.py --models ridge,knn --input prepared.h5ad       # reuse a prepared h5ad
    python benchmarks/uncertainty.py --models mean --scores none,depth --input prepared.h5ad   # quick check

Writes ``benchmarks/results/uncertainty.json`` and ``uncertainty.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
import her2st  # (data loading and settings shared with the main benchmark)

COVERAGE = 0.9
MODELS = ("pipeline", "mclstexp", "ridge", "knn", "mean", "mlp", "nh2st")
#: Key of each run's out-of-fold prediction (removed once read: the runs would otherwise pile up in memory).
KEY = "unc"


def spearman(a, b) -> float:
    """Spearman correlation over the entries where both are finite (NaN with fewer than 3 or a constant)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok])[0])


def measured(adata, genes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The measured target of ``genes`` (``stexp.pp.normalize_target``: log1p CP10k) and each spot's total counts."""
    import anndata as ad

    import stexp

    counts = ad.AnnData(X=adata.X, var=pd.DataFrame(index=adata.var_names))
    stexp.pp.normalize_target(counts, key_added="target")
    truth = counts[:, genes].layers["target"]
    truth = np.asarray(truth.toarray() if hasattr(truth, "toarray") else truth, dtype=np.float64)
    return truth, np.asarray(adata.X.sum(axis=1), dtype=np.float64).ravel()


def recipe(variant: str, score: str, *, n_folds: int, epochs: int | None, seed: int):
    """The public recipe of a variant (``her2st.py`` notation), calibrated with the difficulty ``score``."""
    import stexp

    parsed = her2st.parse_variant(variant)
    cls = stexp.models.get_model_class(parsed["model"])
    params = dict(parsed["params"])
    if "max_epochs" in cls.default_hparams and epochs is not None:
        params["max_epochs"] = epochs
    if "seed" in cls.default_hparams:
        params["seed"] = seed
    base = (
        stexp.models.DEFAULT_RECIPE
        if variant == "pipeline"
        else stexp.models.Recipe(parsed["model"], smoothing=parsed["smoothing"])
    )
    return base.with_hparams(**params).replace(
        calibrate=True, calibration_score=score, calibration_folds=n_folds, name=f"{variant}:{score}"
    )


def _drop_prediction(adata, key: str) -> None:
    """Remove a run's prediction, its ``_std``/``_lo``/``_hi`` and its per-gene columns from ``adata``."""
    names = {key, f"{key}_std", f"{key}_lo", f"{key}_hi"}
    for store in (adata.layers, adata.obsm):
        for name in names & set(store.keys()):
            del store[name]
    adata.var = adata.var.drop(columns=[c for c in adata.var.columns if c.startswith(f"{key}_")])
    adata.uns.get("stexp", {}).get("evaluate", {}).pop(key, None)


def run_model(
    adata,
    genes: list[str],
    variant: str,
    *,
    n_folds: int,
    epochs: int | None,
    seed: int,
    device: str,
    scores: tuple[str, ...],
    truth: np.ndarray,
    depth: np.ndarray,
):
    """Rows of the table for one variant (``her2st.py`` notation: ``ridge``, ``knn200+smooth``, ``pipeline``)."""
    import stexp

    parsed = her2st.parse_variant(variant)
    features_key = her2st._key(parsed["features"], "clean")
    libs = adata.obs["library_id"].astype(str).to_numpy()
    rows = []
    gives_spread = None  # known after the first run: whether the model writes a spread (<key>_std)
    depth_error: dict[str, float] = {}  # the same for every score: computed on the first run
    for score in scores:
        if score == "model_spread" and gives_spread is False:
            print(f"{variant}: no model spread, score 'model_spread' skipped", flush=True)
            continue
        r = recipe(variant, score, n_folds=n_folds, epochs=epochs, seed=seed)
        t0 = time.perf_counter()
        try:
            result = stexp.tl.cross_validate(
                adata,
                model=r,
                split_by="patient",
                features_key=features_key,
                genes=genes,
                coverage=COVERAGE,
                inner_validation=parsed["inner_validation"],
                keep_models=True,
                seed=seed,
                device=device,
                key_added=KEY,
            )
        except ValueError as err:
            if score != "model_spread":
                raise
            print(f"{variant}: score 'model_spread' skipped ({err})", flush=True)
            continue
        wall = time.perf_counter() - t0
        gives_spread = f"{KEY}_std" in adata.layers or f"{KEY}_std" in adata.obsm
        # realised per-gene PCC of every test slide (genes x slides), as evaluate computed it
        realised = adata.uns["stexp"]["evaluate"][KEY]["pcc"].reindex(genes)
        if not depth_error:
            pred = stexp.tl.get_prediction(adata, KEY, genes=genes).to_numpy(dtype=np.float64)
            for lib in dict.fromkeys(result.per_fold["library_id"]):
                sel = libs == lib
                depth_error[lib] = spearman(depth[sel], np.abs(pred[sel] - truth[sel]).mean(axis=1))
        per_fold = result.per_fold
        for fold, fold_rows in per_fold.groupby("fold", sort=False):
            model = result.models[r.label][fold]
            expected = np.asarray(model.calibration.expected_pcc, dtype=np.float64)
            expected = pd.Series(expected, index=model.genes).reindex(genes).to_numpy()
            test_libs = fold_rows["library_id"].tolist()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a gene constant on every test slide: NaN
                fold_realised = np.nanmean(realised[test_libs].to_numpy(), axis=1)
            # the ceiling of any expected PCC: how well one test slide's realised per-gene PCC ranks another's
            retest = [spearman(realised[a], realised[b]) for a, b in itertools.combinations(test_libs, 2)]
            for _, row in fold_rows.iterrows():
                rows.append(
                    {
                        "model": variant,
                        "score": score,
                        "test_patient": row["test_group"],
                        "library_id": row["library_id"],
                        "coverage": row["coverage"],
                        "interval_width": row["interval_width"],
                        "unc_spot_spearman": row["unc_spot_spearman"],
                        "expected_pcc_spearman": row["expected_pcc_spearman"],
                        "expected_pcc_spearman_fold": spearman(expected, fold_realised),
                        "realised_pcc_acg": row["pcc_acg"],
                        "expected_pcc_acg": float(np.nanmean(expected)) if np.isfinite(expected).any() else np.nan,
                        # diagnostic: how much of a spot's error its measured depth explains (not known at
                        # prediction time; the "depth" score predicts it from the image)
                        "depth_error_spearman": depth_error[row["library_id"]],
                        "realised_retest_spearman": float(np.mean(retest)) if retest else float("nan"),
                        # fit_recipe: training, smoothing σ and the calibration's inner refits
                        "fit_calibrate_seconds": row["fit_seconds"],
                        "predict_seconds": row["predict_seconds"],
                    }
                )
        _drop_prediction(adata, KEY)
        print(f"{variant} score {score}: {wall:.1f} s (both folds: fit, inner refits, predict)", flush=True)
    return rows


def report(table: pd.DataFrame, command: str, total: float) -> str:
    cols = ["coverage", "interval_width", "unc_spot_spearman", "expected_pcc_spearman", "expected_pcc_spearman_fold"]
    agg = table.groupby(["model", "score"], sort=False)[cols].mean()
    per_fold = table.drop_duplicates(["model", "score", "test_patient"])
    cost = per_fold.groupby(["model", "score"], sort=False)["fit_calibrate_seconds"].sum().unstack("score")
    cost["all scores"] = cost.sum(axis=1)
    retest = (
        per_fold.drop_duplicates(["model", "test_patient"])
        .dropna(subset=["realised_retest_spearman"])
        .set_index(["model", "test_patient"])["realised_retest_spearman"]
    )
    slides = list(dict.fromkeys(table["library_id"]))
    lines = [
        "# HER2+ uncertainty (leave-one-patient-out)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; total {total / 60:.1f} min.  ",
        f"Nominal coverage {COVERAGE:.0%}. Per test slide, then mean over the {len(slides)} test slides "
        f"({', '.join(slides)}). One "
        "`stexp.tl.cross_validate(model=Recipe(..., calibrate=True, calibration_score=score), coverage=...)` per "
        "model and score: calibration on the training patient's slides only (inner leave-one-slide-out for "
        "patient C; spatial blocks of B4 when B4 is the only training slide), quantile mode `group_max` (the "
        "calibration's own). `exp-PCC ρ (fold)`: expected vs realised per-gene PCC, realised averaged over the "
        "fold's test slides.",
        "",
        "| model | score | coverage | width | unc_spot_spearman | exp-PCC ρ (slide) | exp-PCC ρ (fold) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (model, score), r in agg.iterrows():
        lines.append(
            f"| {model} | {score} | {r['coverage']:.3f} | {r['interval_width']:.3f} | {r['unc_spot_spearman']:.3f} "
            f"| {r['expected_pcc_spearman']:.3f} | {r['expected_pcc_spearman_fold']:.3f} |"
        )
    lines += [
        "",
        "Ceiling of `exp-PCC ρ (slide)`: Spearman across genes between the realised per-gene PCC of two test slides "
        "of the same patient (same model, same predictions), averaged over pairs of slides. Even a perfect "
        "expected PCC cannot rank one slide's realised PCC better than about the square root of this.",
        "",
        retest.round(3).to_frame().to_markdown() if len(retest) else "(no patient with two test slides)",
        "",
        "Diagnostic: Spearman across spots between a spot's measured depth (total counts) and its mean absolute "
        "error, per test slide (not known at prediction time; the `depth` score predicts it from the image).",
        "",
        table.drop_duplicates(["model", "library_id"])
        .pivot(index="model", columns="library_id", values="depth_error_spearman")
        .round(3)
        .to_markdown(),
        "",
        "Cost (s, both folds): each score's fit, smoothing and calibration (inner refits), as `cross_validate` "
        "times them; every score refits the model and its inner folds.",
        "",
        cost.round(1).to_markdown(),
    ]
    lines += [
        "",
        "Per slide:",
        "",
        table[["model", "score", "library_id", *cols[:4]]].round(3).to_markdown(index=False),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="her2st folder or its parent (default: $STEXP_DATA_DIR)")
    parser.add_argument("--input", help="a h5ad written by her2st.prepare (skips reading and embedding)")
    parser.add_argument("--models", default=",".join(MODELS), help="variants, in her2st.py notation (e.g. pipeline)")
    parser.add_argument("--scores", default=None, help="difficulty scores to compare (default: all)")
    parser.add_argument("--folds", type=int, default=3, help="inner calibration folds")
    parser.add_argument("--epochs", type=int, default=None, help="max_epochs of every neural model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)

    import anndata as ad

    import stexp

    t_start = time.perf_counter()
    stexp.settings.verbosity = 1
    command = "python benchmarks/uncertainty.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        h5ad = Path(args.input) if args.input else Path(tmp) / "her2st_features.h5ad"
        variants = args.models.split(",")
        if not args.input:
            needs = {(her2st.parse_variant(v)["features"], "clean") for v in variants}
            her2st.prepare(her2st._data_dir(args.data_dir), her2st.SECTIONS, h5ad, needs)
        adata = ad.read_h5ad(h5ad)
    scores = tuple(args.scores.split(",")) if args.scores else tuple(stexp.models.CALIBRATION_SCORES)
    genes = list(adata.uns["benchmark_genes"])
    truth, depth = measured(adata, genes)
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for variant in variants:  # the report is rewritten after every variant
        model = her2st.parse_variant(variant)["model"]
        epochs = args.epochs if args.epochs is not None else her2st.DEFAULT_EPOCHS.get(model)
        rows += run_model(
            adata,
            genes,
            variant,
            n_folds=args.folds,
            epochs=epochs,
            seed=args.seed,
            device=args.device,
            scores=scores,
            truth=truth,
            depth=depth,
        )
        table = pd.DataFrame(rows)
        total = time.perf_counter() - t_start
        text = report(table, command, total)
        (out / "uncertainty.md").write_text(text)
        payload = {"command": command, "total_seconds": total, "rows": json.loads(table.to_json(orient="records"))}
        (out / "uncertainty.json").write_text(json.dumps(payload, indent=1))
    print(text)


if __name__ == "__main__":
    main()
