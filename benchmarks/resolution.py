"""Slides exported at low resolution: what ``predict`` says of them, and refitting at their resolution, measured.

The user's path, public API only: the HER2+ leave-one-patient-out folds (train on patient B, predict patient
C, and the reverse); each held-out slide of ``benchmarks/shift.py``'s rendered ones (B4, C2, C4) is predicted
from its ~2000-px hires image alone (~3.6 µm/px), as another lab's export would give it: the ``lowdark``
rendering (glass painted dark), ``lowdark_jpeg2`` (that, saved as JPEG at quality 8) and ``combined2`` (that,
plus blur, scanner colour and stain changes).
Three fits per fold:

``default``   the training slides embedded as ``stexp.tl.fit`` would (full resolution, ~0.73 µm/px);
``matched``   the training slides embedded at the held-out slides' resolution
              (``stexp.pp.embed_images(train, mpp=--mpp)``), what ``predict``'s warning says to try;
``export``    the training slides seen as the compressed export: also re-encoded as JPEG
              (``embed_images(train, mpp=--mpp, jpeg_quality=--jpeg-quality)``).

``stexp.tl.predict`` embeds each held-out slide with the model's own encoder spec (so ``matched`` sees it at
``--mpp`` too). Reported per held-out slide: PCC(ACG) / PCC(HEG) (``stexp.tl.evaluate``), the resolution
record (how many times coarser than the training slides, whether reported), the compression record (JPEG
blockiness, whether reported, the estimated quality, whether deblocked) and the shift score.

Usage::

    STEXP_DATA_DIR=../shared/data python benchmarks/resolution.py [--mpp 3.6] [--jpeg-quality 8]

Results: ``benchmarks/results/resolution.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shift import RENDERED, RESULTS, SECTIONS, rendered_copy

#: The renderings of ``benchmarks/shift.py`` predicted (both from the hires image alone).
RENDERINGS = ("lowdark", "lowdark_jpeg2", "combined2")


def run(data_dir: Path, mpp: float, jpeg_quality: int) -> list[dict]:
    import stexp

    adata = stexp.datasets.her2st(SECTIONS, path=data_dir)
    panel = [g.strip() for g in (data_dir / "her2st_785_genes.txt").read_text().split() if g.strip()]
    genes = [g for g in panel if g in adata.var_names]
    patient = adata.obs["patient"].astype(str)
    rows = []
    for held in sorted(patient.unique()):
        train = adata[patient != held].copy()
        test = adata[(patient == held) & adata.obs["library_id"].isin(RENDERED)].copy()
        queries = {name: rendered_copy(test, name) for name in RENDERINGS}
        fits = {
            "default": {},
            "matched": {"mpp": mpp},
            "export": {"mpp": mpp, "jpeg_quality": jpeg_quality},
        }
        for fit_name, views in fits.items():
            key = f"X_train_{fit_name}"
            stexp.pp.embed_images(train, key_added=key, **views)
            model = stexp.tl.fit(train, features_key=key, genes=genes)
            for rendering, query in queries.items():
                query = query.copy()
                stexp.tl.predict(query, model, key_added="pred")
                record = query.uns["stexp"]["pred"]
                scores = stexp.tl.evaluate(query, pred_key="pred")
                for lib, s in scores.iterrows():
                    rows.append(_row(fit_name, rendering, lib, s, record))
                    print(rows[-1], flush=True)
    return rows


def _row(fit: str, rendering: str, lib: str, scores, record: dict) -> dict:
    """One held-out slide's scores, resolution verdict and shift score."""
    resolution = (record.get("resolution") or {}).get("slides", {}).get(lib, {})
    compression = (record.get("compression") or {}).get("slides", {}).get(lib, {})
    return {
        "fit": fit,
        "rendering": rendering,
        "held_out": lib,
        "pcc_acg": round(float(scores["pcc_acg"]), 4),
        "pcc_heg": round(float(scores["pcc_heg"]), 4),
        "times_coarser": resolution.get("times_coarser"),
        "reported_coarser": resolution.get("coarser"),
        "jpeg_blockiness": compression.get("jpeg_blockiness"),
        "reported_jpeg": compression.get("heavy"),
        "estimated_quality": compression.get("estimated_quality"),
        "deblocked": compression.get("deblocked"),
        "shift_score": record["shift"]["slides"][lib]["score"],
        "shift_flagged": record["shift"]["slides"][lib]["flagged"],
    }


def main() -> None:
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("STEXP_DATA_DIR"))
    parser.add_argument("--mpp", type=float, default=3.6, help="µm/px the matched fit embeds the training slides at")
    parser.add_argument("--jpeg-quality", type=int, default=8, help="JPEG quality of the export fit")
    args = parser.parse_args()
    if not args.data_dir:
        sys.exit("set STEXP_DATA_DIR (e.g. ../shared/data) or pass --data-dir")
    data_dir = Path(args.data_dir)
    data_dir = data_dir / "her2st" if (data_dir / "her2st").is_dir() else data_dir
    rows = run(data_dir, args.mpp, args.jpeg_quality)
    command = f"python benchmarks/resolution.py --mpp {args.mpp:g} --jpeg-quality {args.jpeg_quality}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "resolution.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    table = pd.DataFrame(rows)
    mean = table.groupby(["rendering", "fit"], sort=False)[["pcc_acg", "pcc_heg"]].mean()
    lines = [
        "# Slides exported at low resolution: what predict says, and refitting at their resolution (HER2+ LOPO)",
        "",
        f"Command: `{command}`. Held-out slides B4, C2, C4 predicted from their `lowdark`, `lowdark_jpeg2` and "
        "`combined2` renderings "
        "(hires image only, ~3.6 µm/px); `default`: training slides at full resolution; `matched`: training slides "
        f"embedded with `mpp={args.mpp:g}`; `export`: with `mpp={args.mpp:g}, jpeg_quality={args.jpeg_quality}`.",
        "",
        "| rendering | fit | held out | PCC(ACG) | PCC(HEG) | times coarser | reported | JPEG blockiness | reported | "
        "quality | deblocked | shift score | flagged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["rendering"], r["fit"], r["held_out"])):
        lines.append(
            f"| {r['rendering']} | {r['fit']} | {r['held_out']} | {r['pcc_acg']:.3f} | {r['pcc_heg']:.3f} | "
            f"{r['times_coarser']} | {r['reported_coarser']} | {r['jpeg_blockiness']} | {r['reported_jpeg']} | "
            f"{r['estimated_quality']} | {r['deblocked']} | {r['shift_score']:.2f} | {r['shift_flagged']} |"
        )
    lines += ["", "Mean over the held-out slides:", ""]
    lines += [
        f"- {rendering}, {fit}: PCC(ACG) {m['pcc_acg']:.3f}, PCC(HEG) {m['pcc_heg']:.3f}"
        for (rendering, fit), m in mean.iterrows()
    ]
    (RESULTS / "resolution.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
