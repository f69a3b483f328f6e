"""Build the shipped pretrained model ``her2st-breast-v1`` in one command, from the public API only.

What it does
    1. reads the six HER2+ sections with an H&E image (B4, C2-C6; patients B and C) with
       :func:`stexp.datasets.her2st` from ``$STEXP_DATA_DIR/her2st`` (or ``--data-dir``);
    2. embeds them with the default features, ``stexp.pp.embed_images(adata)`` (cached on disk);
    3. fits the default pipeline, ``stexp.tl.fit(adata, genes=panel)`` with no model, on the 785-gene panel
       (restricted to the genes measured in every section, as in ``benchmarks/her2st.py``);
    4. measures the card's figures with ``stexp.tl.cross_validate`` on the same data and recipe:
       leave-one-patient-out (the honest one: B -> C and C -> B) and leave-one-section-out (optimistic:
       patient C's serial sections stay in training), and compares each gene's expected PCC (from the
       model's calibration) with the PCC it got in each protocol;
    5. writes the model card (training data, citation, encoder, genes, figures, intended use, limits) and
       saves the folder with float16 storage (``storage_dtype="float16"``) to
       ``src/stexp/models/pretrained/her2st-breast-v1`` (or ``--out``), then reloads it, checks that its
       predictions match the fitted model's, and prints the card and the folder's size.

Rerun it whenever the default pipeline changes (e.g. after the shift reference lands: the card then
carries it). Usage::

    STEXP_DATA_DIR=../shared/data nice -n 15 python benchmarks/build_pretrained.py
    python benchmarks/build_pretrained.py --data-dir /data/her2st --out /tmp/her2st-breast-v1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

NAME = "her2st-breast-v1"
SECTIONS = ["B4", "C2", "C3", "C4", "C5", "C6"]
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "stexp" / "models" / "pretrained" / NAME
CITATION = (
    "Andersson A, Larsson L, Stenbeck L, et al. Spatial deconvolution of HER2-positive breast cancer delineates "
    "tumor-associated cell type interactions. Nature Communications 12, 6012 (2021). doi:10.1038/s41467-021-26271-2"
)
LICENCE = (
    "not verified here: the data are public (github.com/almaan/her2st, Zenodo record 3957257); check the terms "
    "of that record before redistributing the data (this folder holds the training spots' expression and features)"
)
PROTOCOLS = {
    "lopo": ("patient", "leave-one-patient-out: train on one patient, predict the other (B -> C, C -> B)"),
    "loso": ("library_id", "leave-one-section-out: optimistic, sister sections of patient C stay in training"),
}
THRESHOLD = 0.3


def _data_dir(arg: str | None) -> Path:
    value = arg or os.environ.get("STEXP_DATA_DIR")
    if not value:
        raise SystemExit("set STEXP_DATA_DIR (the folder holding her2st/) or pass --data-dir")
    path = Path(value)
    return path / "her2st" if (path / "her2st").is_dir() else path


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20


def _figure(cv, var, description: str, model, genes: list[str]) -> dict:
    """Means over held-out slides, per-slide rows, and how the calibration's expected PCC compares per gene."""
    rows = cv.per_fold
    per_slide = [
        {
            "slide": str(r["library_id"]),
            "pcc_acg": round(float(r["pcc_acg"]), 3),
            "pcc_heg": round(float(r["pcc_heg"]), 3),
            "pcc_hvg": round(float(r["pcc_hvg"]), 3),
            "n_train_spots": int(r["n_train_spots"]),
        }
        for _, r in rows.iterrows()
    ]
    out = {"description": description}
    for metric in ("pcc_acg", "pcc_heg", "pcc_hvg", "mse"):
        out[metric] = round(float(rows[metric].mean()), 3)
    out["per_slide"] = per_slide
    # the per-gene PCC pooled over the protocol's held-out slides, against the shipped model's expected PCC
    (pred_key,) = cv.layers.values()  # one model: its out-of-fold prediction's key
    column = f"{pred_key}_pcc"  # stexp.tl.evaluate's per-gene PCC averaged over the held-out slides
    observed = np.asarray([var.loc[g, column] if column in var else np.nan for g in genes], dtype=float)
    expected = np.asarray(model.calibration.expected_pcc, dtype=float)
    ok = np.isfinite(observed) & np.isfinite(expected)
    if ok.sum() > 2:
        out["expected_vs_observed_gene_pcc_r"] = round(float(np.corrcoef(expected[ok], observed[ok])[0, 1]), 3)
        trusted = ok & (expected >= THRESHOLD)
        out[f"genes_expected_ge_{THRESHOLD:g}"] = int(trusted.sum())
        if trusted.any():
            out[f"observed_pcc_of_genes_expected_ge_{THRESHOLD:g}"] = round(float(np.mean(observed[trusted])), 3)
    return out


def main(argv: list[str] | None = None) -> None:
    import stexp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None, help="folder with the her2st data (default: $STEXP_DATA_DIR)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="model folder to write (default: %(default)s)")
    parser.add_argument("--no-cv", action="store_true", help="skip the protocol figures (quick check of the build)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="sections (default: %(default)s)")
    args = parser.parse_args(argv)
    her2st_dir = _data_dir(args.data_dir)
    sections = args.sections.split(",")
    stexp.settings.verbosity = 1
    t0 = time.perf_counter()

    adata = stexp.datasets.her2st(sections, path=her2st_dir, download=False)
    stexp.pp.embed_images(adata)  # the default features: what `stexp predict` recomputes on a new slide
    panel = [g.strip() for g in (her2st_dir / "her2st_785_genes.txt").read_text().split() if g.strip()]
    genes = [g for g in panel if g in adata.var_names]
    print(f"{adata.n_obs} spots in {len(sections)} sections; {len(genes)} of the {len(panel)} panel genes", flush=True)

    model = stexp.tl.fit(adata, genes=genes)
    print(f"fitted {model!r}", flush=True)

    card = model.card
    card.name = NAME
    card.summary = (
        "Predicts the 785-gene HER2+ breast panel (log1p of counts per 10,000) on 100 µm spots from H&E; "
        "the default stexp pipeline trained on every image section of the HER2+ breast ST data."
    )
    card.training_data.update(
        {
            "tissue": "HER2-positive breast tumours (invasive carcinoma, in situ, stroma, immune, adipose)",
            "platform": "legacy Spatial Transcriptomics (ST): 100 µm spots on a 200 µm grid; H&E at ~0.69 µm/px",
            "citation": CITATION,
            "licence": LICENCE,
            "source": "stexp.datasets.her2st (sections with an H&E image)",
        }
    )
    card.genes["panel"] = (
        f"the 785-gene HER2+ panel of HisToGene / Hist2ST / mclSTExp ({len(genes)} measured in every section)"
    )
    card.intended_use = (
        "Research: a first look at spatial expression of H&E breast cancer slides without spatial transcriptomics of "
        "one's own; ranking regions, not measuring them. Trust the genes whose expected PCC clears the threshold "
        "(stexp predict lists them) and the slides whose shift score lies within the training range. Not for "
        "diagnosis or any clinical decision."
    )
    card.limits = [
        "Two training patients (B: one section, low counts, ~650 UMI per spot; C: five serial sections of one "
        "tumour): patient-to-patient variation is barely sampled, so expect the LOPO figures, not the LOSO ones.",
        "Breast (HER2+) only; other tissues and subtypes are out of distribution.",
        "Legacy ST spots are 100 µm: predictions are averages over ~10-20 cells, not cell types; at other spot "
        "sizes (Visium 55 µm) the features cover other areas.",
        "A kNN retrieval of training spots: it predicts mixtures of the training spots' expression and cannot "
        "exceed their range.",
        "One lab's staining and scanner; stain and resolution shifts lower accuracy (docs/benchmarks.md). The "
        "shift score says how far a new slide's spots lie from the training spots; beyond the training range, "
        "expected PCC and intervals are optimistic.",
    ]
    if not args.no_cv:
        for protocol, (split_by, description) in PROTOCOLS.items():
            key = f"cv_{protocol}"
            t = time.perf_counter()
            cv = stexp.tl.cross_validate(adata, split_by=split_by, genes=genes, key_added=key)
            card.figures[protocol] = _figure(cv, adata.var, description, model, genes)
            print(f"{protocol}: {json.dumps({k: v for k, v in card.figures[protocol].items() if k != 'per_slide'})} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip

    out = Path(args.out)
    model.save(out, overwrite=True, storage_dtype="float16")
    loaded = stexp.models.load(out, device="cpu")
    sub = adata[adata.obs["library_id"] == sections[-1], genes].copy()  # the panel: predictions in layers
    stexp.tl.predict(sub, model, key_added="a", device="cpu")
    stexp.tl.predict(sub, loaded, key_added="b", device="cpu")
    a, b = np.asarray(sub.layers["a"]), np.asarray(sub.layers["b"])
    r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
    print(f"float16 folder vs fitted model on {sections[-1]}: max |diff| {np.abs(a - b).max():.4f}, r {r:.6f}")
    print()
    stexp.models.describe(loaded)
    print(f"folder {out}: {_folder_mb(out):.2f} MB ({', '.join(f.name for f in sorted(out.iterdir()))})")
    print(f"built in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
