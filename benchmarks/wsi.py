"""Whole-slide benchmark: read_wsi -> embed -> predict -> write on a > 40,000 px pyramidal TIFF, in bounded memory.

Data: a mosaic of the six HER2+ H&E JPEGs (B4, C2-C6; Andersson et al., Nat. Commun. 12, 6012 (2021)),
``--cells`` x ``--cells`` squares of 10,240 px (default 4 x 4: 40,960 x 40,960 px, 1.7 Gpx), written by
``benchmarks/_make_wsi.py`` as a tiled, JPEG-compressed pyramidal TIFF with TIFF resolution tags under
``/tmp/stexp_wsi`` (never committed). The model is a ridge on frozen EfficientNet-Lite0 features of the
785-gene HER2+ panel, fitted on sections B4 and C2.

Three measurements, each in its own child process (``VmHWM`` is that process's own peak):

- ``pipeline``: ``stexp.io.read_wsi`` (55 µm pseudo-spots on a ``--spacing-um`` grid, default 90 µm: > 20,000
  spots on the 4 x 4 mosaic, whose tissue covers 16% of it) -> ``stexp.pp.embed_images``
  (the slide read region by region, ``cache=False``) -> ``stexp.tl.predict`` -> ``write_h5ad``: spots, the
  time of each step and the peak resident memory. In the same process, the encoder's forward-only rate on
  in-memory tensors of the same batch size (before and after, the faster counts) and the ratio of the
  end-to-end embedding rate to it.
- ``rate``: ``--rounds`` paired rounds (forward-only on 2 batches of in-memory tensors, then
  ``embed_images`` of as many new pseudo-spots read from the slide): the median ratio cancels the load
  drift of a shared machine.
- ``compare``: section B4 as its JPEG and as a pyramidal TIFF of the same pixels (lossless tiles): the
  pseudo-spots of ``read_wsi`` on each and the features of the 283 measured ST spots embedded from each.

Usage::

    STEXP_DATA_DIR=../shared/data python benchmarks/wsi.py                    # full run
    STEXP_DATA_DIR=../shared/data python benchmarks/wsi.py --max-spots 3000   # rate on a subset of spots
    STEXP_DATA_DIR=../shared/data python benchmarks/wsi.py --only compare
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _memory import peak_rss_mb

WORK = Path("/tmp/stexp_wsi")
OUT = Path(__file__).parent / "results" / "wsi.json"
UM_PER_PX = 0.7325  # of the HER2+ JPEGs (section B4, from its 200 µm spot pitch)


def _data_dir(args) -> Path:
    return Path(args.data_dir or os.environ.get("STEXP_DATA_DIR", ""))


def _model(args) -> Path:
    """A ridge model of the 785-gene HER2+ panel on EfficientNet-Lite0 features of B4 and C2 (fitted once)."""
    import stexp

    path = WORK / "model_ridge_785"
    if (path / "model.json").is_file():
        return path
    stexp.settings.verbosity = 1
    her2 = _data_dir(args) / "her2st"
    adata = stexp.datasets.her2st(["B4", "C2"], path=her2, download=False, image_res="lowres")
    panel = [g.strip() for g in (her2 / "her2st_785_genes.txt").read_text().split() if g.strip()]
    adata = adata[:, [g for g in panel if g in adata.var_names]].copy()
    stexp.pp.embed_images(adata, encoder="efficientnet_lite0")
    model = stexp.tl.fit(adata, model="ridge")
    return model.save(path, overwrite=True)


def _slide(args) -> Path:
    path = WORK / f"her2st_mosaic_{args.cells}x{args.cells}.tif"
    if not path.is_file():
        sys.path.insert(0, str(Path(__file__).parent))
        from _make_wsi import make_slide

        print(f"building {path} ...", flush=True)
        make_slide(path, _data_dir(args), cells=args.cells, um_per_px=UM_PER_PX)
    return path


def _load_model(args):
    """The model to predict with and its encoder spec, with stexp quiet and torch on ``--threads``."""
    import torch

    import stexp

    stexp.settings.verbosity = 1
    if args.threads:
        stexp.settings.n_jobs = args.threads
    torch.set_num_threads(stexp.settings.n_jobs)
    model = stexp.models.load(args.model, device="cpu")
    return model, model.encoder_spec


def _pipeline(args) -> dict:
    """read_wsi -> embed -> predict -> write, in this process."""
    import torch

    import stexp
    from stexp.images import build_encoder

    model, spec = _load_model(args)
    t = {}
    t0 = time.perf_counter()
    adata = stexp.io.read_wsi(args.slide, genes=list(model.genes), spacing_um=args.spacing_um)
    t["read_wsi_s"] = time.perf_counter() - t0
    n_all = adata.n_obs
    if args.max_spots and args.max_spots < adata.n_obs:  # evenly spread subset, for the rate only
        adata = adata[np.linspace(0, adata.n_obs - 1, args.max_spots).round().astype(int)].copy()
    t0 = time.perf_counter()
    enc = build_encoder(spec.encoder, spec.weights_arg)
    t["build_encoder_s"] = time.perf_counter() - t0
    bs = args.batch_size
    x = enc.preprocess(np.random.default_rng(0).integers(0, 256, (bs, enc.input_px, enc.input_px, 3), dtype=np.uint8))

    def forward_rate() -> float:
        n = args.forward_patches
        with torch.inference_mode():
            for _ in range(2):
                enc.module(x)
            t1 = time.perf_counter()
            done = 0
            while done < n:
                enc.module(x[: min(bs, n - done)])
                done += min(bs, n - done)
            return n / (time.perf_counter() - t1)

    rates = [forward_rate()]
    t0 = time.perf_counter()
    stexp.pp.embed_images(
        adata, encoder=enc, patch_um=spec.patch_um_value, key_added=model.features_key, batch_size=bs,
        device="cpu", cache=False,
    )  # fmt: skip
    t["embed_s"] = time.perf_counter() - t0
    rates.append(forward_rate())
    t0 = time.perf_counter()
    stexp.tl.predict(adata, model, device="cpu")
    t["predict_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = WORK / "prediction.h5ad"
    adata.write_h5ad(out)
    t["write_s"] = time.perf_counter() - t0
    from stexp.images import RegionReader

    with RegionReader(args.slide) as r:
        dims, levels = r.dimensions, len(r.level_dimensions)
    e2e = adata.n_obs / t["embed_s"]
    fwd = max(rates)
    return {
        "slide": str(args.slide),
        "slide_px": list(dims),
        "slide_levels": levels,
        "slide_bytes": Path(args.slide).stat().st_size,
        "n_pseudo_spots": n_all,
        "n_spots_embedded": adata.n_obs,
        "n_genes": len(model.genes),
        "batch_size": bs,
        "threads": stexp.settings.n_jobs,
        **{k: round(v, 2) for k, v in t.items()},
        "total_s": round(sum(v for k, v in t.items() if k != "build_encoder_s"), 1),
        "embed_patches_per_s": round(e2e, 1),
        "forward_patches_per_s": round(fwd, 1),
        "forward_patches_per_s_runs": [round(r, 1) for r in rates],
        "ratio_to_forward": round(e2e / fwd, 3),
        "peak_rss_mb": round(peak_rss_mb(), 0),
        "output_bytes": out.stat().st_size,
    }


def _rate(args) -> dict:
    """Paired rounds: forward-only on in-memory tensors, then end-to-end embedding of as many new spots.

    On a shared machine the load drifts within minutes; pairing each end-to-end round with a forward-only
    round measured right before it cancels most of the drift. The ratio reported is the median over rounds.
    """
    import torch

    import stexp
    from stexp.images import build_encoder

    model, spec = _load_model(args)
    adata = stexp.io.read_wsi(args.slide, genes=list(model.genes), spacing_um=args.spacing_um)
    enc = build_encoder(spec.encoder, spec.weights_arg)
    bs, n = args.batch_size, 2 * args.batch_size
    x = enc.preprocess(np.random.default_rng(0).integers(0, 256, (bs, enc.input_px, enc.input_px, 3), dtype=np.uint8))
    with torch.inference_mode():
        enc.module(x)
    order = np.random.default_rng(0).permutation(adata.n_obs)
    rounds = []
    for r in range(args.rounds):
        with torch.inference_mode():
            t0 = time.perf_counter()
            for _ in range(n // bs):
                enc.module(x)
            fwd = n / (time.perf_counter() - t0)
        sub = adata[np.sort(order[r * n : (r + 1) * n])].copy()
        t0 = time.perf_counter()
        stexp.pp.embed_images(sub, encoder=enc, patch_um=spec.patch_um_value, batch_size=bs, device="cpu", cache=False)
        e2e = n / (time.perf_counter() - t0)
        rounds.append({"forward_patches_per_s": round(fwd, 2), "embed_patches_per_s": round(e2e, 2)})
    ratios = [r["embed_patches_per_s"] / r["forward_patches_per_s"] for r in rounds]
    return {
        "rounds": rounds,
        "patches_per_round": n,
        "batch_size": bs,
        "ratio_median": round(float(np.median(ratios)), 3),
        "ratio_of_totals": round(
            sum(r["embed_patches_per_s"] for r in rounds) / sum(r["forward_patches_per_s"] for r in rounds), 3
        ),
    }


def _b4_tiff(jpeg: Path) -> Path:
    """Section B4's JPEG pixels as a tiled pyramidal TIFF (lossless zlib tiles, levels by 2x2 box filter)."""
    import tifffile
    from PIL import Image

    path = WORK / "B4_pyramid.tif"
    if path.is_file():
        return path
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(jpeg) as im:
        level = im.convert("RGB")
    levels = [level]
    while max(levels[-1].size) > 1000:
        levels.append(levels[-1].reduce(2))
    res = (1e4 / UM_PER_PX, 1e4 / UM_PER_PX)
    tmp = path.with_suffix(".partial.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for i, lv in enumerate(levels):
            extra = {"subifds": len(levels) - 1} if i == 0 else {"subfiletype": 1}
            tw.write(np.asarray(lv), tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(res[0] / 2**i, res[1] / 2**i), resolutionunit="CENTIMETER", **extra)  # fmt: skip
    tmp.replace(path)
    return path


def _compare(args) -> dict:
    """B4 as JPEG and as pyramidal TIFF: pseudo-spots and features."""
    import stexp
    from stexp.images import build_encoder

    stexp.settings.verbosity = 1
    her2 = _data_dir(args) / "her2st"
    st = stexp.datasets.her2st(["B4"], path=her2, download=False, image_res="lowres")
    jpeg = Path(st.uns["spatial"]["B4"]["metadata"]["source_image_path"])
    tiff = _b4_tiff(jpeg)
    # pseudo-spots
    a_j = stexp.io.read_wsi(jpeg, mpp=UM_PER_PX, library_id="B4")
    a_t = stexp.io.read_wsi(tiff, library_id="B4")
    common = a_j.obs_names.intersection(a_t.obs_names)
    d_xy = np.abs(a_j[common].obsm["spatial"] - a_t[common].obsm["spatial"]).max()
    # features of the measured ST spots, from each file
    enc = build_encoder("efficientnet_lite0", "imagenet")
    feats = {}
    for name, path in (("jpeg", jpeg), ("tiff", tiff)):
        a = st.copy()
        a.uns["spatial"]["B4"]["metadata"]["source_image_path"] = str(path)
        stexp.pp.embed_images(a, encoder=enc, cache=False, key_added="X")
        feats[name] = np.asarray(a.obsm["X"], dtype=np.float64)
    fj, ft = feats["jpeg"], feats["tiff"]
    diff = np.abs(fj - ft)
    cos = (fj * ft).sum(1) / (np.linalg.norm(fj, axis=1) * np.linalg.norm(ft, axis=1))
    return {
        "pseudo_spots_jpeg": int(a_j.n_obs),
        "pseudo_spots_tiff": int(a_t.n_obs),
        "pseudo_spots_common": int(len(common)),
        "pseudo_spot_max_xy_diff_px": float(d_xy),
        "st_spots": int(st.n_obs),
        "feature_max_abs_diff": float(diff.max()),
        "feature_max_abs_diff_over_feature_std": float((diff / (fj.std(0) + 1e-12)).max()),
        "feature_mean_abs_diff": float(diff.mean()),
        "feature_min_cosine": float(cos.min()),
    }


def _child(args, what: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", what, "--worker-out", str(WORK / f"{what}.json")]
    for opt in (
        "cells",
        "spacing_um",
        "rounds",
        "max_spots",
        "forward_patches",
        "batch_size",
        "threads",
        "data_dir",
        "slide",
        "model",
    ):
        val = getattr(args, opt)
        if val is not None:
            cmd += [f"--{opt.replace('_', '-')}", str(val)]
    proc = subprocess.run(cmd, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode})")
    return json.loads((WORK / f"{what}.json").read_text())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=4, help="mosaic of cells x cells HER2+ images (10,240 px each)")
    p.add_argument("--spacing-um", type=float, default=90.0, help="pseudo-spot grid spacing (µm)")
    p.add_argument("--max-spots", type=int, default=0, help="embed an even subset of the pseudo-spots (0: all)")
    p.add_argument("--forward-patches", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32, help="as stexp predict's default")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--only", choices=("pipeline", "rate", "compare"), default=None)
    p.add_argument("--rounds", type=int, default=6, help="paired forward / end-to-end rounds of the rate")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--slide", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.worker:
        result = {"pipeline": _pipeline, "rate": _rate, "compare": _compare}[args.worker](args)
        Path(args.worker_out).write_text(json.dumps(result))
        return

    result = {
        "command": "python benchmarks/wsi.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
    }
    out = Path(args.out)
    if out.is_file():  # keep the other part of an earlier run
        result = json.loads(out.read_text()) | result
    if args.only in (None, "pipeline"):
        args.slide, args.model = str(_slide(args)), str(_model(args))
        result["pipeline"] = _child(args, "pipeline")
        print(json.dumps(result["pipeline"], indent=2), flush=True)
    if args.only in (None, "rate"):
        args.slide, args.model = str(_slide(args)), str(_model(args))
        result["rate"] = _child(args, "rate")
        print(json.dumps(result["rate"], indent=2), flush=True)
    if args.only in (None, "compare"):
        result["compare"] = _child(args, "compare")
        print(json.dumps(result["compare"], indent=2), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
