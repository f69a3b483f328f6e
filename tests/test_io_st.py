import numpy as np
import pandas as pd
import pytest
from PIL import Image

import stexp

PITCH_PX = 20.0  # 200 µm pitch -> 10 µm per px


def write_st(
    folder, *, n_x=6, n_y=5, n_genes=8, size=(200, 160), offset=(30.0, 25.0), seed=0, missing=(), selected_off=()
):
    """A tiny legacy ST section: counts tsv.gz, spot selection tsv and a jpg; returns their paths."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    xs, ys = np.meshgrid(np.arange(1, n_x + 1), np.arange(1, n_y + 1))
    xs, ys = xs.ravel(), ys.ravel()
    spots = pd.DataFrame(
        {
            "x": xs,
            "y": ys,
            "new_x": xs + 0.01,
            "new_y": ys - 0.01,
            "pixel_x": offset[0] + (xs - 1) * PITCH_PX,
            "pixel_y": offset[1] + (ys - 1) * PITCH_PX,
            "selected": 1,
        }
    )
    ids = [f"{x}x{y}" for x, y in zip(xs, ys, strict=True)]
    for sid in selected_off:
        spots.loc[np.asarray(ids) == sid, "selected"] = 0
    keep = [i for i in ids if i not in missing]
    counts = pd.DataFrame(rng.poisson(3, (len(keep), n_genes)), index=keep, columns=[f"G{i}" for i in range(n_genes)])
    counts.to_csv(folder / "counts.tsv.gz", sep="\t")
    spots.to_csv(folder / "spots.tsv", sep="\t", index=False)
    img = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(img).save(folder / "he.jpg")
    return folder / "counts.tsv.gz", folder / "spots.tsv", folder / "he.jpg"


def test_read_st_layout(tmp_path):
    c, s, i = write_st(tmp_path, missing=("3x3",), selected_off=("1x1",))
    adata = stexp.io.read_st(c, s, i, library_id="A1")
    counts = pd.read_csv(c, sep="\t", index_col=0)
    spots = pd.read_csv(s, sep="\t")
    sel = spots[spots.selected == 1]
    expected = {f"{x}x{y}" for x, y in zip(sel.x, sel.y, strict=True)} & set(counts.index)
    assert adata.n_obs == len(expected) == 28
    assert set(adata.obs["spot_id"]) == expected
    assert adata.X.format == "csr" and adata.X.dtype == np.float32
    assert isinstance(adata.obs["library_id"].dtype, pd.CategoricalDtype)
    # array_row = y, array_col = x; spatial = pixel (x, y); counts follow their spot
    row = adata.obs.loc["A1_4x2"]
    assert (row.array_col, row.array_row) == (4, 2)
    np.testing.assert_allclose(adata[["A1_4x2"]].obsm["spatial"][0], [30 + 3 * PITCH_PX, 25 + PITCH_PX])
    np.testing.assert_array_equal(adata[["A1_4x2"]].X.toarray()[0], counts.loc["4x2"].to_numpy())
    entry = adata.uns["spatial"]["A1"]
    sf = entry["scalefactors"]
    assert sf["microns_per_pixel"] == pytest.approx(200 / PITCH_PX, rel=1e-6)
    assert sf["spot_diameter_um"] == 100.0
    assert sf["spot_diameter_fullres"] == pytest.approx(100 / sf["microns_per_pixel"])
    assert entry["images"]["hires"].shape[:2] == (160, 200)
    assert entry["images"]["lowres"].shape[1] == round(200 * sf["tissue_lowres_scalef"])
    assert entry["metadata"]["source_image_path"] == str(i.resolve())
    assert entry["metadata"]["has_image"] is True
    assert stexp._layout.um_per_px(adata, "A1") == pytest.approx(10.0)
    summary = stexp.io.validate(adata)
    assert summary.loc["A1", "n_outside_image"] == 0


def test_read_st_image_scale_and_um_per_px(tmp_path):
    c, s, i = write_st(tmp_path, size=(400, 320))
    adata = stexp.io.read_st(c, s, i, library_id="A1", image_scale=2.0)
    ref = stexp.io.read_st(c, s, i, library_id="A1")
    np.testing.assert_allclose(adata.obsm["spatial"], 2 * ref.obsm["spatial"])
    assert adata.uns["spatial"]["A1"]["scalefactors"]["microns_per_pixel"] == pytest.approx(5.0)
    given = stexp.io.read_st(c, s, i, library_id="A1", um_per_px=4.0)
    assert given.uns["spatial"]["A1"]["scalefactors"]["microns_per_pixel"] == 4.0
    with pytest.raises(ValueError, match="plausible range"):
        stexp.io.read_st(c, s, i, library_id="A1", um_per_px=4000.0)


def test_read_st_downscales_large_image(tmp_path):
    c, s, i = write_st(tmp_path, size=(2600, 1300))
    entry = stexp.io.read_st(c, s, i, library_id="A1").uns["spatial"]["A1"]
    assert max(entry["images"]["hires"].shape[:2]) == 2000
    assert max(entry["images"]["lowres"].shape[:2]) == 600
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(2000 / 2600, rel=1e-3)


def test_read_st_without_image(tmp_path):
    c, s, _ = write_st(tmp_path)
    adata = stexp.io.read_st(c, s, library_id="A1")
    entry = adata.uns["spatial"]["A1"]
    assert entry["images"] == {} and entry["metadata"]["has_image"] is False
    assert stexp.io.validate(adata).loc["A1", "has_image"] == False  # noqa: E712


def test_read_st_labels(tmp_path):
    c, s, i = write_st(tmp_path)
    lab = pd.DataFrame(
        {"x": [2.04, 3.96, np.nan, 50.0], "y": [1.02, 5.01, 2.0, 50.0], "label": ["tumour", "stroma", "x", "y"]}
    )
    adata = stexp.io.read_st(c, s, i, library_id="A1", labels=lab)
    assert adata.obs.loc["A1_2x1", "label"] == "tumour"
    assert adata.obs.loc["A1_4x5", "label"] == "stroma"
    assert adata.obs["label"].notna().sum() == 2


def test_missing_image_file(tmp_path):
    c, s, _ = write_st(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        stexp.io.read_st(c, s, tmp_path / "nope.jpg", library_id="A1")


def test_counts_and_spots_do_not_join(tmp_path):
    c, s, i = write_st(tmp_path)
    spots = pd.read_csv(s, sep="\t")
    spots["x"] += 100
    with pytest.raises(ValueError, match="only 0 of 30 count spots match"):
        stexp.io.read_st(c, spots, i, library_id="A1")


def test_nan_counts(tmp_path):
    c, s, i = write_st(tmp_path)
    counts = pd.read_csv(c, sep="\t", index_col=0).astype(float)
    counts.iloc[2, 3] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        stexp.io.read_st(counts, s, i, library_id="A1")


def test_counts_file_parsing_matches_pandas(tmp_path):
    from stexp.io._st import _parse_counts_fast

    c, s, i = write_st(tmp_path, n_genes=12)
    ref = pd.read_csv(c, sep="\t", index_col=0)
    fast = _parse_counts_fast(c)
    assert fast.index.equals(ref.index.astype(str)) and fast.columns.equals(ref.columns)
    np.testing.assert_array_equal(fast.to_numpy(), ref.to_numpy(dtype=float))
    # uncompressed file, and files numpy cannot take (NA field, text value) go through pandas' rules
    plain = tmp_path / "counts.tsv"
    ref.to_csv(plain, sep="\t")
    assert _parse_counts_fast(plain).shape == ref.shape
    with_na = ref.astype(object)
    with_na.iloc[1, 2] = "NA"
    with_na.to_csv(plain, sep="\t")
    assert _parse_counts_fast(plain) is None
    with pytest.raises(ValueError, match="1 NaN"):
        stexp.io.read_st(plain, s, i, library_id="A1")
    with_na.iloc[1, 2] = "abc"
    with_na.to_csv(plain, sep="\t")
    with pytest.raises(ValueError, match="non-numeric count columns"):
        stexp.io.read_st(plain, s, i, library_id="A1")


def test_negative_counts(tmp_path):
    c, s, i = write_st(tmp_path)
    counts = pd.read_csv(c, sep="\t", index_col=0)
    counts.iloc[0, 0] = -2
    with pytest.raises(ValueError, match="negative counts"):
        stexp.io.read_st(counts, s, i, library_id="A1")


def test_empty_slide(tmp_path):
    c, s, i = write_st(tmp_path)
    spots = pd.read_csv(s, sep="\t")
    spots["selected"] = 0
    with pytest.raises(ValueError, match="no \\(selected\\) spots"):
        stexp.io.read_st(c, spots, i, library_id="A1")
    counts = pd.read_csv(c, sep="\t", index_col=0).iloc[:0]
    with pytest.raises(ValueError, match="empty"):
        stexp.io.read_st(counts, s, i, library_id="A1")


def test_duplicated_spot_ids(tmp_path):
    c, s, i = write_st(tmp_path)
    counts = pd.read_csv(c, sep="\t", index_col=0)
    counts = pd.concat([counts, counts.iloc[[0]]])
    with pytest.raises(ValueError, match="1 duplicated spot ids in the counts"):
        stexp.io.read_st(counts, s, i, library_id="A1")
    spots = pd.read_csv(s, sep="\t")
    spots = pd.concat([spots, spots.iloc[[3]]])
    with pytest.raises(ValueError, match="duplicated spot ids in the spot file"):
        stexp.io.read_st(c, spots, i, library_id="A1")


def test_spots_outside_image_raise_and_drop(tmp_path):
    # image 100 px wide: spots at x = 30 + 20 * k, k = 0..5 -> x = 110, 130 fall outside
    c, s, i = write_st(tmp_path, size=(100, 160))
    with pytest.raises(ValueError, match=r"'A1': 10 of 30 spots lie outside.*x in \[110.0, 130.0\]"):
        stexp.io.read_st(c, s, i, library_id="A1")
    adata = stexp.io.read_st(c, s, i, library_id="A1", on_outside="drop")
    assert adata.n_obs == 20
    assert adata.obsm["spatial"][:, 0].max() < 100


def test_read_st_real_sections(her2st_dir):
    import time

    for sec, patient in (("B4", "B"), ("C2", "C")):
        counts = pd.read_csv(her2st_dir / "ST-cnts" / f"{sec}.tsv.gz", sep="\t", index_col=0, usecols=[0])
        spots = pd.read_csv(her2st_dir / "ST-spotfiles" / f"{sec}_selection.tsv", sep="\t")
        spots = spots[spots.selected == 1]
        ids = {f"{int(x)}x{int(y)}" for x, y in zip(spots.x, spots.y, strict=True)}
        expected = len(ids & set(counts.index.astype(str)))
        (img,) = (her2st_dir / "ST-imgs" / patient / sec).glob("*.jpg")
        t0 = time.perf_counter()
        adata = stexp.io.read_st(
            her2st_dir / "ST-cnts" / f"{sec}.tsv.gz",
            her2st_dir / "ST-spotfiles" / f"{sec}_selection.tsv",
            img,
            library_id=sec,
        )
        assert time.perf_counter() - t0 < 20
        assert adata.n_obs == expected
        if sec == "B4":
            assert 0.6 < stexp._layout.um_per_px(adata, "B4") < 0.8
        assert stexp.io.validate(adata).loc[sec, "n_outside_image"] == 0


# -- damaged and ambiguous inputs: a typed error naming the file, never a silently different table -------------


def test_truncated_gzip_counts_names_the_file(tmp_path):
    c, s, i = write_st(tmp_path)
    raw = c.read_bytes()
    cut = tmp_path / "cut.tsv.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.tsv\.gz.*truncated"):
        stexp.io.read_st(cut, s, i, library_id="A1")
    damaged = tmp_path / "damaged.tsv.gz"
    damaged.write_bytes(raw[:10] + bytes(200))
    with pytest.raises(ValueError, match="damaged.tsv.gz"):
        stexp.io.read_st(damaged, s, i, library_id="A1")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "empty.tsv' is empty"),
        ("\n\n", "empty.tsv' is empty"),
        ("\tG0\tG1\n", r"empty.tsv' is empty \(0 spots x 2 genes\)"),
    ],
)
def test_empty_counts_file_names_the_file(tmp_path, content, match):
    _, s, i = write_st(tmp_path)
    (tmp_path / "empty.tsv").write_text(content)
    with pytest.raises(ValueError, match=match):
        stexp.io.read_st(tmp_path / "empty.tsv", s, i, library_id="A1")


def test_binary_counts_file_names_the_file(tmp_path):
    _, s, i = write_st(tmp_path)
    (tmp_path / "blob.tsv").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="blob.tsv' is not UTF-8"):
        stexp.io.read_st(tmp_path / "blob.tsv", s, i, library_id="A1")


def test_duplicated_genes_refused_not_renamed(tmp_path):
    c, s, i = write_st(tmp_path, n_genes=4)
    counts = pd.read_csv(c, sep="\t", index_col=0)
    counts.columns = ["G0", "G1", "G1", "G3"]
    counts.to_csv(tmp_path / "dup.tsv", sep="\t")
    with pytest.raises(ValueError, match=r"dup.tsv.*1 gene name\(s\) appear more than once: \['G1'\]"):
        stexp.io.read_st(tmp_path / "dup.tsv", s, i, library_id="A1")
    with pytest.raises(ValueError, match=r"counts DataFrame: \['G1'\]"):
        stexp.io.read_st(counts, s, i, library_id="A1")


def test_ragged_counts_rows_refused(tmp_path):
    _, s, i = write_st(tmp_path)
    (tmp_path / "ragged.tsv").write_text("\tG0\tG1\n1x1\t1\t2\n2x1\t1\t2\t7\n")
    with pytest.raises(ValueError, match=r"ragged.tsv.*1 row\(s\).*line 3 has 4 fields"):
        stexp.io.read_st(tmp_path / "ragged.tsv", s, i, library_id="A1")


def test_r_style_header_without_index_name(tmp_path):
    c, s, i = write_st(tmp_path, n_genes=3)
    counts = pd.read_csv(c, sep="\t", index_col=0)
    lines = ["\t".join(counts.columns)] + [
        f"{k}\t" + "\t".join(map(str, r)) for k, r in zip(counts.index, counts.to_numpy(), strict=True)
    ]
    (tmp_path / "r.tsv").write_text("\n".join(lines) + "\n")
    adata = stexp.io.read_st(tmp_path / "r.tsv", s, i, library_id="A1")
    assert list(adata.var_names) == ["G0", "G1", "G2"]
    np.testing.assert_array_equal(adata[["A1_2x3"]].X.toarray()[0], counts.loc["2x3"].to_numpy())
    counts.to_csv(tmp_path / "quoted.tsv", sep="\t", quoting=1)  # R's write.table: every name in quotes
    assert (tmp_path / "quoted.tsv").read_text().startswith('""\t"G0"')
    quoted = stexp.io.read_st(tmp_path / "quoted.tsv", s, i, library_id="A1")
    assert list(quoted.var_names) == ["G0", "G1", "G2"] and quoted.n_obs == adata.n_obs


@pytest.mark.parametrize(("value", "text"), [("inf", "inf"), ("-inf", "-inf"), ("nan", "nan"), ("", "nan")])
def test_non_finite_counts_in_a_file(tmp_path, value, text):
    c, s, i = write_st(tmp_path, n_genes=3)
    counts = pd.read_csv(c, sep="\t", index_col=0).astype(object)
    counts.loc["2x1", "G1"] = value
    counts.loc["3x1", "G2"] = value
    counts.to_csv(tmp_path / "bad.tsv", sep="\t")
    with pytest.raises(
        ValueError, match=rf"2 NaN or infinite values in the counts file .*bad.tsv.*'2x1', gene 'G1': {text}"
    ):
        stexp.io.read_st(tmp_path / "bad.tsv", s, i, library_id="A1")


def test_negative_counts_name_spot_and_gene(tmp_path):
    c, s, i = write_st(tmp_path, n_genes=3)
    counts = pd.read_csv(c, sep="\t", index_col=0)
    counts.loc["4x2", "G2"] = -1
    counts.to_csv(tmp_path / "neg.tsv", sep="\t")
    with pytest.raises(ValueError, match=r"1 negative counts .*neg.tsv.*spot '4x2', gene 'G2'"):
        stexp.io.read_st(tmp_path / "neg.tsv", s, i, library_id="A1")


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (None, TypeError),
        ("2", TypeError),
        (True, TypeError),
        (0, ValueError),
        (-1.5, ValueError),
        (float("nan"), ValueError),
        (np.inf, ValueError),
    ],
)
def test_bad_image_scale(tmp_path, value, error):
    c, s, i = write_st(tmp_path)
    with pytest.raises(error, match="image_scale must be a positive number"):
        stexp.io.read_st(c, s, i, library_id="A1", image_scale=value)


def test_image_scale_numpy_number_accepted(tmp_path):
    c, s, i = write_st(tmp_path)
    adata = stexp.io.read_st(c, s, i, library_id="A1", image_scale=np.float32(1.0))
    assert adata.uns["stexp"]["read_st"]["image_scale"] == 1.0


def test_bad_on_outside(tmp_path):
    c, s, i = write_st(tmp_path)
    with pytest.raises(ValueError, match="on_outside must be 'raise' or 'drop', got 'keep'"):
        stexp.io.read_st(c, s, i, library_id="A1", on_outside="keep")


def test_spot_file_problems_name_the_file(tmp_path):
    c, s, i = write_st(tmp_path)
    (tmp_path / "none.tsv").write_text("")
    with pytest.raises(ValueError, match="none.tsv' is empty"):
        stexp.io.read_st(c, tmp_path / "none.tsv", i, library_id="A1")
    with pytest.raises(FileNotFoundError, match="gone.tsv"):
        stexp.io.read_st(c, tmp_path / "gone.tsv", i, library_id="A1")
    spots = pd.read_csv(s, sep="\t")
    text = spots.astype({"pixel_x": object})
    text.loc[2, "pixel_x"] = "12,5"
    text.to_csv(tmp_path / "text.tsv", sep="\t", index=False)
    with pytest.raises(ValueError, match=r"text.tsv.*column 'pixel_x' has 1 non-numeric value\(s\), e.g. '12,5'"):
        stexp.io.read_st(c, tmp_path / "text.tsv", i, library_id="A1")
    inf = spots.copy()
    inf.loc[4, "pixel_y"] = np.inf
    with pytest.raises(ValueError, match="1 spots have infinite coordinates"):
        stexp.io.read_st(c, inf, i, library_id="A1")
    sel = spots.astype({"selected": object})
    sel.loc[0, "selected"] = "yes"
    with pytest.raises(ValueError, match="column 'selected'"):
        stexp.io.read_st(c, sel, i, library_id="A1")
    with pytest.raises(KeyError, match=r"lacks column\(s\) \['pixel_y'\]"):
        stexp.io.read_st(c, spots.drop(columns="pixel_y"), i, library_id="A1")


def test_spot_rows_without_coordinates_are_skipped(tmp_path):
    c, s, i = write_st(tmp_path)
    spots = pd.read_csv(s, sep="\t")
    spots.loc[[0, 1], "pixel_x"] = np.nan
    adata = stexp.io.read_st(c, spots, i, library_id="A1")
    assert adata.n_obs == 28


def test_conflicting_labels_refused(tmp_path):
    c, s, i = write_st(tmp_path)
    lab = pd.DataFrame({"x": [2.04, 1.98, 3.0], "y": [1.02, 0.99, 3.0], "label": ["tumour", "stroma", "x"]})
    with pytest.raises(ValueError, match=r"1 spot\(s\) get different labels.*'2x1'"):
        stexp.io.read_st(c, s, i, library_id="A1", labels=lab)
    same = lab.assign(label=["tumour", "tumour", "x"])
    assert stexp.io.read_st(c, s, i, library_id="A1", labels=same).obs.loc["A1_2x1", "label"] == "tumour"


def test_undecodable_image_names_the_file(tmp_path):
    c, s, i = write_st(tmp_path)
    (tmp_path / "cut.jpg").write_bytes(i.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.jpg"):
        stexp.io.read_st(c, s, tmp_path / "cut.jpg", library_id="A1")


def test_16bit_image_is_scaled_not_clipped(tmp_path):
    c, s, _ = write_st(tmp_path)
    grey = np.full((160, 200), 30000, dtype=np.uint16)  # 30000 / 257 = 116.7 -> 117; convert("RGB") gives 255
    Image.fromarray(grey).save(tmp_path / "he16.png")
    adata = stexp.io.read_st(c, s, tmp_path / "he16.png", library_id="A1")
    hires = adata.uns["spatial"]["A1"]["images"]["hires"]
    assert hires.dtype == np.uint8 and hires.shape == (160, 200, 3)
    assert np.all(hires == 117)


def test_dataframes_given_are_not_modified(tmp_path):
    c, s, i = write_st(tmp_path)
    counts = pd.read_csv(c, sep="\t", index_col=0)
    counts.index = pd.Index(counts.index.to_numpy(dtype=object))
    spots = pd.read_csv(s, sep="\t")
    lab = pd.DataFrame({"x": [2.04], "y": [1.02], "label": ["tumour"]})
    copies = counts.copy(), spots.copy(), lab.copy()
    index = counts.index
    stexp.io.read_st(counts, spots, i, library_id="A1", labels=lab)
    assert counts.index is index  # not even replaced by an equal index
    for given, before in zip((counts, spots, lab), copies, strict=True):
        pd.testing.assert_frame_equal(given, before)
