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
    from stexp.tl._fit import DEFAULT_MODEL
    from stexp.tl._storage import has_prediction

    pred = ad.read_h5ad(out / "predictions.h5ad")
    assert set(pred.obs["library_id"].astype(str)) == {"slide_2"}
    # panel-only predictions (obsm DataFrames) when var is wider than the panel; they survive the h5ad round trip
    keys = ("pred_default", "pred_default_lo", "pred_default_hi", "pred_mean", "pred_ridge", "pred_mclstexp")
    assert all(has_prediction(pred, k) for k in keys)
    assert "stexp_domain" in pred.obs
    # the saved model is the default pipeline, calibrated, and reproduces the predictions written by the demo
    model = stexp.models.load(out / "default_model")
    assert model.name == DEFAULT_MODEL and model.calibration is not None
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
