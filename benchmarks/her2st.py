"""HER2+ benchmark: every registered model beside the baselines, on the same frozen features and folds.

Data: the HER2-positive breast tumour sections with images (B4, C2-C6; patients B and C) of
Andersson et al., Nat. Commun. 12, 6012 (2021), read with :func:`stexp.datasets.her2st` from
``$STEXP_DATA_DIR/her2st`` (or ``--data-dir``). Features: EfficientNet-Lite0 (ImageNet weights that
install offline) through :func:`stexp.pp.embed_images` (cached on disk). Genes: the 785-gene panel of
the HisToGene / Hist2ST / mclSTExp evaluations, restricted to the genes present in every section.

Protocols
    ``lopo``  leave-one-patient-out: train on patient B, predict patient C, and the reverse.
    ``loso``  leave-one-section-out: six folds; optimistic, because the serial sections of patient C
              stay in training when one of them is held out.
    Shuffled-image control (``--controls``): the same cross-validation with the features permuted
    among the spots of each slide; a model that still scores above zero learns something other
    than the image.

Each (protocol, model) runs in its own process so that its peak memory (``VmHWM``) is its
own. Results go to ``benchmarks/results/her2st.json`` and ``her2st.md``.

Usage::

    STEXP_DATA_DIR=../shared/data python benchmarks/her2st.py            # full run
    STEXP_DATA_DIR=../shared/data python benchmarks/her2st.py --quick    # minutes: 3 sections, 2 epochs
    python benchmarks/her2st.py --models mean,ridge,knn --protocols lopo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
from _memory import peak_rss_mb

SECTIONS = ["B4", "C2", "C3", "C4", "C5", "C6"]
QUICK_SECTIONS = ["B4", "C2", "C3"]
ENCODER = "efficientnet_lite0"
FEATURES_KEY = f"X_stexp_{ENCODER}"
PROTOCOLS = {
    "lopo": ("patient", "leave-one-patient-out"),
    "loso": ("library_id", "leave-one-section-out"),
}
#: Epoch caps that keep the full run under ~30 min on 2 CPU cores (``--epochs`` overrides; ``None``: model default).
DEFAULT_EPOCHS: dict[str, int | None] = {"mlp": 50, "mclstexp": 90, "nh2st": 60}
CONTROL_MODELS = ("ridge", "mclstexp")
METRICS = ("pcc_acg", "pcc_heg", "pcc_hvg", "mse", "mae")
#: Published numbers, for context only (different sections, genes, features and protocols).
PUBLISHED = (
    "mclSTExp (Min et al. 2024), 32 HER2+ sections, leave-one-section-out, 785 genes, DenseNet-121 fine-tuned: "
    "PCC(ACG) 0.232, PCC(HEG) 0.392, MSE 0.58, MAE 0.57 (their target scale differs). HEST-benchmark "
    "(patient splits, ridge on frozen features): ImageNet ResNet-50 0.326 averaged over 9 tasks."
)


# -- preparation (parent process) -------------------------------------------------------------
def _data_dir(arg: str | None) -> Path:
    value = arg or os.environ.get("STEXP_DATA_DIR")
    if not value:
        sys.exit("set STEXP_DATA_DIR (e.g. ../shared/data) or pass --data-dir")
    path = Path(value)
    return path / "her2st" if (path / "her2st").is_dir() else path


def prepare(her2st_dir: Path, sections: list[str], out: Path) -> dict:
    """Read the sections, embed their images (cached), pick the panel; write a slim h5ad for the workers."""
    import stexp

    t0 = time.perf_counter()
    adata = stexp.datasets.her2st(sections, path=her2st_dir)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    stexp.pp.embed_images(adata, encoder=ENCODER, weights="imagenet")
    t_embed = time.perf_counter() - t0
    panel_file = her2st_dir / "her2st_785_genes.txt"
    panel = [g.strip() for g in panel_file.read_text().split() if g.strip()]
    genes = [g for g in panel if g in adata.var_names]
    slim = adata.copy()
    for lib in list(slim.uns["spatial"]):
        entry = slim.uns["spatial"][lib]
        slim.uns["spatial"][lib] = {"scalefactors": dict(entry["scalefactors"])}
    keep = {k: v for k, v in slim.uns.items() if k in ("spatial",)}
    keep["stexp"] = {"features": {FEATURES_KEY: dict(adata.uns["stexp"]["features"][FEATURES_KEY])}}
    slim.uns = keep
    slim.obsm = {k: slim.obsm[k] for k in ("spatial", FEATURES_KEY)}
    slim.uns["benchmark_genes"] = np.asarray(genes, dtype=object)
    slim.write_h5ad(out)
    spec = adata.uns["stexp"]["features"][FEATURES_KEY]
    return {
        "sections": sections,
        "n_spots": {lib: int(n) for lib, n in adata.obs["library_id"].value_counts(sort=False).items()},
        "patients": sorted(adata.obs["patient"].astype(str).unique()),
        "n_genes_data": int(adata.n_vars),
        "n_panel_genes": len(panel),
        "n_genes": len(genes),
        "features": {k: spec.get(k) for k in ("encoder", "weights", "patch_um", "patch_px", "normalization")},
        "feature_dim": int(adata.obsm[FEATURES_KEY].shape[1]),
        "read_seconds": round(t_read, 1),
        "embed_seconds": round(t_embed, 1),
    }


# -- one (protocol, model) run (child process) ---------------------------------------------------
def _shuffle_within_slides(adata, key: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    feats = np.asarray(adata.obsm[key]).copy()
    libs = adata.obs["library_id"].astype(str).to_numpy()
    for lib in np.unique(libs):
        idx = np.flatnonzero(libs == lib)
        feats[idx] = feats[rng.permutation(idx)]
    adata.obsm[key] = feats


def worker(args: argparse.Namespace) -> None:
    import anndata as ad
    import torch

    import stexp
    from stexp.models import get_model_class

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    stexp.settings.verbosity = 1
    adata = ad.read_h5ad(args.input)
    genes = list(adata.uns["benchmark_genes"])
    if args.shuffle:
        _shuffle_within_slides(adata, FEATURES_KEY, seed=args.seed)
    cls = get_model_class(args.model)
    # Import what the fits need before timing them (importing Lightning alone takes seconds).
    import lightning.pytorch  # noqa: F401
    import sklearn.decomposition
    import sklearn.linear_model
    import sklearn.model_selection  # noqa: F401

    # Each model's own lr/weight_decay/batch_size, recorded in the results.
    params = {k: cls.default_hparams[k] for k in ("lr", "weight_decay", "batch_size") if k in cls.default_hparams}
    if "max_epochs" in cls.default_hparams and args.epochs is not None:
        params["max_epochs"] = args.epochs
    if "seed" in cls.default_hparams:
        params["seed"] = args.seed
    rss_before = peak_rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    res = stexp.tl.cross_validate(
        adata,
        model=args.model,
        split_by=PROTOCOLS[args.protocol][0],
        features_key=FEATURES_KEY,
        genes=genes,
        model_params={args.model: params},
        device=args.device,
    )
    wall = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {
        "protocol": args.protocol,
        "model": args.model,
        "shuffled": bool(args.shuffle),
        "params": params,
        "wall_seconds": wall,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": rss_before,
        "tracemalloc_peak_mb": traced_peak / 2**20,
        "per_fold": json.loads(res.per_fold.to_json(orient="records")),
    }
    Path(args.output).write_text(json.dumps(out, indent=1))


# -- report -------------------------------------------------------------------------------------
def _fmt(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if not np.isnan(std) else f"{mean:.3f}"


def _summary_rows(runs: list[dict]) -> pd.DataFrame:
    rows = []
    for run in runs:
        pf = pd.DataFrame(run["per_fold"])
        name = run["model"] + (" (shuffled images)" if run["shuffled"] else "")
        row = {"protocol": run["protocol"], "model": name}
        for m in METRICS:
            row[m] = pf[m].mean()
            row[f"{m}_std"] = pf[m].std(ddof=1) if len(pf) > 1 else np.nan
        row["n_slides"] = len(pf)
        row["n_constant"] = int(pf["n_constant"].sum())
        folds = pf.drop_duplicates("fold")
        row["fit_seconds"] = folds["fit_seconds"].sum()
        row["predict_seconds"] = folds["predict_seconds"].sum()
        row["peak_rss_mb"] = run["peak_rss_mb"]
        epochs = run["params"].get("max_epochs")  # no validation slide in cross-validation: every epoch runs
        row["seconds_per_epoch"] = row["fit_seconds"] / (len(folds) * epochs) if epochs else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def verdict(summary: pd.DataFrame, protocol: str, runs: list[dict]) -> str:
    """One honest line: does mclSTExp beat ridge on the same features and folds?"""
    s = summary[summary["protocol"] == protocol].set_index("model")
    if "mclstexp" not in s.index or "ridge" not in s.index:
        return "Verdict: mclSTExp or ridge was not run, no comparison."
    per_slide = {
        r["model"]: pd.DataFrame(r["per_fold"]).set_index("library_id")["pcc_acg"]
        for r in runs
        if r["protocol"] == protocol and not r["shuffled"] and r["model"] in ("mclstexp", "ridge")
    }
    diff = per_slide["mclstexp"] - per_slide["ridge"].reindex(per_slide["mclstexp"].index)
    wins = int((diff > 0).sum())
    mcl, ridge = s.loc["mclstexp", "pcc_acg"], s.loc["ridge", "pcc_acg"]
    if mcl > ridge and wins > len(diff) / 2:
        word = "beats"
    elif mcl > ridge:
        word = "has a higher mean than, but does not consistently beat,"
    else:
        word = "does NOT beat"
    return (
        f"Verdict: mclSTExp {word} the ridge probe on the same features "
        f"(PCC(ACG) {mcl:.3f} vs {ridge:.3f}; higher on {wins} of {len(diff)} test slides)."
    )


def write_report(info: dict, runs: list[dict], out_dir: Path, command: str, total_seconds: float) -> str:
    summary = _summary_rows(runs)
    lines = [
        "# HER2+ benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads {os.cpu_count()}; "
        f"total {total_seconds / 60:.1f} min (embedding {info['embed_seconds']:.0f} s, cached after the first run).  ",
        f"Sections: {', '.join(f'{k} ({v} spots)' for k, v in info['n_spots'].items())}; patients {info['patients']}.  ",
        f"Genes: {info['n_genes']} of the {info['n_panel_genes']}-gene HER2+ panel present in every section.  ",
        f"Features: {info['features']['encoder']} ({info['features']['weights']}), {info['feature_dim']}-d, "
        f"patch {info['features']['patch_um']} µm resampled to {info['features']['patch_px']} px.  ",
        "Scores per test slide (Pearson across the slide's spots, per gene), then mean ± std over test slides; "
        "MSE/MAE on log1p(counts per 10k). The mean baseline predicts a constant, so its Pearson is undefined (n/a). "
        "Time: fit + predict over all folds; s/epoch: training seconds per epoch of one fold. Memory: peak RSS of the process running that model (data included).",
        "",
    ]
    for protocol in dict.fromkeys(summary["protocol"]):
        split_by, title = PROTOCOLS[protocol]
        s = summary[summary["protocol"] == protocol]
        lines += [f"## {title} (`split_by={split_by!r}`)", ""]
        if protocol == "lopo":
            lines += ["Train on patient B (B4), predict patient C (C2-C6), and the reverse.", ""]
        else:
            lines += ["Optimistic: serial sections of the held-out section's patient stay in training.", ""]
        lines += [
            "| model | PCC(ACG) | PCC(HEG) | PCC(HVG) | MSE | MAE | fit+predict (s) | s/epoch | peak RSS (MB) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for _, r in s.iterrows():
            cells = [_fmt(r[m], r[f"{m}_std"]) for m in METRICS]
            t = r["fit_seconds"] + r["predict_seconds"]
            per_epoch = "" if np.isnan(r["seconds_per_epoch"]) else f"{r['seconds_per_epoch']:.2f}"
            lines.append(f"| {r['model']} | {' | '.join(cells)} | {t:.1f} | {per_epoch} | {r['peak_rss_mb']:.0f} |")
        lines += ["", verdict(summary, protocol, runs), ""]
    # Per-slide breakdown.
    lines += ["## Per-slide PCC(ACG)", ""]
    per = []
    for run in runs:
        pf = pd.DataFrame(run["per_fold"])
        col = f"{run['protocol']}: {run['model']}" + (" (shuffled)" if run["shuffled"] else "")
        per.append(pf.set_index("library_id")["pcc_acg"].rename(col))
    table = pd.concat(per, axis=1)
    lines += [table.to_markdown(floatfmt=".3f"), ""]
    lines += ["## Published numbers (context only, not comparable)", "", PUBLISHED, ""]
    text = "\n".join(lines)
    (out_dir / "her2st.md").write_text(text)
    payload = {
        "info": info,
        "command": command,
        "total_seconds": total_seconds,
        "summary": json.loads(summary.to_json(orient="records")),
        "runs": runs,
    }
    (out_dir / "her2st.json").write_text(json.dumps(payload, indent=1))
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="her2st folder or its parent (default: $STEXP_DATA_DIR)")
    parser.add_argument("--models", default=None, help="comma-separated (default: every registered model)")
    parser.add_argument("--protocols", default="lopo,loso")
    parser.add_argument("--controls", default=",".join(CONTROL_MODELS), help="models also run on shuffled images")
    parser.add_argument("--epochs", type=int, default=None, help="max_epochs of every neural model")
    parser.add_argument("--quick", action="store_true", help="3 sections, 2 epochs: a smoke run of minutes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    # internal: one (protocol, model) run in a child process
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--protocol", help=argparse.SUPPRESS)
    parser.add_argument("--shuffle", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    import stexp

    t_start = time.perf_counter()
    models = args.models.split(",") if args.models else stexp.models.available_models()
    available = []
    for m in models:
        try:
            stexp.models.get_model_class(m)
            available.append(m)
        except (KeyError, ImportError) as err:
            print(f"skipping model {m!r}: {err}", flush=True)
    protocols = [p for p in args.protocols.split(",") if p]
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        sys.exit(f"unknown protocol(s) {unknown}; choose from {sorted(PROTOCOLS)}")
    controls = [m for m in args.controls.split(",") if m in available]
    sections = QUICK_SECTIONS if args.quick else SECTIONS
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/her2st.py " + " ".join(argv if argv is not None else sys.argv[1:])

    with tempfile.TemporaryDirectory() as tmp:
        h5ad = Path(tmp) / "her2st_features.h5ad"
        info = prepare(_data_dir(args.data_dir), sections, h5ad)
        print(
            f"prepared {sum(info['n_spots'].values())} spots, {info['n_genes']} genes in {info['embed_seconds']} s",
            flush=True,
        )
        jobs = [(p, m, False) for p in protocols for m in available] + [
            (p, m, True) for p in protocols[:1] for m in controls
        ]
        runs = []
        for protocol, model, shuffled in jobs:
            epochs = 2 if args.quick else (args.epochs if args.epochs is not None else DEFAULT_EPOCHS.get(model))
            part = Path(tmp) / f"{protocol}_{model}_{int(shuffled)}.json"
            cmd = [sys.executable, __file__, "--worker", "--input", str(h5ad), "--output", str(part)]
            cmd += ["--model", model, "--protocol", protocol, "--device", args.device, "--seed", str(args.seed)]
            cmd += (["--epochs", str(epochs)] if epochs is not None else []) + (["--shuffle"] if shuffled else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{protocol} {model} failed:\n{proc.stderr[-3000:]}", flush=True)
                continue
            run = json.loads(part.read_text())
            pf = pd.DataFrame(run["per_fold"])
            print(
                f"{protocol:5s} {model:9s}{' shuffled' if shuffled else '':9s} ACG {pf['pcc_acg'].mean():.3f} "
                f"MSE {pf['mse'].mean():.3f} ({time.perf_counter() - t0:.0f} s, peak {run['peak_rss_mb']:.0f} MB)",
                flush=True,
            )
            runs.append(run)
    if not runs:
        sys.exit("no run succeeded")
    text = write_report(info, runs, out_dir, command, time.perf_counter() - t_start)
    print(text)


if __name__ == "__main__":
    main()
