import functools
import hashlib
import http.server
import json
import re
import socket
import threading
from types import SimpleNamespace

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


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; records each request and answers 503 to the first ``flaky`` ones."""

    requests: list[str]
    flaky: int = 0

    def do_GET(self):
        type(self).requests.append(self.path)
        if len(type(self).requests) <= type(self).flaky:
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args, **kwargs):
        pass


@pytest.fixture
def fake_server(tmp_path, monkeypatch):
    """Serve a fake repository (``data/`` layout) on 127.0.0.1 and point BASE_URL at it.

    The server is stopped at the end; ``fake_server.handler.requests`` lists what was asked for.
    """
    repo = tmp_path / "repo"
    _write_fake_her2st(repo / "data")
    handler_cls = type("Handler", (_Handler,), {"requests": []})
    handler = functools.partial(handler_cls, directory=str(repo))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(_her2st, "BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/data/")
    monkeypatch.setattr(_her2st, "IMAGE_FILES", {"C2": "fake_C2.jpg"})
    monkeypatch.setattr(_her2st, "SHA256", {})
    monkeypatch.setattr(_her2st, "RETRIES", 0)
    monkeypatch.setattr(_her2st, "TIMEOUT", 10)
    monkeypatch.delenv("STEXP_DATA_DIR", raising=False)
    try:
        yield SimpleNamespace(data=repo / "data", handler=handler_cls)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    digest = hashlib.sha256((fake_server.data / "ST-cnts" / "B1.tsv.gz").read_bytes()).hexdigest()
    assert digest in recorded
    n_requests = len(fake_server.handler.requests)
    assert n_requests == 6  # counts, spots, labels of B1; counts, spots, image of C2
    # a second call reads the cache and does not need the server
    _her2st.BASE_URL = f"http://127.0.0.1:{_closed_port()}/none/"
    assert stexp.datasets.her2st(["B1"]).n_obs == 11
    assert len(fake_server.handler.requests) == n_requests


def test_her2st_known_checksum_is_verified_not_recorded(fake_server, monkeypatch):
    digest = hashlib.sha256((fake_server.data / "ST-cnts" / "B1.tsv.gz").read_bytes()).hexdigest()
    monkeypatch.setattr(_her2st, "SHA256", {"ST-cnts/B1.tsv.gz": digest})
    stexp.datasets.her2st(["B1"])
    recorded = json.loads((stexp.settings.cachedir / "her2st" / "sha256.json").read_text())
    assert "ST-cnts/B1.tsv.gz" not in recorded and "ST-spotfiles/B1_selection.tsv" in recorded


def test_her2st_checksum_mismatch(fake_server, monkeypatch):
    monkeypatch.setattr(_her2st, "SHA256", {"ST-cnts/B1.tsv.gz": "0" * 64})
    with pytest.raises(ValueError, match="checksum mismatch.*B1.tsv.gz"):
        stexp.datasets.her2st(["B1"])
    cache = stexp.settings.cachedir / "her2st"
    assert not (cache / "ST-cnts" / "B1.tsv.gz").exists()
    assert not any(p.is_file() for p in (cache / "ST-cnts").iterdir())  # no partial or temporary file left


def test_her2st_retries_a_failed_download(fake_server, monkeypatch):
    monkeypatch.setattr(_her2st, "RETRIES", 1)
    fake_server.handler.flaky = 1  # the first request gets a 503
    adata = stexp.datasets.her2st(["B1"])
    assert adata.n_obs == 11
    assert fake_server.handler.requests[:2] == ["/data/ST-cnts/B1.tsv.gz"] * 2


def test_her2st_local_folder_never_touches_the_network(tmp_path, monkeypatch):
    import pooch

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used although the data are local")

    monkeypatch.setattr(pooch.HTTPDownloader, "__call__", no_network)
    monkeypatch.setattr(_her2st, "BASE_URL", f"http://127.0.0.1:{_closed_port()}/data/")
    _write_fake_her2st(tmp_path / "her2st")
    adata = stexp.datasets.her2st(["B1", "C2"], path=tmp_path / "her2st", download=True)
    assert adata.n_obs == 22
    monkeypatch.setenv("STEXP_DATA_DIR", str(tmp_path))  # found through the environment, download allowed
    assert stexp.datasets.her2st(["C2"]).n_obs == 11


def test_her2st_offline(monkeypatch):
    monkeypatch.delenv("STEXP_DATA_DIR", raising=False)
    monkeypatch.setattr(_her2st, "RETRIES", 0)
    port = _closed_port()
    monkeypatch.setattr(_her2st, "BASE_URL", f"http://127.0.0.1:{port}/data/")
    url = f"http://127.0.0.1:{port}/data/ST-cnts/B3.tsv.gz"
    with pytest.raises(ConnectionError, match=rf"{re.escape(url)} \(ConnectionError.*path=.*STEXP_DATA_DIR"):
        stexp.datasets.her2st(["B3"])
    assert not (stexp.settings.cachedir / "her2st" / "ST-cnts" / "B3.tsv.gz").exists()


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
