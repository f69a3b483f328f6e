"""Model cards, the pretrained registry, float16 storage and ``stexp predict --describe``."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from _features import stat_features

import stexp
from stexp.models import ModelCard, PretrainedModel
from stexp.models import _pretrained as pre


@pytest.fixture(scope="module")
def fitted(_synthetic_cached):
    adata = _synthetic_cached.copy()
    key = stat_features(adata)
    stexp.settings.verbosity = 1
    model = stexp.tl.fit(adata, features_key=key, model="knn", k=20, calibrate=True)
    return adata, key, model


def test_fit_writes_the_card_and_save_load_keeps_it(fitted, tmp_path, capsys):
    adata, key, model = fitted
    card = model.card
    libs = card.training_data["libraries"]
    assert set(libs) == set(adata.obs["library_id"].astype(str))
    assert sum(v["spots"] for v in libs.values()) == adata.n_obs == card.training_data["n_spots"]
    assert card.training_data["patients"] == sorted(adata.obs["patient"].astype(str).unique())
    assert all(v["um_per_px"] > 0 for v in libs.values())
    assert card.genes["n_genes"] == len(model.genes) and card.encoder["encoder"] == "test_stats"
    assert card.recipe["model"] == "knn" and card.stexp_version == stexp.__version__ and card.created
    assert card.calibration["n_calibration"] > 0 and "median" in card.calibration["expected_pcc"]
    card.extra = "Trained for the test; ask the lab before use."
    card.limits = ["synthetic data"]
    card.figures["lopo"] = {"pcc_acg": 0.5, "per_slide": [{"slide": "slide_0", "pcc_acg": 0.5}]}
    path = model.save(tmp_path / "m")
    config = json.loads((path / "model.json").read_text())
    assert config["card"]["extra"] == card.extra  # inside model.json: covered by its checksum
    back = stexp.models.load(path)
    assert back.card == card
    stexp.models.describe(back)
    text = capsys.readouterr().out
    assert "Trained for the test" in text and "synthetic data" in text and "lopo: pcc_acg 0.5" in text
    trusted = [g for g, p in zip(model.genes, model.calibration.expected_pcc, strict=True) if p >= 0.3]
    assert f"{len(trusted)} gene(s) with expected PCC >= 0.3" in text


def test_card_from_older_folders_and_bad_values():
    assert ModelCard.from_dict(None) == ModelCard()
    card = ModelCard.from_dict({"limits": "one sentence", "extra": "x", "future_field": 1})
    assert card.limits == ["one sentence"] and card.extra == "x"
    with pytest.raises(ValueError, match="'figures' must be a JSON object"):
        ModelCard.from_dict({"figures": [1, 2]})


def test_float16_storage_halves_the_bank_and_predicts_the_same(fitted, tmp_path):
    adata, key, model = fitted
    full = model.save(tmp_path / "f32")
    half = model.save(tmp_path / "f16", storage_dtype="float16")
    assert (half / "weights.safetensors").stat().st_size < 0.7 * (full / "weights.safetensors").stat().st_size
    storage = json.loads((half / "model.json").read_text())["storage"]
    assert "bank_features" in storage["arrays"] and "temperature" not in storage["arrays"]
    a, b = stexp.models.load(full), stexp.models.load(half)
    assert b.bank_features_.dtype == np.float32  # computed in float32 after loading
    data = stexp.tl._inputs.spot_data(adata, features_key=key, library_key="library_id", genes=model.genes)
    pa, pb = a.predict(data)[0], b.predict(data)[0]
    # values rounded to ~3 digits: the same predictions, but where near-tied neighbours swap at the k-th place
    assert np.median(np.abs(pa - pb)) < 0.002 and np.abs(pa - pb).mean() < 0.01
    assert np.corrcoef(pa.ravel(), pb.ravel())[0, 1] > 0.999
    with pytest.raises(ValueError, match="storage_dtype"):
        model.save(tmp_path / "bad", storage_dtype="int8")


def _archive(folder, out):
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname="tiny-v1")
    import hashlib

    return hashlib.sha256(out.read_bytes()).hexdigest()


@pytest.fixture
def registered(fitted, tmp_path, monkeypatch):
    """A downloadable model in the registry, its URL unreachable, its archive on disk."""
    _, _, model = fitted
    folder = model.save(tmp_path / "tiny-v1")
    sha = _archive(folder, tmp_path / "tiny-v1.tar.gz")
    entry = PretrainedModel(
        "tiny-v1", aliases=("tiny",), url="http://127.0.0.1:9/tiny-v1.tar.gz", sha256=sha, n_genes=len(model.genes)
    )
    monkeypatch.setattr(pre, "_REGISTRY", dict(pre._REGISTRY))
    pre.register_pretrained(entry)
    return entry, tmp_path / "tiny-v1.tar.gz", model


def test_registry_lists_models_and_resolves_names(registered, tmp_path):
    entry, archive, model = registered
    table = stexp.models.pretrained()
    assert {"her2st-breast-v1", "tiny-v1"} <= set(table.index)
    assert table.loc["tiny-v1", "source"] == entry.url and not table.loc["tiny-v1", "available"]
    assert table.loc["her2st-breast-v1", "aliases"] == "her2st-breast"
    with pytest.raises(FileNotFoundError, match="pretrained model name"):
        stexp.models.load("no-such-model")
    # a local folder always wins over a name
    assert stexp.models.load(tmp_path / "tiny-v1").genes == model.genes


def test_offline_download_fails_clearly_and_a_local_archive_works(registered, tmp_path):
    entry, archive, model = registered
    with pytest.raises(RuntimeError, match="could not download pretrained model 'tiny-v1'") as exc:
        stexp.models.load("tiny")
    msg = str(exc.value)
    assert entry.sha256 in msg and "archive=" in msg and str(stexp.settings.cachedir) in msg
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(archive.read_bytes() + b"x")
    with pytest.raises(ValueError, match="is not the registered 'tiny-v1'"):
        stexp.models.load("tiny", archive=bad)
    loaded = stexp.models.load("tiny", archive=archive)
    assert loaded.genes == model.genes and loaded.card.name == "tiny-v1"
    assert stexp.models.pretrained().loc["tiny-v1", "available"]
    assert stexp.models.load("tiny-v1").genes == model.genes  # from the cache now, no network


def test_download_goes_through_pooch_with_the_sha256(registered, monkeypatch):
    entry, archive, model = registered
    seen = {}

    def retrieve(url, known_hash, fname, path, progressbar):
        seen.update(url=url, known_hash=known_hash, path=path)
        return str(archive)

    import pooch

    monkeypatch.setattr(pooch, "retrieve", retrieve)
    assert stexp.models.load("tiny").genes == model.genes
    assert seen["known_hash"] == f"sha256:{entry.sha256}" and str(stexp.settings.cachedir) in str(seen["path"])


def test_version_check(registered):
    entry = PretrainedModel("future-v9", requires=">=99.0")
    with pytest.raises(RuntimeError, match="needs stexp>=99.0"):
        pre.check_version(entry)
    pre.check_version(PretrainedModel("ok-v1", requires=">=0.0"))
    with pytest.raises(ValueError, match="SHA-256"):
        PretrainedModel("x", url="http://x")


def test_shipped_model_loads_offline_and_the_cli_describes_it(capsys):
    entry = pre.resolve("her2st-breast")
    if pre._local_dir(entry) is None:
        pytest.skip("the shipped her2st-breast-v1 folder is not built in this checkout")
    model = stexp.models.load("her2st-breast", device="cpu")
    assert len(model.genes) == 785 and model.card.name == "her2st-breast-v1"
    assert model.shift is not None and model.card.shift["training range"], "shipped without its shift reference"
    from stexp.cli import main

    assert main(["predict", "--model", "her2st-breast", "--describe"]) == 0
    out = capsys.readouterr().out
    assert "Model card: her2st-breast-v1" in out and "Known limits" in out and "lopo" in out


def test_cli_describe_errors_and_missing_arguments(fitted, tmp_path, capsys):
    from stexp.cli import main

    _, _, model = fitted
    path = model.save(tmp_path / "m")
    assert main(["predict", "--model", str(path), "--describe"]) == 0
    assert "Model card" in capsys.readouterr().out
    assert main(["predict", "--model", "nope", "--describe"]) == 1
    assert "pretrained model name" in capsys.readouterr().err
    assert main(["predict", "--model", str(path)]) == 2
    assert "SLIDE, --out" in capsys.readouterr().err


def test_unpack_refuses_an_archive_without_a_model(tmp_path):
    out = tmp_path / "x.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        info = tarfile.TarInfo("readme.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(ValueError, match="holds no model folder"):
        pre._unpack(out, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_float16_keeps_small_integer_and_out_of_range_arrays():
    from stexp.models._base import HALF_MIN_SIZE, _to_half

    rng = np.random.default_rng(0)
    state = {
        "bank": rng.normal(size=(HALF_MIN_SIZE, 2)).astype(np.float32),
        "small": rng.normal(size=10).astype(np.float32),
        "groups": np.repeat(np.arange(4097, dtype=np.float32), 2),  # whole numbers beyond float16's exact 2048
        "huge": np.full(HALF_MIN_SIZE, 1e6, dtype=np.float32),
        "index": np.arange(HALF_MIN_SIZE, dtype=np.int64),
    }
    out, record = _to_half(state, "float16")
    assert record["arrays"] == ["bank"] and out["bank"].dtype == np.float16
    assert all(out[k].dtype == state[k].dtype for k in ("small", "groups", "huge", "index"))
