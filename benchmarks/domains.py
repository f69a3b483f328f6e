"""The spatial weight of ``stexp.tl.domains``, chosen by measurement.

Two measurements per weight ``λ`` (``spatial=``), k-means with as many domains as the slide's annotation has:

1. **Measured expression vs pathologist**: the seven annotated HER2+ sections (B1, C1, D1, E1, F1, G2, H1; counts
   and labels, no image needed); ARI of the domains with the pathologist's labels (``stexp.tl.score_domains``).
2. **Predicted vs measured**: the six image sections (B4, C2-C6), predicted leave-one-patient-out by the
   default pipeline (``stexp.tl.cross_validate``); ARI between the domains of the prediction and the domains of
   the measured expression of the same slide (both at ``λ``).

Usage::

    STEXP_DATA_DIR=../shared/data python benchmarks/domains.py

Results: ``benchmarks/results/domains.{json,md}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd

LABELLED = ["B1", "C1", "D1", "E1", "F1", "G2", "H1"]
IMAGES = ["B4", "C2", "C3", "C4", "C5", "C6"]
WEIGHTS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.9)
RESULTS = Path(__file__).parent / "results"


def _panel(data_dir: Path, adata) -> list[str]:
    panel = [g.strip() for g in (data_dir / "her2st_785_genes.txt").read_text().split() if g.strip()]
    return [g for g in panel if g in adata.var_names]


def against_pathologist(data_dir: Path) -> pd.DataFrame:
    """ARI of domains of the measured expression with the pathologist's labels, per section and weight."""
    import stexp

    rows = []
    for section in LABELLED:
        a = stexp.datasets.her2st(section, path=data_dir, image_res=None)
        genes = _panel(data_dir, a)
        labels = a.obs["label"].astype(str)
        n = int(labels[~labels.str.lower().isin(["undetermined", "nan"])].nunique())
        for weight in WEIGHTS:
            stexp.tl.domains(a, layer=None, n_domains=n, genes=genes, spatial=weight)
            score = stexp.tl.score_domains(a).iloc[0]
            rows.append({"section": section, "spatial": weight, "ari": float(score["ari"]), "nmi": float(score["nmi"])})
    return pd.DataFrame(rows)


def predicted_vs_measured(data_dir: Path, n_domains: int = 5) -> pd.DataFrame:
    """ARI between domains of the LOPO prediction and of the measured expression, per section and weight."""
    from sklearn.metrics import adjusted_rand_score

    import stexp

    a = stexp.datasets.her2st(IMAGES, path=data_dir)
    genes = _panel(data_dir, a)
    stexp.pp.embed_images(a)
    stexp.tl.cross_validate(a, split_by="patient", genes=genes, key_added="cv")
    rows = []
    for section in IMAGES:
        s = a[a.obs["library_id"] == section].copy()
        for weight in WEIGHTS:
            stexp.tl.domains(s, layer=None, n_domains=n_domains, genes=genes, spatial=weight, key_added="measured")
            stexp.tl.domains(s, layer="cv", n_domains=n_domains, genes=genes, spatial=weight, key_added="predicted")
            ari = adjusted_rand_score(s.obs["measured"], s.obs["predicted"])
            rows.append({"section": section, "spatial": weight, "ari": float(ari)})
    return pd.DataFrame(rows)


def main() -> None:
    data_dir = Path(os.environ.get("STEXP_DATA_DIR") or sys.exit("set STEXP_DATA_DIR (e.g. ../shared/data)"))
    data_dir = data_dir / "her2st" if (data_dir / "her2st").is_dir() else data_dir
    import stexp

    stexp.settings.verbosity = 1
    path = against_pathologist(data_dir)
    pred = predicted_vs_measured(data_dir)
    table = pd.DataFrame(
        {
            "ARI measured vs pathologist (7 sections)": path.groupby("spatial")["ari"].mean(),
            "NMI measured vs pathologist": path.groupby("spatial")["nmi"].mean(),
            "ARI predicted vs measured (6 sections, LOPO)": pred.groupby("spatial")["ari"].mean(),
        }
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "domains.json").write_text(
        json.dumps({"pathologist": path.to_dict("records"), "predicted": pred.to_dict("records")}, indent=1)
    )
    lines = [
        "# Spatial weight of stexp.tl.domains",
        "",
        "Command: `STEXP_DATA_DIR=../shared/data python benchmarks/domains.py` (k-means; mean over sections).",
        "",
        "| spatial | " + " | ".join(table.columns) + " |",
        "|---|" + "---|" * len(table.columns),
    ]
    for weight, row in table.iterrows():
        lines.append(f"| {weight:g} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    (RESULTS / "domains.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
