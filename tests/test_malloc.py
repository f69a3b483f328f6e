"""The console script's allocator settings: fewer page faults for repeated large buffers, own process only."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux only")

# Allocate, touch and free a 64 MB buffer 20 times; print whether tuning applied and the minor page faults.
CHURN = textwrap.dedent(
    """
    import resource, sys
    import torch
    from stexp._malloc import tune_for_inference
    tuned = tune_for_inference() if sys.argv[1] == "tune" else False
    torch.ones(16 << 20)  # first touch, not counted
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        a = torch.ones(16 << 20)  # 64 MB, above glibc's largest default mmap threshold (as a CNN activation)
        del a
    print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _churn(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, env={**clean, **env}
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_tuning_stops_the_page_fault_churn_of_large_buffers():
    tuned, faults = _churn("tune")
    untuned, faults_default = _churn("none")
    assert tuned and not untuned
    # 20 x 64 MB re-faulted by default (~330k pages); mostly reused from the heap when tuned (~100k here)
    assert faults_default > 200_000 and faults < faults_default / 2, (faults, faults_default)


def test_a_users_malloc_setting_stands():
    tuned, _ = _churn("tune", MALLOC_MMAP_THRESHOLD_="65536")
    assert not tuned


def test_main_called_from_python_leaves_the_allocator_alone(monkeypatch):
    import stexp._malloc
    from stexp.cli import main

    calls = []
    monkeypatch.setattr(stexp._malloc, "tune_for_inference", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert calls == []
