"""Lever of the shift protocol: a stain- and scanner-augmented training bank.

The training slides' spots are added to the fit a second time for every augmentation rendering, with their
rendered image features and their own measured expression (the bank then holds each spot as it looks under
several renderings). The LOPO folds of ``benchmarks/shift.py``; the held-out slides are predicted from every
rendering. Only B4, C2 and C4 are rendered, so the augmented copies come from those of them that are training
slides. Augmentations: ``--augment`` (default the single-kind renderings ``hed1``, ``colour2``, ``jpeg2``,
``blur2``); renderings of a kind used for augmentation are marked "seen" in the report (their gain is optimistic),
``lowdark``, ``combined1`` and ``combined2`` are not seen as such.

Public API only (``stexp.tl.fit`` / ``predict`` / ``evaluate``). Features and counts from
``benchmarks/shift.py --embed-only``.

Usage::

    python benchmarks/shift_augment.py

Results: ``benchmarks/results/shift_augment.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from shift import add_stain_norm_option, cache_path, stain_norm_arg

RESULTS = Path(__file__).parent / "results"
RENDERED = ["B4", "C2", "C4"]
TESTS = ["clean", "jpeg2", "blur2", "colour2", "hed1", "hed2", "lowdark", "combined1", "combined2"]


def _augmented(train, augment: list[str]):
    """``train`` plus one copy of its rendered slides' spots per augmentation, their features replaced."""
    import anndata as ad

    parts = [train]
    rendered = train[train.obs["library_id"].isin(RENDERED)]
    for name in augment:
        copy = rendered.copy()
        copy.obsm["X_clean"] = np.asarray(copy.obsm[f"X_{name}"])
        copy.obs_names = [f"{o}|{name}" for o in copy.obs_names]
        parts.append(copy)
    out = ad.concat(parts, merge="first", uns_merge="first")
    return out


def run(adata, augment: list[str]) -> pd.DataFrame:
    import stexp

    genes = list(adata.uns["benchmark_genes"])
    patient = adata.obs["patient"].astype(str)
    rows = []
    for held in ("B", "C"):
        train = adata[patient != held].copy()
        tests = adata[(patient == held) & adata.obs["library_id"].isin(RENDERED)].copy()
        for variant, fit_on in (("default", train), ("augmented", _augmented(train, augment))):
            model = stexp.tl.fit(fit_on, features_key="X_clean", genes=genes)
            for name in TESTS:
                test = tests.copy()
                test.obsm["X_clean"] = np.asarray(test.obsm[f"X_{name}"])
                stexp.tl.predict(test, model, key_added="pred")
                scores = stexp.tl.evaluate(test, pred_key="pred")
                for lib, s in scores.iterrows():
                    rows.append({"variant": variant, "rendering": name, "library_id": lib,
                                 "pcc_acg": float(s["pcc_acg"]), "pcc_heg": float(s["pcc_heg"])})  # fmt: skip
    return pd.DataFrame(rows)


def main() -> None:
    import anndata as ad

    import stexp

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--augment", default="hed1,colour2,jpeg2,blur2")
    add_stain_norm_option(parser, "the features of `shift.py --stain-norm` (default: embed_images' default)")
    args = parser.parse_args()
    augment = [a for a in args.augment.split(",") if a]
    stexp.settings.verbosity = 1
    norm = stain_norm_arg(args.stain_norm)
    adata = ad.read_h5ad(cache_path(norm))
    rows = run(adata, augment)
    table = rows.pivot_table(index="rendering", columns="variant", values=["pcc_acg", "pcc_heg"], sort=False)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "shift_augment.json").write_text(json.dumps(rows.to_dict("records"), indent=1))
    kinds = {a.rstrip("12") for a in augment}
    lines = [
        "# Shift lever: augmented training bank",
        "",
        f"Command: `python benchmarks/shift_augment.py --augment {args.augment} --stain-norm {norm or 'none'}`. LOPO; held-out slides B4, C2, C4; "
        'mean over them. "seen": a rendering of a kind used for augmentation.',
        "",
        "| rendering | default PCC(ACG) | augmented PCC(ACG) | default PCC(HEG) | augmented PCC(HEG) |",
        "|---|---|---|---|---|",
    ]
    for name in TESTS:
        r = table.loc[name]
        seen = " (seen)" if name.rstrip("12") in kinds else ""
        lines.append(
            f"| {name}{seen} | {r[('pcc_acg', 'default')]:.3f} | {r[('pcc_acg', 'augmented')]:.3f} | "
            f"{r[('pcc_heg', 'default')]:.3f} | {r[('pcc_heg', 'augmented')]:.3f} |"
        )
    (RESULTS / "shift_augment.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
