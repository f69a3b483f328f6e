"""The ``stexp`` command line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from stexp.cli import describe, main


@pytest.mark.slow
def test_demo_runs_the_users_path_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--epochs", "3", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "768 spots x 100 genes in 3 libraries" in printed
    for lib in ("slide_0", "slide_1", "slide_2"):
        assert f"{lib}: 256 spots, 55 µm spots, 2 µm/px" in printed
    assert "hires 925x800 px" in printed and "lowres" in printed  # width x height of the synthetic image
    assert "3 epochs" in printed
    assert "default pipeline (stexp.tl.fit without model=)" in printed
    for name in ("report.md", "spatial_genes.png", "scores.png", "domains.png", "predictions.h5ad"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert report in printed
    # the default pipeline (what stexp.tl.fit trains without model=) beside mclSTExp and the baselines
    for model in ("default", "mean", "ridge", "mclstexp"):
        assert f"| {model} " in report, model
    assert "`default` is what `stexp.tl.fit(adata)` trains when given no `model=`" in report
    assert "90% prediction intervals of `default`" in report and "Expected PCC (ACG) of `default`" in report
    assert "Domains of the predicted expression (default) against `obs['domain']`" in report
    assert "default_model/ (the default pipeline" in report

    import anndata as ad

    import stexp
    from stexp.models import DEFAULT_RECIPE
    from stexp.tl._storage import has_prediction

    pred = ad.read_h5ad(out / "predictions.h5ad")
    assert set(pred.obs["library_id"].astype(str)) == {"slide_2"}
    # panel-only predictions (obsm DataFrames) when var is wider than the panel; they survive the h5ad round trip
    keys = ("pred_default", "pred_default_lo", "pred_default_hi", "pred_mean", "pred_ridge", "pred_mclstexp")
    assert all(has_prediction(pred, k) for k in keys)
    assert "stexp_domain" in pred.obs
    # the saved model is the default pipeline, calibrated, and reproduces the predictions written by the demo
    model = stexp.models.load(out / "default_model")
    assert (
        model.recipe.label == DEFAULT_RECIPE.label
        and model.name == DEFAULT_RECIPE.model
        and model.calibration is not None
    )
    assert not (out / "mclstexp_model").exists()
    again = pred.copy()
    stexp.tl.predict(again, model, key_added="again", coverage=0.9)
    for suffix in ("", "_lo", "_hi"):
        np.testing.assert_allclose(
            stexp.tl.get_prediction(again, f"again{suffix}").to_numpy(),
            stexp.tl.get_prediction(pred, f"pred_default{suffix}").to_numpy(),
            rtol=1e-5,
            equal_nan=True,
        )


def test_describe_single_library(synth):
    one = synth[synth.obs["library_id"] == "slide_1"].copy()
    del one.uns["spatial"]["slide_0"], one.uns["spatial"]["slide_2"]
    text = describe(one)
    assert text.startswith("144 spots x 60 genes in 1 library")
    assert "slide_0" not in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--data", "mouse"], "invalid choice: 'mouse'"),
        (["demo", "--epochs", "0"], "must be a positive integer"),
        ([], "required: command"),
    ],
)
def test_bad_arguments_exit_with_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert message in capsys.readouterr().err


def test_console_entry_point_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "stexp.cli", "demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "--epochs" in proc.stdout and "her2st" in proc.stdout


# -- stexp predict: outputs, devices and option names, refused before any work ------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """stexp predict must fail before loading the model (the first piece of work)."""
    import stexp

    monkeypatch.setattr(stexp.models, "load", lambda *a, **k: pytest.fail("the model was loaded"))


def _fails(argv, capsys, *matches):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("stexp predict: error:"), err  # one line, no traceback
    for match in matches:
        assert match in err, err
    return err


def _predict_argv(tmp_path, out, *extra):
    return ["predict", str(tmp_path / "slide.tif"), "--model", str(tmp_path / "model"), "--out", str(out), *extra]


@pytest.mark.parametrize("existing", ["pred.h5ad", "pred.zarr/", "pred_genes.png", "both"])
def test_predict_refuses_existing_outputs(tmp_path, capsys, no_work, existing):
    suffix = ".zarr" if existing.startswith("pred.zarr") else ".h5ad"
    out = tmp_path / f"pred{suffix}"
    made = [out, tmp_path / "pred_genes.png"] if existing == "both" else [tmp_path / existing.rstrip("/")]
    for path in made:
        if existing.endswith("/"):
            path.mkdir()
            (path / "zarr.json").write_text("{}")
        else:
            path.write_bytes(b"the user's file")
    err = _fails(_predict_argv(tmp_path, out), capsys, "pass --overwrite to replace", "or choose another --out")
    assert all(str(p) in err for p in made)
    assert ("already exist;" if existing == "both" else "already exists;") in err
    for path in made:  # untouched
        assert (path / "zarr.json" if path.is_dir() else path).read_bytes() in (b"{}", b"the user's file")


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ("pred.h5ad/", "pred.h5ad is a folder, where stexp predict writes a file"),
        ("pred_genes.png/", "pred_genes.png is a folder"),
        ("parent", "is a file, so --out"),
    ],
)
def test_predict_refuses_outputs_it_cannot_replace_even_with_overwrite(tmp_path, capsys, no_work, layout, match):
    out = tmp_path / "pred.h5ad"
    if layout == "parent":
        (tmp_path / "sub").write_text("a file")
        out = tmp_path / "sub" / "pred.h5ad"
    else:
        (tmp_path / layout).mkdir()
    _fails(_predict_argv(tmp_path, out, "--overwrite"), capsys, match)


def test_predict_help_tells_about_overwrite(capsys):
    with pytest.raises(SystemExit) as err:
        main(["predict", "--help"])
    assert err.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--overwrite" in text and "refused before any work unless --overwrite" in text
    assert "cuda:N" in text and "mps" in text


def test_write_replacing_keeps_the_old_output_until_the_new_is_complete(tmp_path):
    from stexp.cli import _write_replacing

    out = tmp_path / "pred.h5ad"
    out.write_text("old")

    def half(path):
        path.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _write_replacing(out, half)
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["pred.h5ad"]
    _write_replacing(out, lambda path: path.write_text("new"))
    assert out.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["pred.h5ad"]

    store = tmp_path / "pred.zarr"  # a folder replaced by a folder, the old one removed
    (store / "old").mkdir(parents=True)

    def zarr(path):
        (path / "new").mkdir(parents=True)

    _write_replacing(store, zarr)
    assert [p.name for p in store.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.h5ad", "pred.zarr"]


@pytest.mark.parametrize(
    ("device", "matches"),
    [
        ("gpu", ["--device gpu is not a device stexp runs on", "'cuda:N'", "For a GPU pass 'cuda'."]),
        ("cuda", ["--device cuda, but CUDA is not available", "pass --device cpu, or --device auto"]),
        ("cuda:1", ["--device cuda:1, but CUDA is not available"]),
    ],
)
def test_predict_refuses_a_device_before_any_work(tmp_path, capsys, no_work, monkeypatch, device, matches):
    """Before: a torch traceback, or (features cached) nothing at all."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails(_predict_argv(tmp_path, tmp_path / "p.h5ad", "--device", device), capsys, *matches)


def test_library_messages_name_the_options_of_the_step_that_failed(tmp_path, capsys, monkeypatch):
    import stexp

    class Model:
        genes = ["G1"]

    monkeypatch.setattr(stexp.models, "load", lambda *a, **k: Model())
    message = "pass mpp= (µm per pixel); spacing_um=5000 is larger than the slide, spot_diameter_um='1e6'."
    monkeypatch.setattr(stexp.io, "read_wsi", lambda *a, **k: (_ for _ in ()).throw(ValueError(message)))
    err = _fails(_predict_argv(tmp_path, tmp_path / "p.h5ad"), capsys)
    assert err.endswith(
        "pass --mpp (µm per pixel); --spacing-um 5000 is larger than the slide, --spot-diameter-um 1e6."
    )
    # the same words from a step that did not get them from the command line are left alone
    monkeypatch.setattr(stexp.models, "load", lambda *a, **k: (_ for _ in ()).throw(ValueError(message)))
    assert _fails(_predict_argv(tmp_path, tmp_path / "p.h5ad"), capsys).endswith(message)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("unknown OME unit; pass mpp=.", "unknown OME unit; pass --mpp."),
        ("pass device='cpu', or device=\"auto\"", "pass --device cpu, or --device auto"),
        ("devices=1 and device='mps'", "devices=1 and --device mps"),
        ("key_added= to keep both; batch_size=0.", "--key to keep both; --batch-size 0."),
        ("xmpp=3, read_wsi.mpp=3", "xmpp=3, read_wsi.mpp=3"),
    ],
)
def test_as_options(message, expected):
    from stexp.cli import OPTIONS, as_options

    assert as_options(message, OPTIONS) == expected
