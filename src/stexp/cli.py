"""The ``stexp`` command line: ``stexp demo`` builds the demo data and says what it holds."""

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


def _load(data: str):
    import stexp

    if data == "synthetic":
        return stexp.datasets.synthetic(n_slides=3, n_spots=256, n_genes=100, seed=0)
    return stexp.datasets.her2st(["B4", "C2", "C3", "C4", "C5", "C6"])


def _demo(args: argparse.Namespace) -> int:
    adata = _load(args.data)
    print(f"stexp demo ({args.data} data)")
    print(describe(adata))
    print(
        f"planned: embed images -> fit ({args.epochs} epochs) -> predict -> evaluate -> domains -> plots in {args.out}"
    )
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
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stexp`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
