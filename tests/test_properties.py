"""Property-based tests: odd inputs to the readers and checks raise a typed error or give a faithful result.

Allowed errors: ValueError, KeyError, TypeError, FileNotFoundError (and subclasses). Anything else
escaping (EOFError, pandas' EmptyDataError is a ValueError but names no file, IndexError, ...) fails.
"""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stexp

ALLOWED = (ValueError, KeyError, TypeError, FileNotFoundError)
FAST = settings(
    max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# -- read_st --------------------------------------------------------------------------------------------------

SPOT_IDS = [f"{x}x{y}" for x in range(1, 5) for y in range(1, 4)]
CELLS = ["0", "1", "3", "12", "2.5", "nan", "inf", "-inf", "-1", "", "NA", "abc", "1e40"]


@st.composite
def count_tables(draw):
    n_spots = draw(st.integers(0, 6))
    n_genes = draw(st.integers(0, 4))
    ids = draw(st.lists(st.sampled_from(SPOT_IDS), min_size=n_spots, max_size=n_spots))
    genes = draw(st.lists(st.sampled_from(["G1", "G2", "G3", "G4", "G5", ""]), min_size=n_genes, max_size=n_genes))
    odd = draw(st.booleans())
    cells = st.sampled_from(CELLS) if odd else st.sampled_from(["0", "1", "3", "12"])
    rows = [draw(st.lists(cells, min_size=n_genes, max_size=n_genes)) for _ in ids]
    ragged = draw(st.sampled_from([0, 0, 0, 1, -1])) if rows else 0
    if ragged == 1:
        rows[0].append("1")
    elif ragged == -1 and rows[0]:
        rows[0].pop()
    lines = ["\t".join(["", *genes])] + ["\t".join([i, *r]) for i, r in zip(ids, rows, strict=True)]
    text = "\n".join(lines) + "\n" if n_spots or n_genes else draw(st.sampled_from(["", "\n", "\t\n"]))
    return text, draw(st.sampled_from(["plain", "gzip", "truncated"]))


def _spot_file(folder: Path) -> Path:
    xs, ys = np.meshgrid(np.arange(1, 5), np.arange(1, 4))
    spots = pd.DataFrame({"x": xs.ravel(), "y": ys.ravel(), "selected": 1})
    spots["pixel_x"] = 30 + 20.0 * (spots["x"] - 1)
    spots["pixel_y"] = 25 + 20.0 * (spots["y"] - 1)
    spots.to_csv(folder / "spots.tsv", sep="\t", index=False)
    return folder / "spots.tsv"


@FAST
@given(table=count_tables())
def test_read_st_any_counts_table(table):
    text, how = table
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        spots = _spot_file(folder)
        path = folder / ("counts.tsv" if how == "plain" else "counts.tsv.gz")
        if how == "plain":
            path.write_text(text)
        else:
            data = gzip.compress(text.encode())
            path.write_bytes(data if how == "gzip" else data[: max(1, len(data) - 9)])
        try:
            adata = stexp.io.read_st(path, spots, library_id="A", um_per_px=10.0)
        except ALLOWED as err:
            assert str(err)
            return
    # read: what was written, unaltered (no renamed genes, no dropped or invented values)
    header = text.splitlines()[0].split("\t")[1:]
    assert list(adata.var_names) == header
    table = pd.DataFrame(
        [line.split("\t")[1:] for line in text.splitlines()[1:] if line.strip()],
        index=[line.split("\t")[0] for line in text.splitlines()[1:] if line.strip()],
    ).astype(float)
    expected = table.loc[adata.obs["spot_id"].to_numpy()].to_numpy(dtype=np.float32)
    np.testing.assert_array_equal(adata.X.toarray(), expected)
    assert np.isfinite(expected).all() and (expected >= 0).all()


@FAST
@given(
    scale=st.one_of(st.none(), st.text(max_size=3), st.floats(allow_nan=True, allow_infinity=True), st.booleans()),
    um=st.one_of(st.none(), st.floats(-10, 1e4)),
)
def test_read_st_any_scale(scale, um):
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        spots = _spot_file(folder)
        (folder / "c.tsv").write_text("\tG1\n" + "".join(f"{i}\t1\n" for i in SPOT_IDS))
        try:
            adata = stexp.io.read_st(folder / "c.tsv", spots, library_id="A", image_scale=scale, um_per_px=um)
        except ALLOWED:
            return
    assert adata.n_obs == len(SPOT_IDS)


# -- validate ----------------------------------------------------------------------------------------------

_BASE = None


def _base():
    global _BASE
    if _BASE is None:
        _BASE = stexp.datasets.synthetic(n_slides=2, n_spots=36, n_genes=8, seed=0)
    return _BASE.copy()


def _mutate(adata, kind: str, value):
    lib = adata.obs["library_id"].iloc[0]
    entry = adata.uns["spatial"][lib]
    if kind == "x_value":
        X = adata.X.toarray()
        X[1, 2] = value
        adata.X = X
    elif kind == "dup_var":
        adata.var_names = [adata.var_names[0]] * 2 + list(adata.var_names[2:])
    elif kind == "dup_obs":
        adata.obs_names = [adata.obs_names[0]] * 2 + list(adata.obs_names[2:])
    elif kind == "no_entry":
        del adata.uns["spatial"][lib]
    elif kind == "no_uns":
        del adata.uns["spatial"]
    elif kind == "no_spatial":
        del adata.obsm["spatial"]
    elif kind == "spatial_value":
        adata.obsm["spatial"][3, 0] = value
    elif kind == "scalefactor":
        entry["scalefactors"]["microns_per_pixel"] = value
    elif kind == "drop_scalefactor":
        entry["scalefactors"].pop("tissue_hires_scalef", None)
    elif kind == "no_images":
        entry["images"] = {}
    elif kind == "bad_source":
        entry["images"] = {}
        entry["metadata"]["source_image_path"] = "/nonexistent/slide.tif"
    elif kind == "unknown_library":
        adata.obs["library_id"] = adata.obs["library_id"].astype(str)
        adata.obs.iloc[0, adata.obs.columns.get_loc("library_id")] = "ghost"
    elif kind == "text_x":
        adata.X = adata.X.toarray().astype(str)
    return adata


@FAST
@given(
    kind=st.sampled_from(
        [
            "x_value",
            "dup_var",
            "dup_obs",
            "no_entry",
            "no_uns",
            "no_spatial",
            "spatial_value",
            "scalefactor",
            "drop_scalefactor",
            "no_images",
            "bad_source",
            "unknown_library",
            "text_x",
        ]
    ),
    value=st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 0.0, 1e30, "abc", None]),
)
def test_validate_any_layout(kind, value):
    adata = _base()
    try:
        adata = _mutate(adata, kind, value)
    except (ValueError, TypeError):
        return  # the mutation itself is impossible (e.g. a string into a float array)
    try:
        table = stexp.io.validate(adata)
    except ALLOWED as err:
        assert str(err)
        return
    # validated: counts finite and non-negative, names unique
    values = adata.X.data if hasattr(adata.X, "data") and not isinstance(adata.X, np.ndarray) else np.asarray(adata.X)
    assert np.isfinite(values).all() and (values >= 0).all()
    assert adata.var_names.is_unique and adata.obs_names.is_unique
    assert len(table) == adata.obs["library_id"].nunique()


# -- grid_spots ----------------------------------------------------------------------------------------------


@st.composite
def images(draw):
    h, w = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    channels = draw(st.sampled_from([None, 1, 2, 3, 4, 5]))
    dtype = draw(st.sampled_from(["uint8", "uint16", "float01", "float255", "float_wide", "bool", "int32"]))
    content = draw(st.sampled_from(["white", "black", "random", "tissue", "nan"]))
    shape = (h, w) if channels is None else (h, w, channels)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    unit = {"white": np.ones(shape), "black": np.zeros(shape), "random": rng.random(shape)}.get(content)
    if unit is None:
        unit = np.ones(shape)
        if channels is not None and channels >= 3:
            unit[h // 4 : 3 * h // 4 + 1, w // 4 : 3 * w // 4 + 1, 1] = 0.2  # a pink block
    if dtype == "bool":
        arr = unit > 0.5
    elif dtype in ("uint8", "uint16", "int32"):
        arr = (
            np.rint(unit * np.iinfo(dtype).max).astype(dtype)
            if dtype != "int32"
            else np.rint(unit * 65535).astype(dtype)
        )
    else:
        arr = unit * {"float01": 1.0, "float255": 255.0, "float_wide": 1000.0}[dtype] - (dtype == "float_wide") * 10
    if content == "nan" and np.issubdtype(arr.dtype, np.floating):
        arr.flat[0] = np.nan
    return arr


@FAST
@given(image=images(), um=st.sampled_from([0.5, 2.0, 8.0, 0.0, -1.0, float("nan")]), as_file=st.booleans())
def test_grid_spots_any_image(image, um, as_file):
    from PIL import Image

    with tempfile.TemporaryDirectory() as d:
        source = image
        if as_file and image.dtype in (np.uint8, np.uint16) and image.ndim == 2:
            source = Path(d) / "slide.png"
            Image.fromarray(image).save(source)  # 8- or 16-bit grayscale PNG
        try:
            adata = stexp.io.grid_spots(source, um_per_px=um)
        except ALLOWED as err:
            assert str(err)
            return
    hires = adata.uns["spatial"]["slide"]["images"]["hires"]
    assert hires.dtype == np.uint8 and hires.ndim == 3 and hires.shape[2] == 3
    assert adata.n_obs > 0 and np.isfinite(adata.obsm["spatial"]).all()


def test_allowed_errors_are_the_documented_ones():
    assert all(issubclass(e, Exception) for e in ALLOWED)
    with pytest.raises(ALLOWED):
        stexp.io.grid_spots(np.zeros((4, 4, 3), np.uint8), um_per_px=float("nan"))


# -- read_wsi's numeric options ------------------------------------------------------------------------------

#: Values of every kind a numeric option may be given: plausible and absurd numbers, and things that are not numbers.
ODD_NUMBERS = st.one_of(
    st.floats(min_value=1.0, max_value=2000.0),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10, 10**7),
    st.sampled_from([0, -0.0, 1e-300, 5e-324, 1e300, 0.05, 50.0, 0.5, 1.0]),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.just([1.0]),
)
WSI_OPTIONS = {
    "spot_diameter_um": ODD_NUMBERS,
    "spacing_um": ODD_NUMBERS,
    "mpp": ODD_NUMBERS,
    "tissue_threshold": st.one_of(st.floats(0, 1), ODD_NUMBERS),
    "min_tissue_fraction": st.one_of(st.floats(0, 1), ODD_NUMBERS),
}


@pytest.fixture(scope="module")
def wsi_slide(tmp_path_factory):
    """A 300 x 250 px pyramidal TIFF at 2 µm/px (600 x 500 µm) with tissue in the middle."""
    from test_wsi import _he, write_pyramid

    return write_pyramid(tmp_path_factory.mktemp("wsi") / "s.tif", _he(250, 300), n_levels=2)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from(sorted(WSI_OPTIONS)), data=st.data())
def test_read_wsi_any_numeric_option(wsi_slide, option, data):
    """Any value of an option works, or raises a ValueError / TypeError naming that option: never another
    type, never a MemoryError (sizes are checked against the slide before anything is allocated)."""
    value = data.draw(WSI_OPTIONS[option], label=option)
    try:
        adata = stexp.io.read_wsi(wsi_slide, **{option: value})
    except (ValueError, TypeError) as err:
        assert option in str(err), (option, value, str(err))
        return
    assert adata.n_obs > 0 and np.isfinite(adata.obsm["spatial"]).all()
    xy = adata.obsm["spatial"]
    assert (xy >= 0).all() and (xy[:, 0] < 300).all() and (xy[:, 1] < 250).all()


NUMERIC_CLI_OPTIONS = ("--mpp", "--spot-diameter-um", "--spacing-um", "--batch-size")


@FAST
@given(
    option=st.sampled_from(NUMERIC_CLI_OPTIONS),
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.integers(min_value=-(10**12), max_value=10**12).map(str),
        st.text(max_size=8),
    ),
)
def test_cli_numeric_options_parse_to_a_positive_number_or_exit_with_a_usage_error(option, value, capsys):
    """Any text given to a numeric option of ``stexp predict`` is a finite positive number, or argparse's exit 2."""
    from stexp.cli import build_parser

    if value.startswith("-"):  # argparse reads a leading dash as an option; pass it attached
        args = ["predict", "slide.tif", "--model", "m", f"{option}={value}"]
    else:
        args = ["predict", "slide.tif", "--model", "m", option, value]
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exit_:
        assert exit_.code == 2
        err = capsys.readouterr().err
        assert option in err or "error" in err
        return
    got = getattr(parsed, option.lstrip("-").replace("-", "_"))
    assert isinstance(got, (int, float)) and not isinstance(got, bool)
    assert np.isfinite(got) and got > 0
