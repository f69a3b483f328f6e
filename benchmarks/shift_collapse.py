"""Candidate for the shift score: how much a slide's image features collapse, against the distance score.

Blur, JPEG and low resolution make a slide's patches look alike, so its features spread less than a training
slide's, and retrieval returns the same neighbours for every spot. This script asks whether that collapse
ranks the realised accuracy loss of the shift protocol better than the shift score ``predict`` writes (the
distance to the training spots).

For each LOPO fold of ``benchmarks/shift.py`` a model is fitted on the training slides' clean features
(``stexp.tl.fit``); its shift reference (``model.shift.embed``) maps features into the space ``predict``'s
distance score lives in (standardised, on the training features' principal axes, unit rows). A slide's spread
is the mean cosine distance of its spots to their own mean direction; its **collapse** is the training slides'
median spread over its spread (1: spreads like a training slide; larger: collapsed). Over every rendered
(slide, rendering) of a result file, the Spearman correlation with the PCC(ACG) loss is reported for the
distance score (``shift_score`` of the result file), the collapse, and their product; and the AUROC of the
collapse between clean and rendered slides.

Inputs: each feature set's cached features (``shift.py --embed-only [options]``) and results
(``results/shift[...].json``). No choice is tuned here.

Usage::

    python benchmarks/shift_collapse.py                         # every feature set with features and results

Results: ``benchmarks/results/shift_collapse.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pandas as pd
from shift import CLEAN, RESULTS, _auroc, cache_path

#: Feature sets compared: name -> (view options of ``cache_path``, result stem).
FEATURE_SETS = {
    "macenko (default)": ({"stain_norm": "macenko"}, "shift"),
    "none": ({"stain_norm": None}, "shift_none"),
    "vahadane": ({"stain_norm": "vahadane"}, "shift_vahadane"),
    "haematoxylin": ({"stain_norm": "haematoxylin"}, "shift_haematoxylin"),
    "macenko + AdaBN": ({"stain_norm": "macenko", "adapt_bn": True}, "shift_adabn"),
    "macenko, mpp 2": ({"stain_norm": "macenko", "mpp": 2.0}, "shift_mpp2"),
    "macenko, mpp 4": ({"stain_norm": "macenko", "mpp": 4.0}, "shift_mpp4"),
}
#: Genes of the cheap fit whose shift reference gives the space (every model keeps the same reference).
REFERENCE_GENES = 20


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _spread(embedded: np.ndarray) -> float:
    """Mean cosine distance of unit rows to their own mean direction."""
    centre = _unit(embedded.mean(axis=0, keepdims=True))[0]
    return float(1.0 - (embedded @ centre).mean())


def collapse_table(adata) -> pd.DataFrame:
    """Per (rendering, held-out slide): the collapse against its fold's training slides.

    Spreads are measured in the space of the fold's shift reference (``model.shift.embed``: the standardised
    training features on their principal axes, unit rows), the space ``predict``'s distance score lives in.
    """
    import stexp

    libs = adata.obs["library_id"].astype(str).to_numpy()
    patient = adata.obs["patient"].astype(str).to_numpy()
    keys = [k for k in adata.obsm if k.startswith("X_")]
    genes = list(adata.uns["benchmark_genes"])[:REFERENCE_GENES]
    rows = []
    for held in np.unique(patient):
        train = patient != held
        model = stexp.tl.fit(adata[train].copy(), model="ridge", features_key=f"X_{CLEAN}", genes=genes)
        clean = np.asarray(adata.obsm[f"X_{CLEAN}"])
        reference = float(np.median([_spread(model.shift.embed(clean[libs == lib])) for lib in np.unique(libs[train])]))
        for key in keys:
            for lib in np.unique(libs[~train]):
                spread = _spread(model.shift.embed(np.asarray(adata.obsm[key])[libs == lib]))
                rows.append({"rendering": key[2:], "library_id": lib, "collapse": reference / spread})
    return pd.DataFrame(rows)


def compare(adata, results: dict) -> dict:
    """Spearman of distance score, collapse and product with the PCC loss; the collapse's AUROC per rendering."""
    from scipy.stats import spearmanr

    per_slide = pd.DataFrame(results["per_slide"])
    per_slide = per_slide[per_slide["variant"] == "default"]
    merged = per_slide.merge(collapse_table(adata), on=["rendering", "library_id"])
    clean = merged[merged["rendering"] == CLEAN]
    shifted = merged[(merged["rendering"] != CLEAN) & merged["library_id"].isin(results["rendered_slides"])].copy()
    shifted["loss"] = shifted["library_id"].map(clean.set_index("library_id")["pcc_acg"]) - shifted["pcc_acg"]
    shifted["product"] = shifted["shift_score"] * shifted["collapse"]
    out = {
        "n_points": int(len(shifted)),
        "renderings": sorted(shifted["rendering"].unique()),
        **{
            f"spearman_{col}": float(spearmanr(shifted[col], shifted["loss"]).statistic)
            for col in ("shift_score", "collapse", "product")
        },
        "clean_collapse": [round(float(v), 2) for v in clean["collapse"]],
        "auroc_collapse": {
            r: _auroc(clean["collapse"].to_numpy(), g["collapse"].to_numpy()) for r, g in shifted.groupby("rendering")
        },
    }
    return out


def main() -> None:
    import anndata as ad

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    report = {}
    for name, (views, stem) in FEATURE_SETS.items():
        features, results = cache_path(**views), RESULTS / f"{stem}.json"
        if not (features.is_file() and results.is_file()):
            print(f"{name}: skipped (no {features.name} or {results.name})", file=sys.stderr)
            continue
        report[name] = compare(ad.read_h5ad(features), json.loads(results.read_text()))
        print(name, {k: v for k, v in report[name].items() if k.startswith("spearman")}, flush=True)
    (RESULTS / "shift_collapse.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# Collapse of a slide's features as a shift statistic, against the distance score",
        "",
        "Command: `python benchmarks/shift_collapse.py`. Spearman correlation with the PCC(ACG) loss over the "
        "rendered (slide, rendering) pairs of each feature set's shift protocol; collapse = training slides' "
        "median feature spread / the slide's spread.",
        "",
        "| features | pairs | distance score (predict's) | collapse | product |",
        "|---|---|---|---|---|",
    ]
    for name, r in report.items():
        lines.append(
            f"| {name} | {r['n_points']} | {r['spearman_shift_score']:.2f} | {r['spearman_collapse']:.2f} | "
            f"{r['spearman_product']:.2f} |"
        )
    (RESULTS / "shift_collapse.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
