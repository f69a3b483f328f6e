"""Cold start of the shipped model: ``stexp predict SLIDE --model her2st-breast`` on a pyramidal TIFF.

What a user without paired data runs first: a fresh process (imports, the shipped model loaded from the
package, the slide opened, pseudo-spots gridded over its tissue, every patch embedded, the prediction, its
shift score and summary written). The slide is the mosaic of ``benchmarks/_make_wsi.py`` (``--cells`` x
``--cells`` squares of the six HER2+ JPEGs at 0.7325 µm/px; 4 x 4 gives ~21,000 pseudo-spots on a 90 µm grid),
built under ``/tmp/stexp_wsi`` if missing. The CLI runs as a child process; its wall time is timed here, its
spots, time and peak resident memory are read from the summary it prints. Nothing here is downloaded.

Usage::

    STEXP_DATA_DIR=../shared/data python benchmarks/cold_start.py --cells 4     # ~21k spots (~20 min on 2 cores)
    STEXP_DATA_DIR=../shared/data python benchmarks/cold_start.py --cells 1     # ~1.5k spots

Results: ``benchmarks/results/cold_start.{json,md}`` (one row per ``--cells``, merged across runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _make_wsi import make_slide

RESULTS = Path(__file__).parent / "results"
UM_PER_PX = 0.7325  # of the HER2+ JPEGs (as benchmarks/wsi.py)
SUMMARY = {
    "spots": re.compile(r"^spots\s+(\d+)", re.M),
    "cli_seconds": re.compile(r"^time\s+([\d.]+) s", re.M),
    "peak_mb": re.compile(r"^memory\s+peak (\d+) MB", re.M),
    "shift": re.compile(r"^shift\s+\S+: ([\d.]+)", re.M),
    "trusted": re.compile(r"^trusted\s+(\d+) of", re.M),
}
EMBED_RATE = re.compile(r"embed [^:]+: 100%[^\]]*?([\d.]+)spot/s\]")


def run(cells: int, data_dir: Path, spacing_um: float, model: str) -> dict:
    slide = Path("/tmp/stexp_wsi") / f"her2st_mosaic_{cells}x{cells}.tif"
    if not slide.exists():
        make_slide(slide, data_dir, cells=cells, um_per_px=UM_PER_PX)
    out = Path("/tmp/stexp_cold_start") / f"{cells}x{cells}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    stexp_cli = Path(sys.executable).with_name("stexp")
    command = [str(stexp_cli), "predict", str(slide), "--model", model, "--out", str(out / "pred.h5ad")]
    command += ["--spacing-um", str(spacing_um)]
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"stexp predict failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return parse(proc.stdout + proc.stderr, cells, model, wall)


def parse(text: str, cells: int, model: str, wall: float) -> dict:
    """One result row from the CLI's output ``text`` and the process's ``wall`` seconds."""
    row: dict = {"cells": cells, "slide_px": cells * 10240, "model": model, "wall_seconds": round(wall, 1)}
    for key, pattern in SUMMARY.items():
        match = pattern.search(text)
        row[key] = None if match is None else float(match.group(1))
    rates = EMBED_RATE.findall(text)
    row["embed_spots_per_s"] = float(rates[-1]) if rates else None
    if row["spots"] and row["embed_spots_per_s"]:
        row["outside_embedding_seconds"] = round(wall - row["spots"] / row["embed_spots_per_s"], 1)
    return row


def report(rows: list[dict], machine: str) -> str:
    lines = [
        "# Cold start of the shipped model",
        "",
        f"`stexp predict SLIDE --model her2st-breast --spacing-um 90` in a fresh process on {machine}, CPU; "
        "SLIDE a pyramidal TIFF mosaic of the HER2+ JPEGs (`benchmarks/cold_start.py --cells N`). Wall: the "
        "whole process; outside embedding: wall minus spots / embedding rate (imports, model load, tissue "
        "detection, retrieval, shift score, writing the h5ad and the figure).",
        "",
        "| mosaic | pseudo-spots | wall s | embedding spots/s | outside embedding s | peak MB | shift score | genes trusted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["cells"]):
        lines.append(
            f"| {r['cells']}x{r['cells']} ({r['slide_px']:,} px) | {r['spots']:,.0f} | {r['wall_seconds']} "
            f"| {r['embed_spots_per_s']} | {r.get('outside_embedding_seconds')} | {r['peak_mb']:.0f} "
            f"| {r['shift']} | {r['trusted']:.0f} |"
        )
    logged = [f"{r['cells']}x{r['cells']}" for r in rows if r.get("measured_with")]
    if logged:
        lines += [
            "",
            f"Rows {', '.join(logged)}: the same command run under `/usr/bin/time -v` (the output read back with "
            "`--from-log`), not as a child of this script.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("STEXP_DATA_DIR"))
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--spacing-um", type=float, default=90.0)
    parser.add_argument("--model", default="her2st-breast")
    parser.add_argument(
        "--from-log",
        type=Path,
        help="read the row from the output of `/usr/bin/time -v stexp predict ...` of the same command instead",
    )
    args = parser.parse_args(argv)
    if args.from_log:
        text = args.from_log.read_text()
        h, m, s = re.search(
            r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", text
        ).groups()
        row = parse(text, args.cells, args.model, int(h or 0) * 3600 + int(m) * 60 + float(s))
        row["measured_with"] = "/usr/bin/time -v"
    elif not args.data_dir:
        raise SystemExit("set STEXP_DATA_DIR or --data-dir (the folder with her2st/)")
    else:
        row = run(args.cells, Path(args.data_dir), args.spacing_um, args.model)
    print(row, flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "cold_start.json"
    rows = json.loads(path.read_text())["runs"] if path.exists() else []
    rows = [r for r in rows if r["cells"] != row["cells"]] + [row]
    machine = f"{platform.node()} ({os.cpu_count()} cores)"
    path.write_text(json.dumps({"machine": machine, "runs": rows}, indent=1))
    (RESULTS / "cold_start.md").write_text(report(rows, machine))
    print(report(rows, machine))


if __name__ == "__main__":
    main()
