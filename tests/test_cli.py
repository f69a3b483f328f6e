"""The ``stexp`` command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stexp.cli import describe, main


def test_demo_describes_the_synthetic_data(capsys):
    assert main(["demo", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "768 spots x 100 genes in 3 libraries" in out
    for lib in ("slide_0", "slide_1", "slide_2"):
        assert f"{lib}: 256 spots, 55 µm spots, 2 µm/px" in out
    assert "hires 925x800 px" in out and "lowres" in out  # width x height of the synthetic image
    assert "3 epochs" in out and "stexp_demo" in out


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
