"""Shift protocol: the held-out patient's slides as another lab would give them.

The LOPO folds of ``benchmarks/her2st.py`` (train on patient B, predict patient C, and the reverse), but each
held-out slide is also predicted from renderings of its H&E that mimic another lab's scanner and pipeline,
each kind at two strengths (``RENDERINGS``):

``jpeg``     JPEG re-encoding at quality 30 / 8.
``blur``     defocus: Gaussian blur of σ 2 / 5 µm.
``colour``   a scanner colour pipeline: gamma, desaturation and a colour matrix (:func:`colour_shift`).
``hed``      stain strength: haematoxylin x1.3 / x1.6, eosin x0.75 / x0.5 in HED optical density.
``lowdark``  the slide read only from its ~2000-px rendering (~3.6 µm/px) with the glass painted dark.
``combined`` every kind at once: strength 1 on the full-resolution image; strength 2 on the dark 2000-px
             rendering (the strongest shift).
``lowdark_jpeg2``, ``lowdark_blur2``, ``lowdark_stain2``: the dark 2000-px rendering with one of combined2's
             other parts (JPEG, blur, colour and HED stain), to tell which of them costs the most there.

Every slide is embedded with ``embed_images``' defaults unless an option below says otherwise; among them
``deblock=True``, which deblocks the heavily JPEG-compressed renderings (``jpeg2``, ``combined1``, ``combined2``,
``lowdark_jpeg2``) before embedding and leaves every other rendering and the clean slides as they are.

Fits see only clean training slides (``features_key``); each fold predicts its held-out slides from every
rendering without refitting (``stexp.tl.cross_validate(test_features=...)``). For each variant (``--variants``,
e.g. levers such as ``feature_norm="slide"``) the report gives PCC(ACG) per rendering and its ratio to clean,
the slide's shift score (``obs["<key>_shift"]``, median over its spots) and whether it was flagged, the
AUROC of the shift score between clean and shifted slides (per slide and per spot), its Spearman with
the realised PCC loss, and the expected PCC against the realised one. The shuffled control permutes the
features among the spots of each slide.

``--stain-norm none|reinhard|macenko|vahadane|haematoxylin`` (default: ``embed_images``' default,
``stexp.images.DEFAULT_STAIN_NORM``) measures the lever "stain normalisation": every slide, clean and
rendered, training and held out, is embedded with ``stexp.pp.embed_images(stain_norm=...)`` (each slide
normalised on its own thumbnail). The default's features are ``benchmark_shift.h5ad`` and its results
``results/shift.{json,md}``; another value's ``benchmark_shift_<norm>.h5ad`` and
``results/shift_<norm>.{json,md}``.

``--adapt-bn`` measures the lever "test-time BatchNorm re-estimation" (AdaBN): every slide, clean and rendered,
training and held out, is embedded with ``stexp.pp.embed_images(adapt_bn=True)`` (the encoder's BatchNorm
statistics re-estimated on each slide's own patches); with the stain normalisation of ``--stain-norm``. Its
features are ``benchmark_shift[_<norm>]_adabn.h5ad`` and its results ``results/shift[_<norm>]_adabn.{json,md}``
(``results/shift_adabn.*`` with the default stain normalisation), so the default files are not overwritten.

``--mpp <µm/px>`` measures the lever "one resolution for every slide": every slide, clean and rendered, is
resampled to that µm/px before its patches are cut (``stexp.pp.embed_images(mpp=...)``), so a sharp training
slide and a coarse or blurred query are seen through the same low-pass view. Its features are
``benchmark_shift[...]_mpp<µm>.h5ad`` and its results ``results/shift[...]_mpp<µm>.{json,md}``.

Usage::

    STEXP_DATA_DIR=../shared/data python benchmarks/shift.py --embed-only      # renderings + features (~30 min)
    STEXP_DATA_DIR=../shared/data python benchmarks/shift.py                   # the default pipeline, control
    STEXP_DATA_DIR=../shared/data python benchmarks/shift.py --variants default,raw
    STEXP_DATA_DIR=../shared/data python benchmarks/shift.py --stain-norm macenko  # everything Macenko-normalised
    STEXP_DATA_DIR=../shared/data python benchmarks/shift.py --adapt-bn  # every slide embedded with AdaBN

Renderings and features are cached under ``stexp.settings.cachedir`` (``benchmark_images/``, features cache).
Results: ``benchmarks/results/shift.{json,md}`` (``shift_<norm>.{json,md}`` with ``--stain-norm``, ``..._adabn``
with ``--adapt-bn``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stexp.images import _views

SECTIONS = ["B4", "C2", "C3", "C4", "C5", "C6"]
#: The slides that are rendered (embedding each rendering of every slide costs minutes on 2 cores); the other
#: slides' rows of a rendering hold their clean features and are left out of every rendered score.
RENDERED = ["B4", "C2", "C4"]
CLEAN = "clean"
#: name -> (kind, strength); strength 1 moderate, 2 strong.
RENDERINGS = {f"{kind}{s}": (kind, s) for kind in ("jpeg", "blur", "colour", "hed") for s in (1, 2)} | {
    "lowdark": ("lowdark", 2),
    "combined1": ("combined", 1),
    "combined2": ("combined", 2),
    # combined2's parts one at a time on the ~2000-px export (where each costs, for the docs' decomposition)
    "lowdark_jpeg2": ("lowdark+jpeg", 2),
    "lowdark_blur2": ("lowdark+blur", 2),
    "lowdark_stain2": ("lowdark+colour+hed", 2),
}
#: What ``--renderings`` embeds by default (the moderate JPEG, blur and colour renderings are left out for time).
DEFAULT_RENDERINGS = ["jpeg2", "blur2", "colour2", "hed1", "hed2", "lowdark", "combined1", "combined2"]
JPEG_QUALITY = {1: 30, 2: 8}
BLUR_UM = {1: 2.0, 2: 5.0}
HED = {
    1: {"scale": (1.3, 0.75, 1.0), "offset": (0.0, 0.02, 0.0)},
    2: {"scale": (1.6, 0.5, 1.0), "offset": (0.0, 0.04, 0.0)},
}
DARK = (28, 26, 30)
RESULTS = Path(__file__).parent / "results"
#: ``--stain-norm`` values (``stexp.pp.embed_images(stain_norm=...)``; ``none`` is ``None``).
STAIN_NORMS = ("none", *(norm for norm in _views.STAIN_NORMS if norm))


def _suffix(stain_norm: str | None, adapt_bn: bool = False, mpp: float | None = None) -> str:
    """``""`` for the default files; ``"_<norm>"`` for another stain normalisation, then ``"_adabn"``, ``"_mpp<µm>"``."""
    import stexp.images

    norm = "" if stain_norm == stexp.images.DEFAULT_STAIN_NORM else f"_{stain_norm or 'none'}"
    return norm + ("_adabn" if adapt_bn else "") + (f"_mpp{mpp:g}" if mpp else "")


def cache_path(stain_norm: str | None, adapt_bn: bool = False, mpp: float | None = None):
    """The h5ad :func:`prepare` writes for these view options (read by adapt.py, shift_augment.py)."""
    import stexp

    return Path(stexp.settings.cachedir) / f"benchmark_shift{_suffix(stain_norm, adapt_bn, mpp)}.h5ad"


def add_stain_norm_option(parser, help: str) -> None:
    """``--stain-norm``, one of :data:`STAIN_NORMS` (default: ``embed_images``' default), shared by the shift scripts."""
    parser.add_argument("--stain-norm", choices=STAIN_NORMS, default=None, help=help)


def add_adapt_bn_option(parser, help: str) -> None:
    """``--adapt-bn`` (``embed_images(adapt_bn=True)`` on every slide; default off)."""
    parser.add_argument("--adapt-bn", action="store_true", help=help)


def _options(stain_norm: str | None, adapt_bn: bool = False, mpp: float | None = None) -> str:
    """The command-line options that select these view options' features."""
    return (
        f" --stain-norm {stain_norm or 'none'}"
        + (" --adapt-bn" if adapt_bn else "")
        + (f" --mpp {mpp:g}" if mpp else "")
    )


def stain_norm_arg(value: str | None) -> str | None:
    """``--stain-norm``'s value as ``embed_images`` takes it (``None``: ``embed_images``' default)."""
    import stexp.images

    if value is None:
        return stexp.images.DEFAULT_STAIN_NORM
    return None if value == "none" else value


# -- renderings ---------------------------------------------------------------------------------------
def colour_shift(image: np.ndarray, strength: float, chunk_rows: int = 1024) -> np.ndarray:
    """A scanner colour pipeline of ``strength``: gamma ``1 + 0.15 s``, saturation ``1 - 0.15 s``, a colour matrix."""
    s = float(strength)
    matrix = np.eye(3) + s * np.array([[0.06, 0.03, -0.04], [-0.02, 0.0, 0.02], [0.04, -0.03, -0.08]])
    out = np.empty_like(image)
    for r in range(0, image.shape[0], chunk_rows):
        x = image[r : r + chunk_rows].astype(np.float32) / 255.0
        x = x ** (1.0 + 0.15 * s)
        grey = x.mean(axis=2, keepdims=True)
        x = grey + (x - grey) * (1.0 - 0.15 * s)
        x = x @ matrix.T.astype(np.float32)
        out[r : r + chunk_rows] = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return out


def blur(image: np.ndarray, sigma_um: float, um_per_px: float) -> np.ndarray:
    """Gaussian defocus of ``sigma_um`` µm."""
    from PIL import Image, ImageFilter

    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma_um / um_per_px)))


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` re-encoded as JPEG at ``quality``."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def paint_background(image: np.ndarray, colour: tuple[int, int, int] = DARK) -> np.ndarray:
    """Glass (bright, grey pixels) painted ``colour``, as some scanners' exports show it."""
    lo = image.min(axis=2).astype(np.int16)
    hi = image.max(axis=2).astype(np.int16)
    glass = (lo > 200) & (hi - lo < 25)
    out = image.copy()
    out[glass] = colour
    return out


def _parts(kind: str, strength: int) -> set[str]:
    """The single kinds a rendering applies (``"a+b"`` names several; ``combined`` is all, lowdark at strength 2)."""
    if kind == "combined":
        return {"colour", "hed", "blur", "jpeg"} | ({"lowdark"} if strength == 2 else set())
    return set(kind.split("+"))


def render(image: np.ndarray, kind: str, strength: int, um_per_px: float) -> np.ndarray:
    """``image`` (uint8 RGB) rendered as ``kind`` at ``strength``; JPEG last, as a lab's export would be."""
    import stexp

    parts = _parts(kind, strength)
    if "colour" in parts:
        image = colour_shift(image, strength)
    if "hed" in parts:
        image = stexp.images.hed_shift(image, **HED[strength])
    if "blur" in parts:
        image = blur(image, BLUR_UM[strength], um_per_px)
    if "lowdark" in parts:
        image = paint_background(image)
    if "jpeg" in parts:
        image = jpeg(image, JPEG_QUALITY[strength])
    return image


def _rendered_file(src: Path, section: str, name: str, um_per_px: float) -> Path:
    """The full-resolution image rendered as ``name``, written once (PNG, lossless) under the cache dir."""
    from PIL import Image

    import stexp

    kind, strength = RENDERINGS[name]
    tag = hashlib.sha256(json.dumps([str(src), os.path.getsize(src), name, _recipe_tag()]).encode()).hexdigest()[:12]
    out = Path(stexp.settings.cachedir) / "benchmark_images" / f"{section}_{name}_{tag}.png"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.MAX_IMAGE_PIXELS = None  # the full-resolution sections are ~9,300 x 9,900 px
        with Image.open(src) as im:
            image = np.asarray(im.convert("RGB"))
        tmp = out.with_suffix(".tmp.png")
        Image.fromarray(render(image, kind, strength, um_per_px)).save(tmp, compress_level=1)
        tmp.rename(out)
    return out


def _recipe_tag() -> str:
    """Changes when a rendering's parameters change (so cached renderings are redone)."""
    return json.dumps([JPEG_QUALITY, BLUR_UM, HED, DARK, "v1"], sort_keys=True, default=str)


def rendered_copy(adata, name: str):
    """The spots of the :data:`RENDERED` slides of ``adata``, their slides read as rendering ``name``."""
    a = adata[adata.obs["library_id"].isin(RENDERED)].copy()
    kind, strength = RENDERINGS[name]
    low = "lowdark" in _parts(kind, strength)
    for lib, entry in a.uns["spatial"].items():
        if lib not in RENDERED:
            continue
        meta = entry.setdefault("metadata", {})
        src = Path(meta["source_image_path"])
        if low:  # the in-memory ~2000-px image only, rendered there
            meta.pop("source_image_path", None)
            scale = entry["scalefactors"]
            um_per_px = float(scale["microns_per_pixel"]) / float(scale["tissue_hires_scalef"])
            hires = np.asarray(entry["images"]["hires"])
            if hires.dtype != np.uint8:
                hires = np.clip(np.rint(hires * 255.0), 0, 255).astype(np.uint8)
            entry["images"] = {"hires": render(hires[..., :3], kind, strength, um_per_px)}
        else:
            um_per_px = float(entry["scalefactors"]["microns_per_pixel"])
            meta["source_image_path"] = str(_rendered_file(src, lib, name, um_per_px))
    return a


def prepare(data_dir: Path, renderings: list[str], views: dict) -> Path:
    """Read the sections, embed clean and rendered images with the defaults (cached); write a slim h5ad.

    Every ``embed_images`` call (clean and rendered) takes the same view options ``views`` (``stain_norm``,
    ``adapt_bn``, ``mpp``); the h5ad is :func:`cache_path`.
    """
    import stexp

    out = cache_path(**views)
    adata = stexp.datasets.her2st(SECTIONS, path=data_dir)
    panel = [g.strip() for g in (data_dir / "her2st_785_genes.txt").read_text().split() if g.strip()]
    genes = [g for g in panel if g in adata.var_names]
    obsm = {}
    seconds = {}
    for name in [CLEAN, *renderings]:
        t0 = time.perf_counter()
        a = adata if name == CLEAN else rendered_copy(adata, name)
        stexp.pp.embed_images(a, key_added=f"X_{name}", **views)
        if name == CLEAN:
            obsm[f"X_{name}"] = np.asarray(a.obsm[f"X_{name}"])
        else:  # the slides not rendered keep their clean features (left out of the rendered scores)
            values = obsm[f"X_{CLEAN}"].copy()
            values[adata.obs_names.get_indexer(a.obs_names)] = np.asarray(a.obsm[f"X_{name}"])
            obsm[f"X_{name}"] = values
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"embedded {name} in {seconds[name]} s", flush=True)
        features = a.uns["stexp"]["features"][f"X_{name}"]
        adata.uns.setdefault("stexp", {}).setdefault("features", {})[f"X_{name}"] = features
    slim = adata.copy()  # every gene: the target's counts per 10,000 are over all of them
    for lib in list(slim.uns["spatial"]):
        entry = slim.uns["spatial"][lib]
        slim.uns["spatial"][lib] = {"scalefactors": dict(entry["scalefactors"])}
    slim.obsm = {"spatial": slim.obsm["spatial"], **obsm}
    slim.uns["embed_seconds"] = seconds
    slim.uns["benchmark_genes"] = np.asarray(genes, dtype=object)
    slim.write_h5ad(out)
    return out


# -- evaluation -------------------------------------------------------------------------------------
def variants(names: list[str]) -> list:
    """The recipes compared: the default pipeline and one lever changed at a time."""
    import stexp

    base = stexp.models.DEFAULT_RECIPE
    known = {
        "default": base.replace(name="default"),
        "raw": base.replace(feature_norm=None, name="raw"),
        "centre": base.replace(feature_norm="slide_centre", name="centre"),
        "standardise": base.replace(feature_norm="slide_standardise", name="standardise"),
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {list(known)}")
    return [known[n] for n in names]


def _shuffle_within_slides(adata, keys: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    libs = adata.obs["library_id"].astype(str).to_numpy()
    for lib in np.unique(libs):
        rows = np.flatnonzero(libs == lib)
        perm = rng.permutation(rows)
        for key in keys:
            adata.obsm[key][rows] = np.asarray(adata.obsm[key])[perm]


def run(
    path: Path,
    names: list[str],
    renderings: list[str],
    *,
    shuffled: bool,
    coverage: float = 0.9,
    views: dict | None = None,
) -> pd.DataFrame:
    """One ``stexp.tl.cross_validate`` call (LOPO) of every variant; per-slide rows with rendering and spot scores.

    ``path`` is :func:`prepare`'s h5ad (``views`` only names its view options in a message).
    """
    import anndata as ad

    import stexp

    adata = ad.read_h5ad(path)
    keys = {r: f"X_{r}" for r in renderings if f"X_{r}" in adata.obsm}
    missing = sorted(set(renderings) - set(keys))
    if missing:
        option = _options(**(views or {}))
        sys.exit(
            f"renderings {missing} are not embedded; run with --embed-only{option} --renderings {','.join(missing)}"
        )
    if shuffled:
        _shuffle_within_slides(adata, [f"X_{CLEAN}", *keys.values()])
    t0 = time.perf_counter()
    result = stexp.tl.cross_validate(
        adata,
        model=variants(names),
        split_by="patient",
        features_key=f"X_{CLEAN}",
        test_features=keys,
        genes=list(adata.uns["benchmark_genes"]),
        coverage=coverage,
        key_added="shift",
    )
    seconds = time.perf_counter() - t0
    rows = result.per_fold.copy()
    split = rows["model"].str.split("@", n=1, expand=True)
    rows["variant"] = split[0]
    rows["rendering"] = split[1].fillna(CLEAN) if 1 in split else CLEAN
    rows = rows[(rows["rendering"] == CLEAN) | rows["library_id"].isin(RENDERED)].copy()
    spot = {}  # per (variant, rendering): the spot shift scores of the rendered slides
    libs = adata.obs["library_id"].astype(str)
    for label, key in result.layers.items():
        column = f"{key}_shift"
        if column in adata.obs:
            spot[label] = adata.obs.loc[libs.isin(RENDERED), column].to_numpy()
    rows.attrs["spot_shift"] = spot
    rows.attrs["seconds"] = seconds
    rows["shuffled"] = shuffled
    return rows


def _auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """P(a shifted value exceeds a clean one), ties counted half (the Mann-Whitney AUROC)."""
    negative, positive = np.asarray(negative, float), np.asarray(positive, float)
    if negative.size == 0 or positive.size == 0:
        return float("nan")
    greater = (positive[:, None] > negative[None, :]).mean()
    ties = (positive[:, None] == negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def analyse(rows: pd.DataFrame) -> dict:
    """Per variant and rendering: PCC, its ratio to clean, shift scores, AUROC, coverage, expected vs realised."""
    from scipy.stats import spearmanr

    spot = rows.attrs.get("spot_shift", {})
    out: dict = {}
    for variant, group in rows.groupby("variant", sort=False):
        clean = group[group["rendering"] == CLEAN].set_index("library_id")
        clean_rendered = clean.loc[clean.index.isin(RENDERED)]
        table = []
        losses, scores = [], []
        for rendering, g in group.groupby("rendering", sort=False):
            g = g.set_index("library_id")
            ref = clean_rendered.reindex(g.index) if rendering != CLEAN else clean
            entry = {
                "rendering": rendering,
                "n_slides": int(len(g)),
                "pcc_acg": float(g["pcc_acg"].mean()),
                "pcc_heg": float(g["pcc_heg"].mean()),
                "ratio_to_clean": float(g["pcc_acg"].mean() / ref["pcc_acg"].mean()),
                "coverage": float(g["coverage"].mean()) if "coverage" in g else None,
                "interval_width": float(g["interval_width"].mean()) if "interval_width" in g else None,
                "shift_score": float(g["shift_score"].median()) if "shift_score" in g else None,
                "flagged": int(g["shift_flagged"].astype(bool).sum()) if "shift_flagged" in g else None,
                "expected_pcc": float(g["expected_pcc"].mean()) if "expected_pcc" in g else None,
            }
            if rendering != CLEAN and "shift_score" in g:
                entry["auroc_slides"] = _auroc(clean["shift_score"].to_numpy(), g["shift_score"].to_numpy())
                label_clean, label = variant, f"{variant}@{rendering}"
                if label in spot and label_clean in spot:
                    entry["auroc_spots"] = _auroc(spot[label_clean], spot[label])
                losses += list((ref["pcc_acg"] - g["pcc_acg"]).to_numpy())
                scores += list(g["shift_score"].to_numpy())
            table.append(entry)
        summary = {"table": table}
        if scores:
            summary["spearman_shift_vs_loss"] = float(spearmanr(scores, losses).statistic)
        if "expected_pcc" in group:
            e, r = group["expected_pcc"].to_numpy(float), group["pcc_acg"].to_numpy(float)
            ok = np.isfinite(e) & np.isfinite(r)
            summary["expected_vs_realised_mae"] = float(np.abs(e[ok] - r[ok]).mean())
            summary["expected_vs_realised_spearman"] = float(spearmanr(e[ok], r[ok]).statistic)
        out[variant] = summary
    return out


DECAY_GRID = tuple(float(d) for d in np.arange(0.0, 6.01, 0.25))


def fit_decay(rows: pd.DataFrame, grid: tuple[float, ...] = DECAY_GRID) -> dict:
    """The decay of the expected-PCC factor that best matches realised PCC, overall and leave-one-kind-out.

    For each shifted (slide, rendering) the realised PCC(ACG) is compared with its fold's in-distribution
    expected PCC times ``exp(-decay * excess)``, ``excess = max(0, score / range_max - 1)``.
    """
    g = rows[(rows["rendering"] != CLEAN) & rows["expected_pcc"].notna()].copy()
    if g.empty:
        return {}
    base = g["expected_pcc"] / g["expected_pcc_factor"]
    excess = np.maximum(0.0, g["shift_score"] / g["shift_range_max"] - 1.0)
    kinds = g["rendering"].map(lambda r: RENDERINGS[r][0])

    def error(decay: float, mask) -> float:
        return float(np.abs(base[mask] * np.exp(-decay * excess[mask]) - g["pcc_acg"][mask]).mean())

    best = min(grid, key=lambda d: error(d, np.ones(len(g), bool)))
    held_out = {}
    for kind in kinds.unique():
        train = (kinds != kind).to_numpy()
        d = min(grid, key=lambda d: error(d, train))
        held_out[kind] = {"decay": float(d), "mae": error(d, ~train), "mae_no_decay": error(0.0, ~train)}
    return {"decay": float(best), "mae": error(best, np.ones(len(g), bool)), "leave_one_kind_out": held_out}


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def write_report(
    rows: pd.DataFrame,
    shuffled: pd.DataFrame | None,
    renderings: list[str],
    *,
    command: str,
    views: dict,
) -> None:
    """``results/shift.json`` and ``results/shift.md``; ``shift<_suffix>.*`` for other options (:func:`_suffix`)."""
    import platform

    analysis = analyse(rows)
    decay = {v: fit_decay(g) for v, g in rows.groupby("variant", sort=False)}
    control = analyse(shuffled) if shuffled is not None else {}
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "rendered_slides": RENDERED,
        "renderings": {r: RENDERINGS[r] for r in renderings},
        "seconds": rows.attrs.get("seconds"),
        "analysis": analysis,
        "decay_fit": decay,
        "shuffled_control": control,
        "per_slide": json.loads(rows.drop(columns=["shuffled"]).to_json(orient="records")),
    }
    payload = {"command": command, **views, **payload}
    stem = f"shift{_suffix(**views)}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    lines = [
        "# Shift protocol (HER2+ LOPO, held-out slides rendered as another lab would give them)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {payload['machine']}; cross-validation {_fmt(rows.attrs.get('seconds'), 0)} s.  ",
        f"Rendered held-out slides: {', '.join(RENDERED)} (each rendering's scores are over these; clean over all six).  ",
        "Columns: PCC(ACG)/PCC(HEG) mean over slides; ratio = rendered PCC(ACG) / the same slides' clean PCC(ACG); "
        "shift = median slide shift score (`obs['<key>_shift']`, 1 = like a training slide held out), flagged = "
        "slides beyond the training range; AUROC of the shift score, clean vs rendered (slides, spots); coverage and "
        "width of the 90% intervals; expected = the model's expected PCC(ACG) after its shift factor.",
        "",
    ]
    lines[3:3] = [  # the view options every slide was embedded with
        f"Stain normalisation: `embed_images(stain_norm={views['stain_norm']!r})` on every slide, clean and rendered, "
        "training and held out (each normalised on its own thumbnail).  "
    ]
    if views.get("adapt_bn"):
        lines[4:4] = [
            "BatchNorm re-estimation (AdaBN): `embed_images(adapt_bn=True)` on every slide, clean and rendered, "
            "training and held out (the encoder's BatchNorm statistics re-estimated on each slide's own patches).  "
        ]
    if views.get("mpp"):
        lines[4:4] = [
            f"Resolution: `embed_images(mpp={views['mpp']:g})` on every slide, clean and rendered, training and held "
            f"out (each slide resampled to {views['mpp']:g} µm/px before its patches are cut).  "
        ]
    header = "| rendering | slides | PCC(ACG) | ratio | PCC(HEG) | shift | flagged | AUROC slides | AUROC spots | coverage | width | expected |"
    for variant, summary in analysis.items():
        lines += [f"## {variant}", "", header, "|" + "---|" * 12]
        for e in summary["table"]:
            lines.append(
                f"| {e['rendering']} | {e['n_slides']} | {_fmt(e['pcc_acg'])} | {_fmt(e['ratio_to_clean'], 2)} | "
                f"{_fmt(e['pcc_heg'])} | {_fmt(e['shift_score'], 2)} | {_fmt(e['flagged'])} | "
                f"{_fmt(e.get('auroc_slides'), 2)} | {_fmt(e.get('auroc_spots'), 2)} | {_fmt(e['coverage'], 2)} | "
                f"{_fmt(e['interval_width'], 2)} | {_fmt(e['expected_pcc'])} |"
            )
        lines += [
            "",
            f"Spearman(slide shift score, PCC(ACG) loss) over rendered (slide, rendering): "
            f"{_fmt(summary.get('spearman_shift_vs_loss'), 2)}; expected vs realised PCC(ACG) per slide: mean "
            f"absolute error {_fmt(summary.get('expected_vs_realised_mae'))}, Spearman "
            f"{_fmt(summary.get('expected_vs_realised_spearman'), 2)}.",
        ]
        if decay.get(variant):
            d = decay[variant]
            held = ", ".join(
                f"{k}: decay {v['decay']:.2f}, MAE {v['mae']:.3f} (no decay {v['mae_no_decay']:.3f})"
                for k, v in d["leave_one_kind_out"].items()
            )
            lines += [
                "",
                f"Decay of the expected-PCC factor fitted on all renderings: {d['decay']:.2f} (MAE {d['mae']:.3f}); "
                f"leave-one-kind-out: {held}.",
            ]
        lines.append("")
    if control:
        lines += ["## Shuffled-image control (features permuted among each slide's spots)", ""]
        lines += ["| variant | " + " | ".join(e["rendering"] for e in next(iter(control.values()))["table"]) + " |"]
        lines += ["|---|" + "---|" * len(next(iter(control.values()))["table"])]
        for variant, summary in control.items():
            lines.append(f"| {variant} | " + " | ".join(_fmt(e["pcc_acg"]) for e in summary["table"]) + " |")
        lines.append("")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("STEXP_DATA_DIR"))
    parser.add_argument("--renderings", default=",".join(DEFAULT_RENDERINGS))
    parser.add_argument("--embed-only", action="store_true")
    parser.add_argument("--variants", default="default")
    parser.add_argument("--controls", default="default", help="variants also run on shuffled features")
    add_stain_norm_option(
        parser,
        "embed every slide (clean and rendered) with embed_images(stain_norm=...); features in "
        "benchmark_shift_<norm>.h5ad, results in results/shift_<norm>.{json,md} (default: embed_images' default, "
        "whose files are benchmark_shift.h5ad and results/shift.*)",
    )
    add_adapt_bn_option(
        parser,
        "embed every slide (clean and rendered) with embed_images(adapt_bn=True): the encoder's BatchNorm statistics "
        "re-estimated on each slide; features in benchmark_shift[_<norm>]_adabn.h5ad, results in "
        "results/shift[_<norm>]_adabn.{json,md}",
    )
    parser.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="embed every slide (clean and rendered) with embed_images(mpp=...): each slide resampled to this "
        "µm/px before its patches are cut; features in benchmark_shift[...]_mpp<µm>.h5ad, results in "
        "results/shift[...]_mpp<µm>.{json,md}",
    )
    args = parser.parse_args(argv)
    import stexp

    args.stain_norm = stain_norm_arg(args.stain_norm)
    if not args.data_dir:
        sys.exit("set STEXP_DATA_DIR (e.g. ../shared/data) or pass --data-dir")
    data_dir = Path(args.data_dir)
    data_dir = data_dir / "her2st" if (data_dir / "her2st").is_dir() else data_dir
    renderings = [r for r in args.renderings.split(",") if r]
    views = {"stain_norm": args.stain_norm, "adapt_bn": bool(args.adapt_bn), "mpp": args.mpp}
    path = prepare(data_dir, renderings, views)
    print(f"features in {path}")
    if args.embed_only:
        return
    stexp.settings.verbosity = 1
    names = [v for v in args.variants.split(",") if v]
    rows = run(path, names, renderings, shuffled=False, views=views)
    controls = [v for v in args.controls.split(",") if v]
    shuffled = run(path, controls, renderings, shuffled=True, views=views) if controls else None
    write_report(
        rows,
        shuffled,
        renderings,
        command=" ".join(["python", "benchmarks/shift.py", *(argv or sys.argv[1:])]),
        views=views,
    )


if __name__ == "__main__":
    main()
