"""HER2+ uncertainty benchmark: calibrated intervals and per-gene expected PCC, leave-one-patient-out.

Same data, features, panel and folds as ``benchmarks/her2st.py`` (its ``prepare`` is reused): the six
HER2+ image sections (patients B and C), EfficientNet-Lite0 frozen features, the 785-gene panel. For every
model and outer fold (train on one patient, predict the other), the model is fit on the training patient,
then calibrated on the training slides only (:func:`stexp.models._calibration.calibrate`: inner refits
leaving out one training slide, or spatial blocks of the single slide of patient B), and its 90 %
intervals are scored on the held-out patient's slides. Every difficulty score of
:data:`stexp.models._calibration.SCORES` is compared on the same inner refits; the inner models'
disagreement (an ensemble) is measured as a diagnostic (its calibration would need nested refits).

Columns (per test slide, then averaged): ``coverage`` (share of measured values inside the interval),
``interval_width`` (mean, log1p CP10k), ``unc_spot_spearman`` (Spearman across spots of mean width vs
mean absolute error), ``expected_pcc_spearman`` (Spearman across genes of expected vs realised PCC).

Usage::

    STEXP_DATA_DIR=../shared/data python benchmarks/uncertainty.py                # every model
    python benchmarks/uncertainty.py --models ridge,knn --input prepared.h5ad       # reuse a prepared h5ad

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
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
import her2st  # (data loading and settings shared with the main benchmark)

COVERAGE = 0.9
MODELS = ("pipeline", "mclstexp", "ridge", "knn", "mean", "mlp", "nh2st")


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
):
    """Rows of the table for one variant (``her2st.py`` notation: ``ridge``, ``knn200+smooth``, ``pipeline``)."""
    import stexp
    from stexp.models import get_model_class
    from stexp.models._calibration import QUANTILE_MODES, calibrate, out_of_fold
    from stexp.tl._evaluate import interval_scores, pearson_columns, spearman
    from stexp.tl._inputs import make_model, spot_data

    parsed = her2st.parse_variant(variant)
    model = parsed["model"]
    features_key = her2st._key(parsed["features"], "clean")
    cls = get_model_class(model)
    params = {k: cls.default_hparams[k] for k in ("lr", "weight_decay", "batch_size") if k in cls.default_hparams}
    params.update(parsed["params"])
    if "max_epochs" in cls.default_hparams and epochs is not None:
        params["max_epochs"] = epochs
    if "seed" in cls.default_hparams:
        params["seed"] = seed
    if parsed["smoothing"] is not None:
        params["smoothing"] = parsed["smoothing"]
    data = spot_data(adata, features_key=features_key, library_key="library_id", genes=genes)
    spec = stexp.tl._inputs.features_spec(adata, features_key)
    patients = adata.obs["patient"].astype(str).to_numpy()
    libs = adata.obs["library_id"].astype(str).to_numpy()
    rows = []
    for test_patient in dict.fromkeys(patients.tolist()):
        is_test = patients == test_patient
        train, test = data.subset(~is_test), data.subset(is_test)
        est = make_model(model, genes, features_key=features_key, encoder_spec=spec, options={}, **params)
        t0 = time.perf_counter()
        est.fit(train, device=device)
        t_fit = time.perf_counter() - t0
        t0 = time.perf_counter()
        oof = out_of_fold(est, train, n_folds)
        t_cal = time.perf_counter() - t0
        mean, spread = est.predict(test)
        inner = np.stack([m.predict(test)[0] for m in oof["models"]])
        ensemble = inner.std(axis=0)
        truth = test.target.astype(np.float64)
        test_libs = libs[is_test]
        slide_rows = {lib: np.flatnonzero(test_libs == lib) for lib in dict.fromkeys(test_libs.tolist())}
        # realised per-gene PCC of each test slide (the same for every score and quantile)
        realised = {lib: pearson_columns(truth[r], mean[r])[0] for lib, r in slide_rows.items()}
        with np.errstate(invalid="ignore"):
            gene_realised = np.nanmean(np.vstack(list(realised.values())), axis=0)
        # the ceiling of any expected PCC: how well one test slide's realised per-gene PCC ranks another's
        retest = [spearman(a, b) for a, b in itertools.combinations(realised.values(), 2)]
        for score in scores:
            if score == "model_spread" and spread is None:
                continue
            t1 = time.perf_counter()
            cal = calibrate(est, train, score=score, oof=oof, seed=seed)
            bounds = {mode: cal.intervals(mean, test.features, spread, COVERAGE, mode) for mode in QUANTILE_MODES}
            t_score = time.perf_counter() - t1
            n_before = len(rows)
            for lib, mode in itertools.product(slide_rows, QUANTILE_MODES):
                lo, hi = bounds[mode]
                r, pcc = slide_rows[lib], realised[lib]
                s = interval_scores(truth[r], mean[r], lo[r], hi[r])
                rows.append(
                    {
                        "model": variant,
                        "score": score,
                        "quantile": mode,
                        "test_patient": test_patient,
                        "library_id": lib,
                        **s,
                        "expected_pcc_spearman": spearman(cal.expected_pcc, pcc),
                        "realised_pcc_acg": float(np.nanmean(pcc)),
                        "expected_pcc_acg": float(np.nanmean(cal.expected_pcc)),
                        "ensemble_spot_spearman": spearman(
                            ensemble[r].mean(axis=1), np.abs(mean[r] - truth[r]).mean(axis=1)
                        ),
                        # diagnostic: how much of a spot's error its measured depth explains (not known at
                        # prediction time; the "depth" score predicts it from the image)
                        "depth_error_spearman": spearman(test.depth[r], np.abs(mean[r] - truth[r]).mean(axis=1)),
                        "inner_folds": cal.info["folds"],
                        "fit_seconds": t_fit,
                        "calibration_seconds": t_cal + t_score,
                    }
                )
            for row in rows[n_before:]:
                row["expected_pcc_spearman_fold"] = spearman(cal.expected_pcc, gene_realised)
                row["realised_retest_spearman"] = float(np.mean(retest)) if retest else float("nan")
        print(f"{variant} test {test_patient}: fit {t_fit:.1f} s, inner refits {t_cal:.1f} s", flush=True)
    return rows


def report(table: pd.DataFrame, command: str, total: float) -> str:
    cols = ["coverage", "interval_width", "unc_spot_spearman", "expected_pcc_spearman", "ensemble_spot_spearman"]
    agg = table.groupby(["model", "score", "quantile"], sort=False)[cols].mean()
    cost = (
        table.drop_duplicates(["model", "test_patient"])
        .groupby("model", sort=False)[["fit_seconds", "calibration_seconds"]]
        .sum()
    )
    fold = (
        table.drop_duplicates(["model", "score", "test_patient"])
        .groupby(["model", "score"], sort=False)["expected_pcc_spearman_fold"]
        .mean()
    )
    retest = (
        table.drop_duplicates(["model", "test_patient"])
        .dropna(subset=["realised_retest_spearman"])
        .set_index(["model", "test_patient"])["realised_retest_spearman"]
    )
    lines = [
        "# HER2+ uncertainty (leave-one-patient-out)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; total {total / 60:.1f} min.  ",
        f"Nominal coverage {COVERAGE:.0%}. Per test slide, then mean over the 6 slides (B4; C2-C6). "
        "Calibration on the training patient's slides only (inner leave-one-slide-out for patient C; spatial "
        "blocks of B4 when B4 is the only training slide). `ensemble` = Spearman across spots of the inner "
        "models' disagreement vs error (diagnostic, not calibrated). `exp-PCC ρ (fold)`: expected vs realised "
        "per-gene PCC, realised averaged over the fold's test slides.",
        "",
        "| model | score | quantile | coverage | width | unc_spot_spearman | exp-PCC ρ (slide) | exp-PCC ρ (fold) "
        "| ensemble |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, score, mode), r in agg.iterrows():
        lines.append(
            f"| {model} | {score} | {mode} | {r['coverage']:.3f} | {r['interval_width']:.3f} | {r['unc_spot_spearman']:.3f} "
            f"| {r['expected_pcc_spearman']:.3f} | {fold[(model, score)]:.3f} | {r['ensemble_spot_spearman']:.3f} |"
        )
    lines += [
        "",
        "Ceiling of `exp-PCC ρ (slide)`: Spearman across genes between the realised per-gene PCC of two test slides "
        "of the same patient (same model, same predictions), averaged over pairs of slides. Even a perfect "
        "expected PCC cannot rank one slide's realised PCC better than about the square root of this.",
        "",
        retest.round(3).to_frame().to_markdown(),
        "",
        "Cost (s, both folds): fit and calibration (inner refits + scoring)",
        "",
        cost.round(1).to_markdown(),
    ]
    lines += [
        "",
        "Per slide:",
        "",
        table[["model", "score", "quantile", "library_id", *cols]].round(3).to_markdown(index=False),
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
    from stexp.models._calibration import SCORES

    scores = tuple(args.scores.split(",")) if args.scores else SCORES
    genes = list(adata.uns["benchmark_genes"])
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
