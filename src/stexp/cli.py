"""The ``stexp`` command line: ``stexp demo`` runs the user's path end to end on demo data."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

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
    from stexp._demo import load_demo_data, run_demo
    from stexp._settings import settings

    if args.quiet:
        settings.verbosity = 1  # warnings only: no progress bars, no "added ..." messages
    loaded = load_demo_data(args.data)
    print(f"stexp demo ({args.data} data)")
    print(describe(loaded[0]))
    print(f"embed images -> fit ({args.epochs} epochs) -> predict {loaded[1]!r} -> evaluate -> domains -> plots")
    report = run_demo(args.out, data=args.data, epochs=args.epochs, seed=args.seed, loaded=loaded)
    print()
    print(report.read_text())
    print(f"written to {report.parent}/")
    return 0


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``stexp`` command."""
    from stexp import __version__

    parser = argparse.ArgumentParser(prog="stexp", description="Predict spatial gene expression from H&E histology.")
    parser.add_argument("--version", action="version", version=f"stexp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the user's path on demo data", description="Run stexp on demo data.")
    demo.add_argument("--out", default="stexp_demo", help="output folder (default: %(default)s)")
    demo.add_argument(
        "--data",
        choices=DATA_CHOICES,
        default="synthetic",
        help="synthetic (built in, no downloads) or her2st (HER2+ sections from $STEXP_DATA_DIR)",
    )
    demo.add_argument("--epochs", type=_positive_int, default=40, help="training epochs (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="warnings only: no progress bars or step messages")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stexp`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
