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
    ``xres``  cross-resolution: the LOPO folds, but the held-out patient's slides are embedded from
              their in-memory ~2000-px image only (about 3.6 µm/px; ``source_image_path`` removed),
              the training slides from the full-resolution file (0.69 µm/px): a new patient scanned
              at another resolution.
    ``stain`` stain shift: the LOPO folds, but the held-out slides' full-resolution images get a
              fixed H&E perturbation before embedding (haematoxylin x1.3, eosin x0.75 + 0.02 in HED
              optical density, :data:`BENCHMARK_HED_SHIFT`): a new patient from
              another lab.
    Shuffled-image control (``--controls``): the same protocol with the features permuted among the
    spots of each slide; a model that still scores above zero learns something other than the image.

Variants (``--variants``): ``<model>[@<features>][+smooth][+val]``, e.g. ``ridge``, ``knn200@p75+smooth``.
    model     a registered model; ``knn200``: kNN with k=200; ``knn200t``: the same with its softmax
              temperature chosen on the training slides (``temperature="auto"``); ``ridge_full``: ridge on every standardised
              feature (no PCA), alpha 1 ... 1e7.
    features  ``p150`` (default: 150 µm patches), ``p100``, ``p75``, ``ms`` (p75 and p150 features
              concatenated), ``p75tta`` (8 flips/rotations averaged), ``p75rh`` (Reinhard stain
              normalisation), ``p75ml`` (multi-level pooling of
              EfficientNet-Lite0's intermediate blocks), ``p75mpp`` (slides resampled to 1 µm/px first),
              ``p75mlrh`` (both), ``p150ml``, ``msml`` (p75ml and p150ml concatenated), ``default`` (whatever ``stexp.pp.embed_images`` does without options).
    +smooth   spatial smoothing of predictions, σ chosen on the training slides only (``smoothing="auto"``).
    +val      an inner validation slide: the last training slide (a spatial half of a single training
              slide) is held out of the fit as its ``validation`` (early stopping of the neural models;
              σ and retrieval temperatures are then chosen there).
    ``pipeline`` is the default pipeline: ``stexp.pp.embed_images(adata)`` + ``stexp.tl.fit(adata)``
    with no options (the variant the defaults resolve to).

Every run goes through the public API: one ``stexp.tl.cross_validate`` call per group of runs that
share their fits (``job_groups``): the LOPO, cross-resolution and stain-shift protocols have the same
folds and training slides, so each fold is fitted once and predicts the held-out slides from the clean,
low-resolution and stained features (``test_features=``); ``mclstexp_plus`` is made from each fold's
fitted ``mclstexp`` (its class ``trains_as`` mclstexp). Every group runs in its own process, so its peak
memory (``VmHWM``) is its own.
Each run's JSON is kept under ``--runs`` (``results/her2st_runs``); ``--reuse`` takes a run from
there instead of recomputing it when its variant, protocol, epochs and sections match. Results go
to ``benchmarks/results/her2st.json`` and ``her2st.md``.

Usage::

    STEXP_DATA_DIR=../shared/data python benchmarks/her2st.py            # every model, the pipeline, controls
    STEXP_DATA_DIR=../shared/data python benchmarks/her2st.py --levers   # and the lever ablation (hours)
    STEXP_DATA_DIR=../shared/data python benchmarks/her2st.py --quick    # minutes: 3 sections, 2 epochs
    python benchmarks/her2st.py --variants ridge,ridge+smooth --protocols lopo,xres
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
    "lopo": ("patient", "leave-one-patient-out", "clean"),
    "loso": ("library_id", "leave-one-section-out", "clean"),
    "xres": ("patient", "cross-resolution (LOPO folds, held-out slides from their ~3.6 µm/px image)", "lowres"),
    "stain": ("patient", "stain shift (LOPO folds, held-out slides with a fixed HED perturbation)", "stain"),
}
#: Feature configurations: keyword arguments of ``stexp.pp.embed_images`` (``parts``: concatenated configs). Each
#: names its encoder and its stain normalisation, so that a change of the package's defaults (encoder; Macenko
#: normalisation since issue 23) does not change what a config means.
FEATURE_CONFIGS: dict[str, dict] = {
    "p150": {"patch_um": 150.0, "encoder": ENCODER, "stain_norm": None},
    "p100": {"patch_um": 100.0, "encoder": ENCODER, "stain_norm": None},
    "p75": {"patch_um": 75.0, "encoder": ENCODER, "stain_norm": None},
    "ms": {"parts": ["p75", "p150"]},
    "p75tta": {"patch_um": 75.0, "encoder": ENCODER, "tta": True, "stain_norm": None},
    "p75rh": {"patch_um": 75.0, "encoder": ENCODER, "stain_norm": "reinhard"},
    "p75ml": {"patch_um": 75.0, "encoder": f"{ENCODER}_ml", "stain_norm": None},
    "p75mpp": {"patch_um": 75.0, "encoder": ENCODER, "mpp": 1.0, "stain_norm": None},
    "p75mlrh": {"patch_um": 75.0, "encoder": f"{ENCODER}_ml", "stain_norm": "reinhard"},
    "p150ml": {"patch_um": 150.0, "encoder": f"{ENCODER}_ml", "stain_norm": None},
    "msml": {"parts": ["p75ml", "p150ml"]},
    "default": {},
}
#: Model aliases: registered name and hyper-parameters.
MODEL_ALIASES = {
    "knn200": ("knn", {"k": 200}),
    "knn200t": ("knn", {"k": 200, "temperature": "auto"}),
    "ridge_full": ("ridge", {"n_components": None, "alphas": [float(10**e) for e in range(0, 8)]}),
}
#: Epoch caps that keep the full run within budget on 2 CPU cores (``--epochs`` overrides; ``None``: model default).
DEFAULT_EPOCHS: dict[str, int | None] = {"mlp": 50, "mclstexp": 90, "nh2st": 60}
#: How the default run trains a registered model where it is not the plain variant: NH2ST as its paper trains
#: it, stopping early on a validation slide (here an inner one taken from the training slides; at most 60 epochs).
DEFAULT_RUN_SUFFIX = {"nh2st": "+val"}
CONTROL_VARIANTS = ("ridge", "mclstexp")
#: The stain shift of the ``stain`` protocol (``stexp.images.hed_shift``): stronger haematoxylin, weaker eosin,
#: a small eosin offset in HED optical density.
BENCHMARK_HED_SHIFT = {"scale": (1.3, 0.75, 1.0), "offset": (0.0, 0.02, 0.0)}
METRICS = ("pcc_acg", "pcc_heg", "pcc_hvg", "mse", "mae")
#: Published numbers, for context only (different sections, genes, features and protocols).
PUBLISHED = (
    "mclSTExp (Min et al. 2024), 32 HER2+ sections, leave-one-section-out, 785 genes, DenseNet-121 fine-tuned: "
    "PCC(ACG) 0.232, PCC(HEG) 0.392, MSE 0.58, MAE 0.57 (their target scale differs). HEST-benchmark "
    "(patient splits, ridge on frozen features): ImageNet ResNet-50 0.326 averaged over 9 tasks."
)


# -- variants ----------------------------------------------------------------------------------
def parse_variant(name: str) -> dict:
    """``{"model", "params", "features", "smoothing"}`` of a variant name (see the module doc)."""
    if name == "pipeline":
        from stexp.models import DEFAULT_RECIPE

        return {
            "model": DEFAULT_RECIPE.model,
            "params": dict(DEFAULT_RECIPE.hparams),
            "features": "default",
            "smoothing": DEFAULT_RECIPE.smoothing,
            "inner_validation": False,
        }
    body, *suffixes = name.split("+")
    unknown = sorted(set(suffixes) - {"smooth", "val"})
    if unknown:
        raise ValueError(f"variant {name!r}: unknown suffix(es) {unknown}; choose from +smooth, +val")
    smooth = "auto" if "smooth" in suffixes else None
    model, _, features = body.partition("@")
    features = features or "p150"
    if features not in FEATURE_CONFIGS:
        raise ValueError(f"variant {name!r}: unknown features {features!r}; choose from {sorted(FEATURE_CONFIGS)}")
    registered, params = MODEL_ALIASES.get(model, (model, {}))
    return {
        "model": registered,
        "params": dict(params),
        "features": features,
        "smoothing": smooth,
        "inner_validation": "val" in suffixes,
    }


def _leaf_configs(features: str) -> list[str]:
    return FEATURE_CONFIGS[features].get("parts", [features])


def _key(features: str, image: str) -> str:
    return f"X_{features}_{image}"


# -- preparation (parent process) -------------------------------------------------------------
def _data_dir(arg: str | None) -> Path:
    value = arg or os.environ.get("STEXP_DATA_DIR")
    if not value:
        sys.exit("set STEXP_DATA_DIR (e.g. ../shared/data) or pass --data-dir")
    path = Path(value)
    return path / "her2st" if (path / "her2st").is_dir() else path


def _stained_copy(src: Path, section: str) -> Path:
    """The full-resolution image with the benchmark's HED shift, written once (JPEG q95) under the cache dir."""
    import hashlib

    from PIL import Image

    import stexp

    tag = hashlib.sha256(json.dumps([str(src), os.path.getsize(src), BENCHMARK_HED_SHIFT]).encode()).hexdigest()[:12]
    out = Path(stexp.settings.cachedir) / "benchmark_images" / f"{section}_hed_{tag}.jpg"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.MAX_IMAGE_PIXELS = None  # the full-resolution sections are ~9,300 x 9,900 px
        with Image.open(src) as im:
            image = np.asarray(im.convert("RGB"))
        tmp = out.with_suffix(".tmp.jpg")
        Image.fromarray(stexp.images.hed_shift(image, **BENCHMARK_HED_SHIFT)).save(tmp, quality=95)
        tmp.rename(out)
    return out


def _image_variant(adata, image: str):
    """A copy of ``adata`` whose slides are read as the protocol's test slides are: clean, lowres or stain."""
    if image == "clean":
        return adata
    a = adata.copy()
    for lib, entry in a.uns["spatial"].items():
        meta = entry.setdefault("metadata", {})
        if image == "lowres":
            meta.pop("source_image_path", None)
        elif image == "stain":
            meta["source_image_path"] = str(_stained_copy(Path(meta["source_image_path"]), lib))
        else:
            raise ValueError(image)
    return a


def prepare(her2st_dir: Path, sections: list[str], out: Path, needs: set[tuple[str, str]]) -> dict:
    """Read the sections, embed every (feature config, image variant) needed (cached), pick the panel; write a slim h5ad."""
    import stexp

    t0 = time.perf_counter()
    adata = stexp.datasets.her2st(sections, path=her2st_dir)
    t_read = time.perf_counter() - t0
    embed_seconds: dict[str, float] = {}
    specs: dict[str, dict] = {}
    obsm: dict[str, np.ndarray] = {}
    leaves = sorted({(leaf, image) for features, image in needs for leaf in _leaf_configs(features)})
    for leaf, image in leaves:
        t0 = time.perf_counter()
        a = _image_variant(adata, image)
        key = _key(leaf, image)
        stexp.pp.embed_images(a, key_added=key, **FEATURE_CONFIGS[leaf])
        obsm[key] = np.asarray(a.obsm[key])
        specs[key] = dict(a.uns["stexp"]["features"][key])
        embed_seconds[key] = round(time.perf_counter() - t0, 1)
        print(f"embedded {key} in {embed_seconds[key]} s", flush=True)
    for features, image in needs:
        parts = _leaf_configs(features)
        if len(parts) > 1:
            key = _key(features, image)
            obsm[key] = np.concatenate([obsm[_key(p, image)] for p in parts], axis=1)
            specs[key] = {**specs[_key(parts[0], image)], "encoder": f"{ENCODER} [{'+'.join(parts)}]"}
            specs[key].pop("patch_um", None)
    panel_file = her2st_dir / "her2st_785_genes.txt"
    panel = [g.strip() for g in panel_file.read_text().split() if g.strip()]
    genes = [g for g in panel if g in adata.var_names]
    slim = adata.copy()
    for lib in list(slim.uns["spatial"]):
        entry = slim.uns["spatial"][lib]
        slim.uns["spatial"][lib] = {"scalefactors": dict(entry["scalefactors"])}
    slim.uns = {"spatial": slim.uns["spatial"], "stexp": {"features": specs}}
    slim.obsm = {"spatial": slim.obsm["spatial"], **obsm}
    slim.uns["benchmark_genes"] = np.asarray(genes, dtype=object)
    slim.write_h5ad(out)
    return {
        "sections": sections,
        "n_spots": {lib: int(n) for lib, n in adata.obs["library_id"].value_counts(sort=False).items()},
        "patients": sorted(adata.obs["patient"].astype(str).unique()),
        "n_genes_data": int(adata.n_vars),
        "n_panel_genes": len(panel),
        "n_genes": len(genes),
        "features": {
            k: {
                f: v.get(f)
                for f in ("encoder", "weights", "patch_um", "patch_px", "normalization", "tta", "stain_norm")
            }
            for k, v in specs.items()
        },
        "feature_dims": {k: int(v.shape[1]) for k, v in obsm.items()},
        "read_seconds": round(t_read, 1),
        "embed_seconds": embed_seconds,
    }


# -- one (protocol, variant) run (child process) -------------------------------------------------
def _shuffle_within_slides(adata, keys: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    libs = adata.obs["library_id"].astype(str).to_numpy()
    perm = np.arange(adata.n_obs)
    for lib in np.unique(libs):
        idx = np.flatnonzero(libs == lib)
        perm[idx] = idx[rng.permutation(idx.size)]
    for key in keys:  # the same permutation for a slide's clean and shifted features
        adata.obsm[key] = np.asarray(adata.obsm[key])[perm]


def worker(args: argparse.Namespace) -> None:
    """Compute one group of runs (see :func:`job_groups`) in this process and write each run's JSON."""
    import anndata as ad
    import torch

    import stexp
    from stexp.models import get_model_class

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    stexp.settings.verbosity = 1
    adata = ad.read_h5ad(args.input)
    genes = list(adata.uns["benchmark_genes"])
    runs = json.loads(args.runs_spec)
    outputs = {(r["protocol"], r["variant"]): r["path"] for r in runs}
    epochs = {r["variant"]: r["epochs"] for r in runs}
    protocols = list(dict.fromkeys(p for p, _ in outputs))
    variants = list(dict.fromkeys(v for _, v in outputs))
    parsed = {v: parse_variant(v) for v in variants}
    (split_by,) = {PROTOCOLS[p][0] for p in protocols}
    (features,) = {parsed[v]["features"] for v in variants}
    (inner_validation,) = {parsed[v]["inner_validation"] for v in variants}
    train_key = _key(features, "clean")
    test_keys = {p: _key(features, PROTOCOLS[p][2]) for p in protocols}
    if args.shuffle:
        _shuffle_within_slides(adata, sorted({train_key, *test_keys.values()}), seed=args.seed)
    # Import what the fits need before timing them (importing Lightning alone takes seconds).
    import lightning.pytorch  # noqa: F401
    import sklearn.decomposition
    import sklearn.linear_model
    import sklearn.model_selection  # noqa: F401

    recipes, models = [], {}
    for v in variants:
        cls = get_model_class(parsed[v]["model"])
        # Each model's own lr/weight_decay/batch_size, recorded in the results.
        params = {k: cls.default_hparams[k] for k in ("lr", "weight_decay", "batch_size") if k in cls.default_hparams}
        params.update(parsed[v]["params"])
        if "max_epochs" in cls.default_hparams and epochs[v] is not None:
            params["max_epochs"] = epochs[v]
        if "seed" in cls.default_hparams:
            params["seed"] = args.seed
        models[v] = (
            parsed[v]["model"],
            {**params, **({"smoothing": parsed[v]["smoothing"]} if parsed[v]["smoothing"] else {})},
        )
        if v == "pipeline":  # the default recipe as the user gets it (its calibration leaves the scores alone)
            recipes.append(stexp.models.DEFAULT_RECIPE.with_hparams(**params).replace(name=v))
        else:
            recipes.append(
                stexp.models.Recipe(
                    parsed[v]["model"], params, smoothing=parsed[v]["smoothing"], calibrate=False, name=v
                )
            )
    rss_before = peak_rss_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    result = stexp.tl.cross_validate(
        adata,
        model=recipes,
        split_by=split_by,
        features_key=train_key,
        test_features={p: key for p, key in test_keys.items() if key != train_key},
        genes=genes,
        inner_validation=inner_validation,
        device=args.device,
        seed=args.seed,
        key_added="bench",
    )
    wall = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    results = {}
    for protocol, variant in outputs:
        name = variant if test_keys[protocol] == train_key else f"{variant}@{protocol}"
        rows = result.per_fold[result.per_fold["model"] == name].copy()
        rows["model"] = models[variant][0]
        results[(protocol, variant)] = rows
    group = sorted(f"{p}: {v}" + (" (shuffled)" if args.shuffle else "") for p, v in outputs)
    group_id = f"{os.getpid()}-{time.time_ns()}"
    for (protocol, variant), path in outputs.items():
        model, params = models[variant]
        out = {
            "protocol": protocol,
            "variant": variant,
            "model": model,
            "features": features,
            "shuffled": bool(args.shuffle),
            "params": params,
            "sections": list(dict.fromkeys(adata.obs["library_id"].astype(str))),
            "epochs_arg": epochs[variant],
            "commit": _commit(),
            # the runs of one group share one process, its fits and its wall time
            "group": group,
            "group_id": group_id,
            "wall_seconds": wall,
            "peak_rss_mb": peak_rss_mb(),
            "rss_before_mb": rss_before,
            "tracemalloc_peak_mb": traced_peak / 2**20,
            "per_fold": json.loads(results[(protocol, variant)].to_json(orient="records")),
        }
        Path(path).write_text(json.dumps(out, indent=1))


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        return ""


# -- report -------------------------------------------------------------------------------------
def _fmt(mean: float, std: float) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.3f} ± {std:.3f}" if not np.isnan(std) else f"{mean:.3f}"


def _run_name(run: dict) -> str:
    return run["variant"] + (" (shuffled images)" if run["shuffled"] else "")


def _summary_rows(runs: list[dict]) -> pd.DataFrame:
    rows = []
    for run in runs:
        pf = pd.DataFrame(run["per_fold"])
        row = {
            "protocol": run["protocol"],
            "model": _run_name(run),
            "variant": run["variant"],
            "shuffled": run["shuffled"],
        }
        for m in METRICS:
            row[m] = pf[m].mean()
            row[f"{m}_std"] = pf[m].std(ddof=1) if len(pf) > 1 else np.nan
        row["n_slides"] = len(pf)
        row["n_constant"] = int(pf["n_constant"].sum()) if "n_constant" in pf else 0
        folds = pf.drop_duplicates("fold")
        row["fit_seconds"] = folds["fit_seconds"].sum()
        row["predict_seconds"] = folds["predict_seconds"].sum()
        row["peak_rss_mb"] = run["peak_rss_mb"]
        # every epoch runs unless a validation slide stops early (+val); smoothing adds inner fits
        epochs = run["params"].get("max_epochs")
        plain = run["params"].get("smoothing") is None and not parse_variant(run["variant"])["inner_validation"]
        row["seconds_per_epoch"] = row["fit_seconds"] / (len(folds) * epochs) if epochs and plain else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def verdict(summary: pd.DataFrame, protocol: str, runs: list[dict]) -> str:
    """One honest line: does mclSTExp beat ridge on the same features and folds?"""
    s = summary[summary["protocol"] == protocol].set_index("model")
    if "mclstexp" not in s.index or "ridge" not in s.index:
        return "Verdict: mclSTExp or ridge was not run, no comparison."
    per_slide = {
        r["variant"]: pd.DataFrame(r["per_fold"]).set_index("library_id")["pcc_acg"]
        for r in runs
        if r["protocol"] == protocol and not r["shuffled"] and r["variant"] in ("mclstexp", "ridge")
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


def ablation_table(summary: pd.DataFrame) -> list[str]:
    """PCC(ACG) of every variant (rows) under every protocol (columns), mean ± std over test slides."""
    protocols = list(dict.fromkeys(summary["protocol"]))
    lines = [
        "| variant | " + " | ".join(protocols) + " |",
        "|---|" + "---|" * len(protocols),
    ]
    for name in dict.fromkeys(summary["model"]):
        cells = []
        for p in protocols:
            r = summary[(summary["model"] == name) & (summary["protocol"] == p)]
            cells.append(_fmt(r["pcc_acg"].iloc[0], r["pcc_acg_std"].iloc[0]) if len(r) else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_report(info: dict, runs: list[dict], out_dir: Path, command: str, total_seconds: float) -> str:
    summary = _summary_rows(runs)
    embed = info["embed_seconds"]
    lines = [
        "# HER2+ benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), torch threads {os.cpu_count()}; "
        f"total {total_seconds / 60:.1f} min (embedding {sum(embed.values()):.0f} s, cached after the first run).  ",
        f"Sections: {', '.join(f'{k} ({v} spots)' for k, v in info['n_spots'].items())}; patients {info['patients']}.  ",
        f"Genes: {info['n_genes']} of the {info['n_panel_genes']}-gene HER2+ panel present in every section.  ",
        "Features (ImageNet weights; `stexp.pp.embed_images` options): "
        + "; ".join(
            f"`{f}` {FEATURE_CONFIGS[f] or 'the defaults'}"
            for f in dict.fromkeys(r["features"] for r in runs)
            if f in FEATURE_CONFIGS
        )
        + ".  ",
        "Scores per test slide (Pearson across the slide's spots, per gene), then mean ± std over test slides; "
        "MSE/MAE on log1p(counts per 10k). The mean baseline predicts a constant, so its Pearson is undefined (n/a). "
        "Time: fit + predict over all folds (with `+smooth`, the inner folds that choose σ included); s/epoch: training "
        "seconds per epoch of one fold. Memory: peak RSS of the process running that model (data included). "
        "Variants: `<model>[@<features>][+smooth][+val]`, see the script's docstring.",
        "",
        "## PCC(ACG) of every variant under every protocol",
        "",
        *ablation_table(summary),
        "",
    ]
    if info.get("not_run"):
        lines += [f"Not run (no kept run; `--report-only`): {', '.join(info['not_run'])}.", ""]
    commits = sorted({str(r.get("commit", "")) for r in runs})
    lines += [
        f"Runs: {len(runs)}, their fit+predict wall time {info.get('run_seconds', 0) / 60:.1f} min in all; "
        f"commits: {'; '.join(commits)}.",
        "",
    ]
    for protocol in dict.fromkeys(summary["protocol"]):
        split_by, title, _ = PROTOCOLS[protocol]
        s = summary[summary["protocol"] == protocol]
        lines += [f"## {title} (`split_by={split_by!r}`)", ""]
        if protocol == "loso":
            lines += ["Optimistic: serial sections of the held-out section's patient stay in training.", ""]
        else:
            lines += ["Train on patient B (B4), predict patient C (C2-C6), and the reverse.", ""]
        lines += [
            "| variant | PCC(ACG) | PCC(HEG) | PCC(HVG) | MSE | MAE | fit+predict (s) | s/epoch | peak RSS (MB) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for _, r in s.iterrows():
            cells = [_fmt(r[m], r[f"{m}_std"]) for m in METRICS]
            t = r["fit_seconds"] + r["predict_seconds"]
            per_epoch = "" if np.isnan(r["seconds_per_epoch"]) else f"{r['seconds_per_epoch']:.2f}"
            lines.append(f"| {r['model']} | {' | '.join(cells)} | {t:.1f} | {per_epoch} | {r['peak_rss_mb']:.0f} |")
        lines += ["", verdict(summary, protocol, runs), ""]
    lines += ["## Per-slide PCC(ACG)", ""]
    per = []
    for run in runs:
        pf = pd.DataFrame(run["per_fold"])
        col = f"{run['protocol']}: {run['variant']}" + (" (shuffled)" if run["shuffled"] else "")
        per.append(pf.set_index("library_id")["pcc_acg"].rename(col))
    table = pd.concat(per, axis=1).T
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


#: The lever ablation (``--levers``): one change at a time on top of the registered models on the 150 µm features.
LEVER_VARIANTS = (
    "knn200",
    "ridge+smooth",
    "knn200+smooth",
    "ridge_knn+smooth",
    "mclstexp+smooth",
    "ridge@p100",
    "ridge@p75",
    "ridge@ms",
    "ridge@p75tta",
    "ridge@p75rh",
    "ridge@p75mpp",
    "ridge@p75ml",
    "ridge_full@p75ml",
    "knn200@p75ml+smooth",
    "ridge_knn@p75ml+smooth",
    "mclstexp@p75ml",
    "mclstexp_plus@p75ml",
    "knn200t@p75ml+smooth",
)


def training_key(variant: str, epochs: int | None) -> str:
    """What a variant's fits depend on; variants with one key train identically (``mclstexp_plus`` as ``mclstexp``)."""
    from stexp.models import get_model_class

    v = parse_variant(variant)
    # a model that trains as another (its class's ``trains_as``) shares its fits: keep the parent's training params
    family = get_model_class(v["model"]).trains_as or v["model"]
    params = {k: x for k, x in v["params"].items() if k in get_model_class(family).default_hparams}
    if epochs is None:
        epochs = get_model_class(v["model"]).default_hparams.get("max_epochs")
    return json.dumps([family, params, v["features"], v["smoothing"], v["inner_validation"], epochs], sort_keys=True)


def job_groups(jobs: list[tuple[str, str, bool]], epochs_of) -> list[list[tuple[str, str, bool]]]:
    """Runs that one process computes together, sharing its fits.

    The LOPO, cross-resolution and stain-shift protocols have the same folds and training slides;
    ``mclstexp`` and ``mclstexp_plus`` the same training (``trains_as``). So a group is every (protocol,
    variant) with one ``split_by``, one :func:`training_key` and one shuffling; ``stexp.tl.cross_validate``
    fits each fold once for all of them (``test_features``; ``trains_as``). The variant that trains comes
    first (``mclstexp`` before ``mclstexp_plus``).
    """
    groups: dict[tuple, list[tuple[str, str, bool]]] = {}
    for protocol, variant, shuffled in jobs:
        key = (PROTOCOLS[protocol][0], training_key(variant, epochs_of(variant)), shuffled)
        groups.setdefault(key, []).append((protocol, variant, shuffled))
    from stexp.models import get_model_class

    derived = lambda job: get_model_class(parse_variant(job[1])["model"]).trains_as is not None
    return [sorted(g, key=derived) for g in groups.values()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="her2st folder or its parent (default: $STEXP_DATA_DIR)")
    parser.add_argument(
        "--variants",
        default=None,
        help="comma-separated (default: every registered model (DEFAULT_RUN_SUFFIX) and the pipeline)",
    )
    parser.add_argument("--levers", action="store_true", help="also run the lever ablation (LEVER_VARIANTS)")
    parser.add_argument("--models", default=None, help="alias of --variants")
    parser.add_argument("--protocols", default="lopo,loso,xres,stain")
    parser.add_argument(
        "--controls", default=",".join(CONTROL_VARIANTS) + ",pipeline", help="variants also run on shuffled images"
    )
    parser.add_argument("--epochs", type=int, default=None, help="max_epochs of every neural model")
    parser.add_argument("--quick", action="store_true", help="3 sections, 2 epochs: a smoke run of minutes")
    parser.add_argument("--reuse", action="store_true", help="reuse matching runs kept under --runs")
    parser.add_argument(
        "--report-only", action="store_true", help="with --reuse: skip (and list) the runs not kept, compute nothing"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--runs", default=None, help="where each run's JSON is kept (default: <out>/her2st_runs)")
    # internal: one group of runs (job_groups) in a child process
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--runs-spec", help=argparse.SUPPRESS)
    parser.add_argument("--shuffle", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    import stexp

    t_start = time.perf_counter()
    names = args.variants or args.models
    default = [m + DEFAULT_RUN_SUFFIX.get(m, "") for m in stexp.models.available_models()] + ["pipeline"]
    variants = names.split(",") if names else default
    if args.levers:
        variants += [v for v in LEVER_VARIANTS if v not in variants]
    available = []
    for v in variants:
        try:
            stexp.models.get_model_class(parse_variant(v)["model"])
            available.append(v)
        except (KeyError, ImportError, ValueError) as err:
            print(f"skipping variant {v!r}: {err}", flush=True)
    protocols = [p for p in args.protocols.split(",") if p]
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        sys.exit(f"unknown protocol(s) {unknown}; choose from {sorted(PROTOCOLS)}")
    controls = [v for v in args.controls.split(",") if v in available]
    sections = QUICK_SECTIONS if args.quick else SECTIONS
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = Path(args.runs) if args.runs else out_dir / "her2st_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/her2st.py " + " ".join(argv if argv is not None else sys.argv[1:])
    jobs = [(p, v, False) for p in protocols for v in available] + [(p, v, True) for p in protocols for v in controls]

    def epochs_of(variant: str) -> int | None:
        model = parse_variant(variant)["model"]
        return 2 if args.quick else (args.epochs if args.epochs is not None else DEFAULT_EPOCHS.get(model))

    def kept_run(protocol: str, variant: str, shuffled: bool) -> tuple[Path, dict | None]:
        """The run's JSON path, and its content when ``--reuse`` can take it."""
        tag = (
            f"{'quick_' if args.quick else ''}{protocol}_{variant.replace('@', '-').replace('+', '_')}_{int(shuffled)}"
        )
        part = runs_dir / f"{tag}.json"
        if args.reuse and part.is_file():
            run = json.loads(part.read_text())
            if run.get("epochs_arg") == epochs_of(variant) and run.get("sections") == sections:
                return part, run
        return part, None

    kept_runs = {job: kept_run(*job) for job in jobs}
    # embed only what the runs still to compute need (nothing with --report-only)
    to_compute = [] if args.report_only else [job for job in jobs if kept_runs[job][1] is None]
    needs = {(parse_variant(v)["features"], image) for p, v, _ in to_compute for image in ("clean", PROTOCOLS[p][2])}

    with tempfile.TemporaryDirectory() as tmp:
        h5ad = Path(tmp) / "her2st_features.h5ad"
        info = prepare(_data_dir(args.data_dir), sections, h5ad, needs)
        print(f"prepared {sum(info['n_spots'].values())} spots, {info['n_genes']} genes", flush=True)
        computed: dict[tuple[str, str, bool], dict] = {}
        for group in job_groups(to_compute, epochs_of):
            spec = [
                {"protocol": p, "variant": v, "path": str(kept_runs[(p, v, sh)][0]), "epochs": epochs_of(v)}
                for p, v, sh in group
            ]
            cmd = [sys.executable, __file__, "--worker", "--input", str(h5ad), "--runs-spec", json.dumps(spec)]
            cmd += ["--device", args.device, "--seed", str(args.seed)] + (["--shuffle"] if group[0][2] else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{', '.join(f'{p} {v}' for p, v, _ in group)} failed:\n{proc.stderr[-3000:]}", flush=True)
                continue
            for job in group:
                run = computed[job] = json.loads(kept_runs[job][0].read_text())
                pf = pd.DataFrame(run["per_fold"])
                print(
                    f"{job[0]:5s} {job[1]:18s}{' shuffled' if job[2] else '':9s} ACG {pf['pcc_acg'].mean():.3f} "
                    f"MSE {pf['mse'].mean():.3f}",
                    flush=True,
                )
            print(f"  group of {len(group)} run(s): {time.perf_counter() - t0:.0f} s, peak {run['peak_rss_mb']:.0f} MB")
        runs, not_run = [], []
        for job in jobs:
            protocol, variant, shuffled = job
            part, kept = kept_runs[job]
            if kept is not None:
                print(f"{protocol:5s} {variant:18s} reused {part.name} (commit {kept.get('commit')})", flush=True)
                runs.append(kept)
            elif job in computed:
                runs.append(computed[job])
            elif args.report_only:
                print(f"{protocol:5s} {variant:18s}{' shuffled' if shuffled else ''} not run (no kept run)", flush=True)
                not_run.append(f"{protocol}: {variant}{' (shuffled)' if shuffled else ''}")
    if not runs:
        sys.exit("no run succeeded")
    info["not_run"] = not_run
    # the runs of one group share their process: count its wall time once
    info["run_seconds"] = sum({r.get("group_id", id(r)): r["wall_seconds"] for r in runs}.values())
    text = write_report(info, runs, out_dir, command, time.perf_counter() - t_start)
    print(text)


if __name__ == "__main__":
    main()
