"""Reading benchmark: read every HER2+ image section and cut every spot's patch; time and peak memory.

Data: the HER2+ sections with a full-resolution H&E image (B4, C2-C6; Andersson et al., Nat. Commun.
12, 6012 (2021)) from ``$STEXP_DATA_DIR/her2st``. Each slide is decoded once, its patches cut
(150 µm, resampled to 224 px) and the slide released before the next one, as ``embed_images`` does.

Usage::

    STEXP_DATA_DIR=../shared/data python benchmarks/read_patches.py
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from _memory import peak_rss_mb

SECTIONS = ["B4", "C2", "C3", "C4", "C5", "C6"]
OUT = Path(__file__).parent / "results" / "read_patches.json"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="folder holding her2st/ (default $STEXP_DATA_DIR)")
    p.add_argument("--out-px", type=int, default=224)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)

    import stexp
    from stexp.images import read_patches, slide_view

    stexp.settings.verbosity = 1
    data_dir = Path(args.data_dir or os.environ.get("STEXP_DATA_DIR", "")) / "her2st"
    rss_start = peak_rss_mb()
    t0 = time.perf_counter()
    adata = stexp.datasets.her2st(SECTIONS, path=data_dir, download=False)
    t_read = time.perf_counter() - t0
    t_decode = t_cut = 0.0
    n_patches, checksum = 0, 0.0
    for lib in adata.obs["library_id"].astype(str).unique():
        t = time.perf_counter()
        slide = slide_view(adata, lib).decode()
        t_decode += time.perf_counter() - t
        t = time.perf_counter()
        patches = read_patches(adata, lib, out_px=args.out_px, image=slide)
        t_cut += time.perf_counter() - t
        n_patches += len(patches)
        checksum += float(patches.mean())
        del slide, patches  # one decoded slide at a time
    result = {
        "sections": SECTIONS,
        "n_spots": int(adata.n_obs),
        "n_patches": n_patches,
        "out_px": args.out_px,
        "read_counts_and_spots_s": round(t_read, 2),
        "decode_s": round(t_decode, 2),
        "cut_s": round(t_cut, 2),
        "total_s": round(t_read + t_decode + t_cut, 2),
        "patches_per_s_cut": round(n_patches / t_cut, 1),
        "peak_rss_mb": round(peak_rss_mb(), 0),
        "rss_after_imports_mb": round(rss_start, 0),
        "mean_patch_intensity": round(checksum / 6, 1),
    }
    assert np.isfinite(result["mean_patch_intensity"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
