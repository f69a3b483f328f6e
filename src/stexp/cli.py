"""The ``stexp`` command line.

``stexp demo`` runs the user's path end to end on demo data; ``stexp predict SLIDE --model DIR --out OUT``
predicts expression over the tissue of a whole-slide image with a saved model; ``stexp embed`` writes image
features. Both take many slides into an output folder (:mod:`stexp._batch`).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

DATA_CHOICES = ("synthetic", "her2st")


def describe(adata, *, library_key: str = "library_id") -> str:
    """A short account of an AnnData in stexp's layout: spots, genes, slides, pixel size, images (width x height)."""
    from stexp._layout import library_ids, spatial_entry, spot_diameter_um, um_per_px

    libs = library_ids(adata, library_key)
    noun = "library" if len(libs) == 1 else "libraries"
    lines = [f"{adata.n_obs} spots x {adata.n_vars} genes in {len(libs)} {noun} (obs[{library_key!r}])"]
    counts = adata.obs[library_key].astype(str).value_counts() if library_key in adata.obs else None
    for lib in libs:
        entry = spatial_entry(adata, lib)
        images = ", ".join(f"{res} {img.shape[1]}x{img.shape[0]} px" for res, img in entry["images"].items())
        n = int(counts[lib]) if counts is not None else adata.n_obs
        lines.append(
            f"  {lib}: {n} spots, {spot_diameter_um(adata, lib):g} µm spots, {um_per_px(adata, lib):g} µm/px, "
            f"images: {images or 'none'}"
        )
    lines.append(f"obs columns: {', '.join(map(str, adata.obs.columns))}")
    lines.append(f"obsm: {', '.join(adata.obsm)}; layers: {', '.join(adata.layers) or 'none'} (raw counts in X)")
    return "\n".join(lines)


def _demo(args: argparse.Namespace) -> int:
    from stexp._demo import DEFAULT_NAME, DEMO_MODELS, load_demo_data, run_demo
    from stexp._settings import settings

    if args.quiet:
        settings.verbosity = 1  # warnings only: no progress bars, no "added ..." messages
    loaded = load_demo_data(args.data)
    print(f"stexp demo ({args.data} data)")
    print(describe(loaded[0]))
    print(
        f"embed images -> fit the {DEFAULT_NAME} pipeline (stexp.tl.fit without model=) and {', '.join(DEMO_MODELS)} "
        f"({args.epochs} epochs) -> predict {loaded[1]!r} -> evaluate -> domains -> plots"
    )
    report = run_demo(args.out, data=args.data, epochs=args.epochs, seed=args.seed, loaded=loaded)
    print()
    print(report.read_text())
    print(f"written to {report.parent}/")
    return 0


#: Errors of ``stexp predict`` that are the input's fault: one line, exit status 1.
INPUT_ERRORS = (FileNotFoundError, ValueError, KeyError, OSError)
#: Genes drawn next to the H&E thumbnail by ``stexp predict``.
N_PLOT_GENES = 3


#: Python arguments that ``stexp predict`` passes on from its options: a library message naming one names the option.
OPTIONS = {
    "mpp": "--mpp",
    "spot_diameter_um": "--spot-diameter-um",
    "spacing_um": "--spacing-um",
    "device": "--device",
    "batch_size": "--batch-size",
    "key_added": "--key",
}


def as_options(message: str, names: Iterable[str]) -> str:
    """``message`` with the Python arguments ``names`` written as the command-line options that set them.

    ``pass mpp= (µm per pixel)`` becomes ``pass --mpp (µm per pixel)``, ``device='cpu'`` becomes ``--device cpu``.
    """
    for name in names:
        value = r"(?:'([^']*)'|\"([^\"]*)\"|([^\s,;)]*[^\s,;).]))?"  # quoted, or up to a space or final punctuation
        pattern = re.compile(rf"(?<![\w.]){re.escape(name)}={value}")

        def option(m: re.Match, name: str = name) -> str:
            given = next((g for g in m.groups() if g is not None), "")
            return f"{OPTIONS[name]} {given}" if given else OPTIONS[name]

        message = pattern.sub(option, message)
    return message


def _fail(command: str, err: BaseException, *, options: Iterable[str] = ()) -> int:
    """Print ``err`` as one line on stderr and return the exit status 1.

    ``options``: the Python arguments that the failing step got from command-line options (keys of
    :data:`OPTIONS`); the message names the options instead (``--mpp``, not ``mpp=``). Only those: a
    step's other arguments (e.g. the model's own ``mpp=`` for embedding) are not the user's options.
    """
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    message = as_options(" ".join(str(message).split()), options)  # one line
    print(f"stexp {command}: error: {message}", file=sys.stderr)
    return 1


def _peak_rss_mb() -> float | None:
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def _check_outputs(out: Path, figure: Path, *, overwrite: bool) -> None:
    """Refuse, before any work, an ``--out`` of another kind, or outputs that exist without ``--overwrite``.

    Raises
    ------
    ValueError
        If ``out`` does not end in ``.h5ad`` or ``.zarr``.
    FileExistsError
        If ``out`` or the ``figure`` exists and ``overwrite`` is False (both named).
    IsADirectoryError, NotADirectoryError
        If an ``.h5ad`` output or the figure is a folder (never removed, even with ``overwrite``), or the
        output's folder is a file.
    """
    if out.suffix not in (".h5ad", ".zarr"):
        raise ValueError(
            f"--out must end in .h5ad or .zarr (SpatialData), got {str(out)!r}; for several slides pass a folder."
        )
    existing = [p for p in (out, figure) if p.exists() or p.is_symlink()]
    if existing and not overwrite:
        names = " and ".join(str(p) for p in existing)
        one = len(existing) == 1
        raise FileExistsError(
            f"{names} already exist{'s' if one else ''}; pass --overwrite to replace {'it' if one else 'them'} "
            "(stexp predict writes the prediction and its figure), or choose another --out."
        )
    for path, folder_ok in ((out, out.suffix == ".zarr"), (figure, False)):
        if path.is_dir() and not folder_ok:
            raise IsADirectoryError(f"{path} is a folder, where stexp predict writes a file; choose another --out.")
    parent = next(p for p in out.absolute().parents if p.exists())
    if not parent.is_dir():
        raise NotADirectoryError(f"{parent} is a file, so --out {out} cannot be written; choose another --out.")


def _write_replacing(out: Path, write: Callable[[Path], object]) -> None:
    """``write`` into a hidden sibling of ``out``, renamed into place when complete.

    An existing ``out`` (``--overwrite``) stays intact until the new one is complete; an interrupted write
    leaves nothing behind.
    """
    from stexp._files import hidden_sibling, move_into_place, remove_path

    tmp = hidden_sibling(out, "tmp")
    tmp = tmp.with_name(tmp.name + out.suffix)  # writers pick the format from the suffix
    try:
        write(tmp)
        move_into_place(tmp, out)
    except BaseException:
        remove_path(tmp)
        raise


def _write_spatialdata(adata, out: Path) -> None:
    """The pseudo-spots, their predictions and the thumbnail as a SpatialData zarr store."""
    import numpy as np
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    from stexp._layout import library_ids, spatial_entry

    (lib,) = library_ids(adata)
    entry = spatial_entry(adata, lib)
    sf = entry["scalefactors"]
    thumb = np.moveaxis(np.asarray(entry["images"]["hires"]), -1, 0)
    s = 1.0 / float(sf["tissue_hires_scalef"])
    image = Image2DModel.parse(thumb, dims=("c", "y", "x"), transformations={"global": Scale([s, s], axes=("x", "y"))})
    xy = np.asarray(adata.obsm["spatial"], dtype=float)
    radius = np.full(len(xy), float(sf["spot_diameter_fullres"]) / 2)
    shapes = ShapesModel.parse(xy, geometry=0, radius=radius, index=np.arange(adata.n_obs),
                               transformations={"global": Identity()})  # fmt: skip
    table = adata.copy()
    table.obs["region"] = lib
    table.obs["region"] = table.obs["region"].astype("category")
    table.obs["spot_id"] = np.arange(adata.n_obs)
    del table.uns["spatial"]
    table = TableModel.parse(table, region=lib, region_key="region", instance_key="spot_id")
    SpatialData(images={f"{lib}_hires_image": image}, shapes={lib: shapes}, tables={"table": table}).write(out)


def _plot(adata, key: str, genes: list[str], out: Path) -> Path:
    """The H&E thumbnail next to the predicted expression of ``genes``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from stexp._layout import library_ids, spatial_entry
    from stexp.pl import spatial_genes

    (lib,) = library_ids(adata)
    thumb = spatial_entry(adata, lib)["images"]["hires"]
    fig, axes = plt.subplots(1, 1 + len(genes), figsize=(4.5 * (1 + len(genes)), 4.5), layout="constrained")
    axes[0].imshow(thumb)
    axes[0].set_title(f"{lib}: H&E", fontsize=10)
    axes[0].set_axis_off()
    spatial_genes(adata, genes, layers=(key,), title_scores=False, ax=list(axes[1:]), library_id=lib)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _predict(args: argparse.Namespace) -> int:
    import numpy as np

    from stexp._devices import check_device
    from stexp._settings import settings

    if args.describe:  # the model card, then exit: no slide or output needed
        try:
            import stexp

            stexp.models.describe(args.model)
        except (*INPUT_ERRORS, RuntimeError) as err:
            return _fail("predict", err)
        return 0
    if args.slide is None or args.out is None:
        missing = [name for name, value in (("SLIDE", args.slide), ("--out", args.out)) if value is None]
        print(f"stexp predict: error: the following arguments are required: {', '.join(missing)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out = Path(args.out)
    figure = out.with_name(out.stem + "_genes.png")
    given: tuple[str, ...] = ("device",)  # the Python arguments the running step got from options (for messages)
    try:  # before any work: the outputs, then the device (also when the features are cached and it is not used)
        _check_outputs(out, figure, overwrite=args.overwrite)
        device = check_device(args.device)
    except INPUT_ERRORS as err:
        return _fail("predict", err, options=given)
    if args.quiet:
        settings.verbosity = 1
    try:
        import stexp

        given = ()
        # stexp._batch loads the model once for many slides
        model = getattr(args, "loaded_model", None) or stexp.models.load(args.model, device=device)
        given = ("mpp", "spot_diameter_um", "spacing_um")
        adata = stexp.io.read_wsi(
            args.slide, mpp=args.mpp, spot_diameter_um=args.spot_diameter_um, spacing_um=args.spacing_um,
            genes=list(model.genes),
        )  # fmt: skip
        n_spots = adata.n_obs
        print(f"stexp predict: {n_spots} pseudo-spots over the tissue of {Path(args.slide).name}; model {model!r}")
        if not model.reads_patches and model.features_key is not None:
            # what stexp.tl.predict would embed (the model's EncoderSpec.embed_kwargs), with the CLI's batch size
            from stexp._layout import LIBRARY_KEY
            from stexp.tl._predict import _ensure_features

            given = ("batch_size", "device")
            _ensure_features(
                adata, model, features_key=model.features_key, library_key=LIBRARY_KEY, batch_size=args.batch_size,
                device=device,
            )  # fmt: skip
        given = ("key_added", "device")
        stexp.tl.predict(adata, model, key_added=args.key, device=device)
        given = ()
        from stexp.tl._storage import read_prediction

        genes, values = read_prediction(adata, args.key)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".zarr":
            _write_replacing(out, lambda path: _write_spatialdata(adata, path))
        else:
            _write_replacing(out, adata.write_h5ad)
        shown = [str(genes[i]) for i in np.argsort(-np.nanvar(values, axis=0), kind="stable")[:N_PLOT_GENES]]
        _write_replacing(figure, lambda path: _plot(adata, args.key, shown, path))
    except INPUT_ERRORS as err:
        return _fail("predict", err, options=given)
    seconds = time.perf_counter() - t0
    peak = _peak_rss_mb()
    from stexp.tl._storage import where

    lines = [
        f"slide     {Path(args.slide).resolve()}",
        f"spots     {n_spots} ({args.spacing_um:g} µm hexagonal grid, {args.spot_diameter_um:g} µm spots)",
        f"genes     {len(genes)} predicted ({where(adata, args.key)})",
        f"time      {seconds:.1f} s ({n_spots / max(seconds, 1e-9):.1f} spots/s end to end)",
        f"memory    peak {peak:.0f} MB resident" if peak is not None else "memory    (peak not measured here)",
        f"written   {out}",
        f"figure    {figure} (H&E thumbnail, then {', '.join(shown)})",
    ]
    from stexp.tl._report import prediction_report

    lines += prediction_report(adata, args.key, min_expected_pcc=args.min_expected_pcc)
    print("\n".join(lines))
    return 0


def _predict_command(args: argparse.Namespace) -> int:
    """``stexp predict``: one slide (:func:`_predict`), or several into a folder (:func:`stexp._batch.predict_many`)."""
    from stexp._batch import is_batch, predict_many

    if args.describe or not args.slide or args.out is None:  # the card, or the one-slide command's usage error
        args.slide = args.slide[0] if args.slide else None
        return _predict(args)
    if is_batch(args.slide, args.out):
        return predict_many(args, _predict)
    args.slide = args.slide[0]
    return _predict(args)


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}") from None
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return x


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``stexp`` command."""
    from stexp import __version__
    from stexp._batch import SLIDES_HELP, add_batch_options, add_embed_parser

    parser = argparse.ArgumentParser(prog="stexp", description="Predict spatial gene expression from H&E histology.")
    parser.add_argument("--version", action="version", version=f"stexp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run the user's path on demo data",
        description="Run stexp on demo data: the default pipeline (what stexp.tl.fit trains without model=) "
        "beside mclSTExp and baselines, on a held-out slide.",
    )
    demo.add_argument("--out", default="stexp_demo", help="output folder (default: %(default)s)")
    demo.add_argument(
        "--data",
        choices=DATA_CHOICES,
        default="synthetic",
        help="synthetic (built in, no downloads) or her2st (HER2+ sections from $STEXP_DATA_DIR)",
    )
    demo.add_argument(
        "--epochs", type=_positive_int, default=40, help="training epochs of mclSTExp (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="warnings only: no progress bars or step messages")
    demo.set_defaults(func=_demo)

    pred = sub.add_parser(
        "predict",
        help="predict expression over the tissue of a whole-slide image",
        description="Predict expression on pseudo-spots over the tissue of a slide (SVS, NDPI, MRXS, SCN, "
        "pyramidal TIFF, OME-TIFF, JPEG...) with a saved model; the slide is read region by region.",
    )
    pred.add_argument("slide", nargs="*", help=SLIDES_HELP + " (none with --describe)")
    pred.add_argument(
        "--model",
        required=True,
        help="folder of a model saved with model.save(), or a pretrained model's name (stexp.models.pretrained(), "
        "e.g. her2st-breast)",
    )
    pred.add_argument("--describe", action="store_true", help="print the model's card and exit")
    pred.add_argument(
        "--out",
        default=None,
        help="output (required unless --describe): OUT.h5ad (AnnData) or OUT.zarr (SpatialData), and the figure "
        "OUT_genes.png beside it; existing ones are refused before any work unless --overwrite is given; a "
        "folder for several slides (complete outputs in it are skipped)",
    )
    pred.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUT and OUT_genes.png (each is kept until its replacement is complete)",
    )
    pred.add_argument("--mpp", type=_positive_float, default=None, help="µm per pixel (default: from the file)")
    pred.add_argument("--spot-diameter-um", type=_positive_float, default=55.0, help="pseudo-spot diameter (µm)")
    pred.add_argument("--spacing-um", type=_positive_float, default=100.0, help="grid spacing (µm)")
    pred.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA when available, else the CPU), cpu, cuda, cuda:N or mps; checked before any work "
        "(default: %(default)s)",
    )
    pred.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        help="patches per forward pass (default: %(default)s; on a CPU 64 adds ~0.5 GB of activations for "
        "about the same speed)",
    )
    pred.add_argument("--key", default="stexp_pred", help="key of the prediction (default: %(default)s)")
    pred.add_argument(
        "--min-expected-pcc",
        type=float,
        default=0.1,
        help="the summary names the genes whose expected PCC on the slide reaches this (default: %(default)s)",
    )
    pred.add_argument("--quiet", action="store_true", help="warnings only: no progress bar or step messages")
    add_batch_options(pred, "predict")
    pred.set_defaults(func=_predict_command)
    add_embed_parser(sub, _positive_int, _positive_float)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stexp`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def console_main() -> int:
    """The ``stexp`` console script: :func:`main` in a process of its own, its allocator tuned for CPU inference.

    :func:`stexp._malloc.tune_for_inference` changes this process only; ``main`` called from Python (a
    notebook, the tests) leaves the caller's allocator alone.
    """
    from stexp._malloc import tune_for_inference

    tune_for_inference()
    return main()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(console_main())
