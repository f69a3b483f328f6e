import functools
import hashlib
import http.server
import threading

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import stexp
from stexp.datasets import _her2st


def _write_fake_her2st(root, *, seed=0):
    """A tiny fake her2st data/ folder: sections B1 (labels, no image) and C2 (image)."""
    rng = np.random.default_rng(seed)
    genes = {"B1": ["G0", "G1", "G2", "G3"], "C2": ["G1", "G2", "G3", "G4", "G5"]}
    for sec, gs in genes.items():
        xs, ys = np.meshgrid(np.arange(1, 5), np.arange(1, 4))
        xs, ys = xs.ravel(), ys.ravel()
        ids = [f"{x}x{y}" for x, y in zip(xs, ys, strict=True)]
        (root / "ST-cnts").mkdir(parents=True, exist_ok=True)
        (root / "ST-spotfiles").mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rng.poisson(2, (len(ids), len(gs))), index=ids, columns=gs).to_csv(
            root / "ST-cnts" / f"{sec}.tsv.gz", sep="\t"
        )
        pd.DataFrame(
            {
                "x": xs,
                "y": ys,
                "new_x": xs,
                "new_y": ys,
                "pixel_x": 20 + 30.0 * (xs - 1),
                "pixel_y": 20 + 30.0 * (ys - 1),
                "selected": [0] + [1] * (len(ids) - 1),
            }
        ).to_csv(root / "ST-spotfiles" / f"{sec}_selection.tsv", sep="\t", index=False)
    (root / "ST-imgs" / "C" / "C2").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (120, 150, 3), dtype=np.uint8)).save(
        root / "ST-imgs" / "C" / "C2" / "fake_C2.jpg"
    )
    (root / "ST-pat" / "lbl").mkdir(parents=True)
    pd.DataFrame({"x": [2.01, 3.98], "y": [1.0, 3.02], "pixel_x": 0, "pixel_y": 0, "label": ["a", "b"]}).to_csv(
        root / "ST-pat" / "lbl" / "B1_labeled_coordinates.tsv", sep="\t", index=False
    )


@pytest.fixture
def fake_server(tmp_path, monkeypatch):
    """Serve a fake repository (``data/`` layout) on 127.0.0.1 and point BASE_URL at it."""
    repo = tmp_path / "repo"
    _write_fake_her2st(repo / "data")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(repo))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(_her2st, "BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/data/")
    monkeypatch.setattr(_her2st, "IMAGE_FILES", {"C2": "fake_C2.jpg"})
    monkeypatch.setattr(_her2st, "SHA256", {})
    monkeypatch.delenv("STEXP_DATA_DIR", raising=False)
    yield repo / "data"
    server.shutdown()
    server.server_close()


def test_her2st_local_folder(tmp_path):
    _write_fake_her2st(tmp_path)
    adata = stexp.datasets.her2st(["B1", "C2"], path=tmp_path, download=False)
    assert adata.n_obs == 22  # 12 spots per section, one unselected
    assert list(adata.var_names) == ["G1", "G2", "G3"]  # genes common to both sections
    assert list(adata.obs["library_id"].cat.categories) == ["B1", "C2"]
    assert set(adata.obs["patient"]) == {"B", "C"}
    has_image = adata.obs.groupby("library_id", observed=True)["has_image"].first()
    assert not has_image["B1"] and has_image["C2"]
    assert adata.uns["spatial"]["B1"]["metadata"]["has_image"] is False
    assert "hires" in adata.uns["spatial"]["C2"]["images"]
    assert adata.obs.loc["B1_2x1", "label"] == "a" and adata.obs.loc["B1_4x3", "label"] == "b"
    assert adata.obs["label"].notna().sum() == 2
    counts = pd.read_csv(tmp_path / "ST-cnts" / "C2.tsv.gz", sep="\t", index_col=0)
    np.testing.assert_array_equal(adata[["C2_3x2"]].X.toarray()[0], counts.loc["3x2", ["G1", "G2", "G3"]])
    table = stexp.io.validate(adata)
    assert table.loc["C2", "n_outside_image"] == 0
    low = stexp.datasets.her2st(["C2"], path=tmp_path, image_res="lowres")
    assert set(low.uns["spatial"]["C2"]["images"]) == {"lowres"}


def test_her2st_bad_sections(tmp_path):
    with pytest.raises(ValueError, match="unknown HER2\\+ section"):
        stexp.datasets.her2st(["Z9"], path=tmp_path)
    with pytest.raises(FileNotFoundError, match="ST-cnts/B2.tsv.gz"):
        stexp.datasets.her2st(["B2"], path=tmp_path, download=False)


def test_her2st_download(fake_server):
    adata = stexp.datasets.her2st(["B1", "C2"])
    cache = stexp.settings.cachedir / "her2st"
    assert (cache / "ST-imgs" / "C" / "C2" / "fake_C2.jpg").is_file()
    assert adata.n_obs == 22 and adata.uns["spatial"]["C2"]["metadata"]["has_image"] is True
    assert adata.uns["spatial"]["C2"]["metadata"]["source_image_path"].startswith(str(cache))
    recorded = (cache / "sha256.json").read_text()
    digest = hashlib.sha256((fake_server / "ST-cnts" / "B1.tsv.gz").read_bytes()).hexdigest()
    assert digest in recorded
    # a second call reads the cache and does not need the server
    _her2st.BASE_URL = "http://127.0.0.1:9/none/"
    assert stexp.datasets.her2st(["B1"]).n_obs == 11


def test_her2st_checksum_mismatch(fake_server, monkeypatch):
    monkeypatch.setattr(_her2st, "SHA256", {"ST-cnts/B1.tsv.gz": "0" * 64})
    with pytest.raises(ValueError, match="checksum mismatch.*B1.tsv.gz"):
        stexp.datasets.her2st(["B1"])
    assert not (stexp.settings.cachedir / "her2st" / "ST-cnts" / "B1.tsv.gz").exists()


def test_her2st_offline(monkeypatch):
    monkeypatch.delenv("STEXP_DATA_DIR", raising=False)
    monkeypatch.setattr(_her2st, "BASE_URL", "http://127.0.0.1:9/data/")
    with pytest.raises(ConnectionError, match=r"http://127.0.0.1:9/data/ST-cnts/B3.tsv.gz.*path=.*STEXP_DATA_DIR"):
        stexp.datasets.her2st(["B3"])


def test_her2st_real(her2st_dir, monkeypatch):
    monkeypatch.setattr(_her2st, "BASE_URL", "http://127.0.0.1:9/offline/")  # never download in this test
    adata = stexp.datasets.her2st(["B4", "C2"], path=her2st_dir, download=False)
    genes = None
    for sec in ("B4", "C2"):
        counts = pd.read_csv(her2st_dir / "ST-cnts" / f"{sec}.tsv.gz", sep="\t", index_col=0, nrows=1)
        genes = set(counts.columns) if genes is None else genes & set(counts.columns)
        ids = pd.read_csv(her2st_dir / "ST-cnts" / f"{sec}.tsv.gz", sep="\t", index_col=0, usecols=[0]).index
        spots = pd.read_csv(her2st_dir / "ST-spotfiles" / f"{sec}_selection.tsv", sep="\t")
        spots = spots[spots.selected == 1]
        expected = len({f"{int(x)}x{int(y)}" for x, y in zip(spots.x, spots.y, strict=True)} & set(ids))
        assert (adata.obs["library_id"] == sec).sum() == expected
    assert set(adata.var_names) == genes
    assert adata.obs["has_image"].all()
    assert 0.6 < stexp._layout.um_per_px(adata, "B4") < 0.8
    assert (stexp.io.validate(adata)["n_outside_image"] == 0).all()
