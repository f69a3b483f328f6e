"""``stexp embed`` / ``stexp predict`` over many slides: one output per slide, resume, progress, failures at the end.

Slides are given as paths, globs (``"slides/*.svs"``, quoted so that the shell leaves them) or list files
(``@slides.txt``: one path per line, ``#`` comments). Each slide's output is written under a hidden name
and renamed into place when complete (:mod:`stexp._files`), so an output that exists is complete and a
rerun skips it; an interrupted slide leaves nothing and is done again. A failing slide is reported and
the next one goes on; the run ends with a summary and exit status 1 if any slide failed.
``--shard I/N`` keeps every N-th slide from the I-th (0-based, in sorted order): one array task of a
cluster job per shard.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT_FORMATS = ("h5ad", "zarr")


def expand_slides(items: Sequence[str]) -> list[Path]:
    """The slide files named by paths, globs and ``@list`` files, in order, each once.

    Raises
    ------
    FileNotFoundError
        If a list file, a path, or every match of a glob is missing (all missing ones named).
    ValueError
        If nothing is named.
    """
    paths: list[Path] = []
    missing: list[str] = []
    for item in items:
        if item.startswith("@"):
            listing = Path(item[1:])
            if not listing.is_file():
                raise FileNotFoundError(f"list file {listing} does not exist (@FILE names a file of slide paths).")
            lines = [ln.split("#", 1)[0].strip() for ln in listing.read_text().splitlines()]
            named = [Path(os.path.expanduser(ln)) for ln in lines if ln]
        elif glob.has_magic(item):
            named = [Path(p) for p in sorted(glob.glob(os.path.expanduser(item), recursive=True))]
            if not named:
                missing.append(f"{item} (no file matches)")
        else:
            named = [Path(os.path.expanduser(item))]
        missing.extend(str(p) for p in named if not p.exists())
        paths.extend(named)
    seen: dict[str, Path] = {}
    for path in paths:
        seen.setdefault(str(path.absolute()), path)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} slide(s) not found: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}."
        )
    if not seen:
        raise ValueError("no slide given (the list files are empty).")
    return list(seen.values())


def parse_shard(value: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N`` (argparse type)."""
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be I/N, e.g. 0/4, got {value}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"must be I/N with 0 <= I < N, got {value}")
    return i, n


def slide_name(path: Path) -> str:
    """A slide's name: its file name up to the first dot (as :func:`stexp.io.read_wsi` names its library)."""
    return path.name.split(".")[0] or path.name


def is_batch(slides: Sequence[str], out: str) -> bool:
    """Whether a command works on many slides: several, a glob or a list file, or an ``--out`` folder."""
    one = len(slides) == 1 and not slides[0].startswith("@") and not glob.has_magic(slides[0])
    out_path = Path(out)
    names_file = bool(out_path.suffix) and not out_path.is_dir()  # e.g. pred.csv: a one-slide output, checked there
    return not (one and (out_path.suffix in (".h5ad", ".zarr") or names_file))


def is_rank_zero() -> bool:
    """False in the processes of a launcher (torchrun, SLURM ``srun``) other than rank 0."""
    from stexp.models._engine import launcher_layout

    if launcher_layout() is None:
        return True
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


class StopRun(Exception):
    """A failure that no slide of the run can avoid (e.g. the model cannot be loaded): the run stops."""


@dataclass
class Run:
    """What a batch run did, slide by slide."""

    command: str
    total: int
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    speak: bool = True

    def say(self, text: str, *, err: bool = False) -> None:
        if self.speak:
            print(text, file=sys.stderr if err else sys.stdout, flush=True)

    def summary(self) -> int:
        """Print the end of the run; the exit status (1 if a slide failed)."""
        line = (
            f"stexp {self.command}: {len(self.done)} of {self.total} slide(s) done, "
            f"{len(self.skipped)} skipped (output complete already), {len(self.failed)} failed"
        )
        self.say(line + ("" if self.failed else "."))
        for name, why in self.failed:
            self.say(f"  failed: {name}: {why}", err=True)
        return 1 if self.failed else 0


def _plan(command: str, args: argparse.Namespace, suffix: str) -> tuple[list[tuple[Path, Path]], Path]:
    """``(slide, output)`` of the slides this run (shard) handles, and the output folder.

    Raises
    ------
    FileNotFoundError, ValueError
        As :func:`expand_slides`; and when two slides would write the same output, or ``--out`` is a file.
    """
    slides = expand_slides(args.slide)
    out_dir = Path(args.out)
    if out_dir.suffix in (".h5ad", ".zarr"):
        raise ValueError(
            f"--out {out_dir} names a file, but {len(slides)} slides (or a glob / list file) were given: pass a "
            f"folder, where stexp {command} writes one output per slide."
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; pass a folder for the outputs of several slides.")
    by_name: dict[str, list[Path]] = {}
    for s in slides:
        by_name.setdefault(slide_name(s), []).append(s)
    clashes = {n: ps for n, ps in by_name.items() if len(ps) > 1}
    if clashes:
        name, ps = next(iter(clashes.items()))
        raise ValueError(
            f"{sum(len(p) for p in clashes.values())} slides share an output name, e.g. {', '.join(map(str, ps))} "
            f"would all write {out_dir / (name + suffix)}; rename them or run them into separate --out folders."
        )
    order = sorted(slides, key=lambda p: str(p))
    if args.shard is not None:
        i, n = args.shard
        order = order[i::n]
    return [(s, out_dir / f"{slide_name(s)}{suffix}") for s in order], out_dir


def _loop(
    run: Run,
    todo: list[tuple[Path, Path]],
    *,
    complete: Callable[[Path], str | None],
    work: Callable[[Path, Path], int],
) -> int:
    """Each slide in turn: skip it when ``complete(out)`` says so, else ``work`` it; the summary's exit status.

    ``complete`` returns ``None`` (not done), ``"done"`` or a reason the existing output is refused.
    ``work`` returns the number of spots; it raises on failure.
    """
    for k, (slide, out) in enumerate(todo, 1):
        head = f"[{k}/{len(todo)}] {slide.name}"
        state = complete(out)
        if state == "done":
            run.skipped.append(slide.name)
            run.say(f"{head}: skipped, {out} is complete")
            continue
        if state is not None:
            run.failed.append((slide.name, state))
            run.say(f"{head}: failed: {state}", err=True)
            continue
        t0 = time.perf_counter()
        try:
            n = work(slide, out)
        except KeyboardInterrupt:
            run.say(f"{head}: interrupted; rerun the same command to go on from this slide", err=True)
            raise
        except StopRun:
            raise
        except Exception as err:  # noqa: BLE001 - one slide's failure must not stop the others
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            why = f"{type(err).__name__}: {' '.join(str(message).split())}"
            run.failed.append((slide.name, why))
            run.say(f"{head}: failed after {time.perf_counter() - t0:.1f} s: {why}", err=True)
            continue
        run.done.append(slide.name)
        run.say(f"{head}: {n} spots in {time.perf_counter() - t0:.1f} s -> {out}")
    return run.summary()


class _Tee:
    """Copy what is written to ``sys.stderr`` in the block into :attr:`text`, still writing it through."""

    def __enter__(self) -> _Tee:
        self.text = ""
        self._stderr = sys.stderr
        tee = self

        class _Writer:
            def write(self, s: str) -> int:
                tee.text += s
                return tee._stderr.write(s)

            def flush(self) -> None:
                tee._stderr.flush()

            def __getattr__(self, name: str):
                return getattr(tee._stderr, name)  # isatty, encoding...

        sys.stderr = _Writer()
        return self

    def __exit__(self, *exc) -> None:
        sys.stderr = self._stderr


# -- stexp predict ---------------------------------------------------------------------------------------------


def _n_obs(path: Path) -> int:
    """Spots in a written prediction (AnnData file, or the table of a SpatialData store)."""
    import anndata as ad

    if path.suffix == ".zarr":
        from spatialdata import read_zarr

        return int(read_zarr(path).tables["table"].n_obs)
    backed = ad.read_h5ad(path, backed="r")
    try:
        return int(backed.n_obs)
    finally:
        backed.file.close()


def predict_many(args: argparse.Namespace, predict_one: Callable[[argparse.Namespace], int]) -> int:
    """``stexp predict`` over several slides: ``predict_one`` (the one-slide command) per slide, the model loaded once."""
    from stexp.cli import INPUT_ERRORS, _fail

    suffix = f".{args.format}"
    try:
        todo, out_dir = _plan("predict", args, suffix)
        from stexp._devices import check_device

        device = check_device(args.device)
    except INPUT_ERRORS as err:
        return _fail("predict", err)
    run = Run("predict", len(todo))
    run.say(f"stexp predict: {len(todo)} slide(s) -> {out_dir}/ (one {suffix} and one _genes.png per slide)")

    def complete(out: Path) -> str | None:
        figure = out.with_name(out.stem + "_genes.png")
        if args.overwrite:
            return None
        return "done" if (out.exists() and figure.exists()) else None  # both are written complete or not at all

    model = None

    def work(slide: Path, out: Path) -> int:
        nonlocal model
        if model is None:  # loaded at the first slide to predict (not at all when every slide is done)
            import stexp

            try:
                model = stexp.models.load(args.model, device=device)
            except INPUT_ERRORS as err:
                raise StopRun(err) from err
        one = argparse.Namespace(**{**vars(args), "slide": str(slide), "out": str(out), "overwrite": True})
        one.loaded_model = model
        with _Tee() as tee:  # the one-slide command prints its error itself: keep it for the summary
            status = predict_one(one)
        if status != 0:
            errors = [ln for ln in tee.text.splitlines() if ln.startswith("stexp predict: error: ")]
            raise RuntimeError(errors[-1].removeprefix("stexp predict: error: ") if errors else f"exit status {status}")
        return _n_obs(out)

    if todo:
        out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _loop(run, todo, complete=complete, work=work)
    except StopRun as err:  # the model could not be loaded: no slide can be predicted
        run.say(f"stexp predict: stopped after {len(run.done)} slide(s)", err=True)
        return _fail("predict", err.__cause__ or err)


# -- stexp embed -----------------------------------------------------------------------------------------------


def _features_state(out: Path, key: str, encoder: str, views: dict[str, Any]) -> str | None:
    """``"done"`` when ``out`` holds features ``key`` of ``encoder`` made with ``views``; ``None``: absent; else: why not.

    ``views``: the view options of the run that change the features (:class:`~stexp.images.EncoderSpec` fields:
    ``stain_norm``, ``adapt_bn``, ``deblock``), so that a rerun with other options does not take features made without them
    as done.
    """
    if not out.exists():
        return None
    import h5py

    try:
        with h5py.File(out, "r") as f:
            rec = f.get(f"uns/stexp/features/{key}")
            recorded = {} if rec is None else {name: rec[name][()] for name in ("encoder", *views) if name in rec}
    except OSError as err:
        return f"{out} exists but cannot be read ({err}); pass --overwrite to replace it"
    if "encoder" not in recorded:
        return f"{out} exists without features {key!r}; pass --overwrite to replace it, or choose another --out"
    from stexp.images._spec import EncoderSpec

    # the record read back as embed_images reads it (absent view options are their defaults)
    made = EncoderSpec.from_mapping({name: v.decode() if isinstance(v, bytes) else v for name, v in recorded.items()})
    if str(made.encoder) != encoder and not Path(encoder).exists():  # a local model folder: another name
        return (
            f"{out} holds features of encoder {made.encoder!r}, not {encoder!r}; pass --overwrite to replace it, or "
            "choose another --out"
        )
    differ = [
        f"{name}={getattr(made, name)!r} (this run: {wanted!r})"
        for name, wanted in views.items()
        if getattr(made, name) != wanted
    ]
    if differ:
        return (
            f"{out} holds features made with {', '.join(differ)}; pass --overwrite to replace it, or choose "
            "another --out"
        )
    return "done"


def _read_slide(path: Path, args: argparse.Namespace):
    """An AnnData of the slide's spots: an ``.h5ad`` as it is, a slide file as pseudo-spots (``read_wsi``)."""
    import stexp

    if path.suffix == ".h5ad":
        import anndata as ad

        return ad.read_h5ad(path)
    return stexp.io.read_wsi(path, mpp=args.mpp, spot_diameter_um=args.spot_diameter_um, spacing_um=args.spacing_um)


def embed_command(args: argparse.Namespace) -> int:
    """``stexp embed``: image features of the spots of one or many slides, one ``.h5ad`` per slide."""
    from stexp.cli import INPUT_ERRORS, _fail, _write_replacing
    from stexp.pp._embed import default_key

    from ._settings import settings

    if args.quiet:
        settings.verbosity = 1
    key = args.key or default_key(args.encoder)
    speak = is_rank_zero()  # under torchrun / srun every rank runs this; rank 0 writes and reports
    try:
        from stexp._devices import check_device

        device = check_device(args.device)
        if is_batch(args.slide, args.out):
            todo, out_dir = _plan("embed", args, ".h5ad")
        else:
            todo, out_dir = [(expand_slides(args.slide)[0], Path(args.out))], Path(args.out).parent
            if Path(args.out).suffix != ".h5ad":
                raise ValueError(f"--out must be a folder or end in .h5ad, got {args.out!r}.")
    except INPUT_ERRORS as err:
        return _fail("embed", err) if speak else 1
    run = Run("embed", len(todo), speak=speak)
    run.say(f"stexp embed: {len(todo)} slide(s) -> {out_dir}/ (features adata.obsm[{key!r}], {args.encoder})")
    weights = None if args.weights == "none" else args.weights

    stain_norm = None if args.stain_norm == "none" else args.stain_norm
    views = {"stain_norm": stain_norm, "adapt_bn": bool(args.adapt_bn), "deblock": not args.no_deblock}

    def complete(out: Path) -> str | None:
        return None if args.overwrite else _features_state(out, key, args.encoder, views)

    encoder = None

    def work(slide: Path, out: Path) -> int:
        nonlocal encoder
        import stexp

        adata = _read_slide(slide, args)
        if encoder is None:  # built once for the run, at the first slide to embed (loading weights takes seconds)
            try:
                encoder = stexp.images.build_encoder(args.encoder, weights)
            except INPUT_ERRORS as err:
                raise StopRun(err) from err
        stexp.pp.embed_images(
            adata, encoder=encoder, patch_um=args.patch_um, batch_size=args.batch_size,
            device=device, devices=args.devices, key_added=key, overwrite=args.overwrite,
            stain_norm=stain_norm, adapt_bn=args.adapt_bn, deblock=not args.no_deblock,
        )  # fmt: skip
        if speak:
            out.parent.mkdir(parents=True, exist_ok=True)
            _write_replacing(out, adata.write_h5ad)
        return int(adata.n_obs)

    try:
        return _loop(run, todo, complete=complete, work=work)
    except StopRun as err:  # the encoder could not be built: no slide can be embedded
        run.say(f"stexp embed: stopped after {len(run.done)} slide(s)", err=True)
        return _fail("embed", err.__cause__ or err) if speak else 1


def add_batch_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The options of several slides: ``--shard`` (and ``--format`` for predict)."""
    parser.add_argument(
        "--shard",
        type=parse_shard,
        default=None,
        metavar="I/N",
        help="handle only every N-th slide from the I-th (0-based, sorted by path): one cluster array task per shard",
    )
    if command == "predict":
        parser.add_argument(
            "--format",
            choices=OUT_FORMATS,
            default="h5ad",
            help="output of each slide when --out is a folder: h5ad (AnnData) or zarr (SpatialData) (default: %(default)s)",
        )


SLIDES_HELP = (
    "slide file(s): several paths, globs ('slides/*.svs', quoted) or @list.txt (one path per line); with "
    "several, --out is a folder with one output per slide, complete outputs are skipped (resume), and a "
    "failing slide is reported at the end (exit status 1)"
)


def add_embed_parser(sub, positive_int, positive_float) -> None:
    """The ``stexp embed`` subcommand."""
    from stexp.images._encoders import DEFAULT_ENCODER
    from stexp.images._views import DEFAULT_STAIN_NORM, STAIN_NORMS

    emb = sub.add_parser(
        "embed",
        help="image features of the spots of one or many slides",
        description="Embed the H&E patch of every spot with an image encoder (stexp.pp.embed_images): an .h5ad "
        "in stexp's layout (its spots), or a slide file (pseudo-spots over the tissue, as stexp predict makes).",
    )
    emb.add_argument("slide", nargs="+", help=SLIDES_HELP)
    emb.add_argument("--out", required=True, help="a folder (one SLIDE.h5ad per slide), or OUT.h5ad for one slide")
    emb.add_argument("--encoder", default=DEFAULT_ENCODER, help="registry name, timm:..., or a local model folder")
    emb.add_argument("--weights", default="imagenet", help="imagenet, none, or a local state-dict file")
    emb.add_argument("--patch-um", type=positive_float, default=None, help="patch side in µm (default: per slide)")
    emb.add_argument("--mpp", type=positive_float, default=None, help="µm per pixel of a slide file")
    emb.add_argument("--spot-diameter-um", type=positive_float, default=55.0, help="pseudo-spot diameter (µm)")
    emb.add_argument("--spacing-um", type=positive_float, default=100.0, help="grid spacing (µm)")
    emb.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    emb.add_argument(
        "--devices",
        type=positive_int,
        default=None,
        help="shard each slide's patches over N processes / GPUs (Lightning; see docs/distributed.md)",
    )
    emb.add_argument(
        "--stain-norm",
        choices=[norm or "none" for norm in STAIN_NORMS],
        default=DEFAULT_STAIN_NORM,
        help="stain normalisation of every slide before embedding (default: %(default)s, as embed_images)",
    )
    emb.add_argument(
        "--adapt-bn",
        action="store_true",
        help="re-estimate the encoder's BatchNorm statistics on each slide's own patches before embedding it "
        "(AdaBN; embed_images(adapt_bn=True); needs an encoder with BatchNorm layers)",
    )
    emb.add_argument(
        "--no-deblock",
        action="store_true",
        help="embed a slide with heavy JPEG block artefacts as it is (default: deblocked first, as embed_images)",
    )
    emb.add_argument("--batch-size", type=positive_int, default=32, help="patches per forward pass")
    emb.add_argument("--key", default=None, help="obsm key of the features (default: X_stexp_<encoder>)")
    emb.add_argument("--overwrite", action="store_true", help="recompute and replace existing outputs")
    add_batch_options(emb, "embed")
    emb.add_argument("--quiet", action="store_true", help="warnings only: no progress bars or step messages")
    emb.set_defaults(func=embed_command)
