"""Adapt to a new patient (or a new lab) with one measured section: how much to weight it, measured.

The workflow: measure one section of a new patient's block, add it to the training slides, predict the rest
of the block from H&E. On HER2+ the new patient is C (five serial sections with images): the model is fitted on
patient B's section (B4) plus one measured C section counted ``w`` times
(``stexp.tl.fit(..., slide_weights={section: w})``), and predicts the other C sections; every C section takes its turn as the measured one. Baselines: B4 alone
(the new patient unmeasured, i.e. leave-one-patient-out) and the measured section alone.

``--lab``: the same, but the new patient's slides come from another lab: the measured and the predicted
sections are the ``combined2`` rendering of ``benchmarks/shift.py`` (the strongest shift; rendered for C2 and
C4 only, so each predicts the other).

Features and counts come from ``benchmarks/shift.py --embed-only`` (``stexp.settings.cachedir /
"benchmark_shift.h5ad"``). Public API only: ``stexp.tl.fit`` (``slide_weights``), ``stexp.tl.predict``, ``stexp.tl.evaluate``.

Usage::

    python benchmarks/adapt.py [--lab] [--weights 1,2,3,5]

Results: ``benchmarks/results/adapt.{json,md}`` (``adapt_lab``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from shift import add_stain_norm_option, cache_path, stain_norm_arg

RESULTS = Path(__file__).parent / "results"
NEW_PATIENT = ["C2", "C3", "C4", "C5", "C6"]
LAB_SECTIONS = ["C2", "C4"]


def _training_set(adata, measured: str, weight: int):
    """The training slides and the fit's slide weights: B4 plus the measured section counted ``weight`` times
    (``weight=0``: B4 alone; -1: the measured section alone)."""
    libs = {0: ["B4"], -1: [measured]}.get(weight, ["B4", measured])
    train = adata[adata.obs["library_id"].isin(libs).to_numpy()].copy()
    return train, ({measured: weight} if weight > 1 else None)


def run(adata, *, lab: bool, weights: list[int]) -> pd.DataFrame:
    import stexp

    genes = list(adata.uns["benchmark_genes"])
    sections = LAB_SECTIONS if lab else NEW_PATIENT
    if lab:  # the new patient's sections as the other lab renders them
        c = adata.obs["library_id"].isin(LAB_SECTIONS).to_numpy()
        adata.obsm["X_clean"][c] = np.asarray(adata.obsm["X_combined2"])[c]
    rows = []
    for measured in sections:
        test = adata[adata.obs["library_id"].isin([s for s in sections if s != measured])].copy()
        for weight in [0, -1, *weights]:
            t0 = time.perf_counter()
            train, slide_weights = _training_set(adata, measured, weight)
            model = stexp.tl.fit(train, features_key="X_clean", genes=genes, slide_weights=slide_weights)
            stexp.tl.predict(test, model, key_added="pred")
            scores = stexp.tl.evaluate(test, pred_key="pred")
            shift = test.uns["stexp"]["pred"]["shift"]["slides"]
            for lib, s in scores.iterrows():
                rows.append(
                    {
                        "measured": measured,
                        "weight": {0: "B4 only", -1: "measured only"}.get(weight, weight),
                        "test": lib,
                        "pcc_acg": float(s["pcc_acg"]),
                        "pcc_heg": float(s["pcc_heg"]),
                        "shift_score": shift[lib]["score"],
                        "flagged": shift[lib]["flagged"],
                        "seconds": time.perf_counter() - t0,
                    }
                )
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    import anndata as ad

    import stexp

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lab", action="store_true")
    parser.add_argument("--weights", default="1,2,3,5")
    add_stain_norm_option(parser, "the features of `shift.py --stain-norm` (default: embed_images' default)")
    args = parser.parse_args()
    stexp.settings.verbosity = 1
    norm = stain_norm_arg(args.stain_norm)
    adata = ad.read_h5ad(cache_path(norm))
    weights = [int(w) for w in args.weights.split(",")]
    rows = run(adata, lab=args.lab, weights=weights)
    name = "adapt_lab" if args.lab else "adapt"
    table = rows.groupby("weight", sort=False)[["pcc_acg", "pcc_heg", "shift_score"]].mean()
    table["flagged"] = rows.groupby("weight", sort=False)["flagged"].mean()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows.to_dict("records"), indent=1))
    what = "another lab's rendering (combined2) of C2/C4" if args.lab else "patient C's five sections"
    lines = [
        f"# Adapting with one measured section: {what}",
        "",
        f"Command: `python benchmarks/adapt.py{' --lab' if args.lab else ''} --weights {args.weights} --stain-norm {norm or 'none'}`. Mean over "
        "(measured section, predicted section) pairs; weight = times the measured section counts in the fit.",
        "",
        "| training | PCC(ACG) | PCC(HEG) | shift score | flagged |",
        "|---|---|---|---|---|",
    ]
    for weight, r in table.iterrows():
        label = weight if isinstance(weight, str) else f"B4 + measured x{weight}"
        lines.append(
            f"| {label} | {r['pcc_acg']:.3f} | {r['pcc_heg']:.3f} | {r['shift_score']:.2f} | {r['flagged']:.0%} |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
