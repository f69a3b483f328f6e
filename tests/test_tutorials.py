"""The quickstart notebook runs from top to bottom, as committed, and its committed outputs are complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "her2st.ipynb"])
def test_committed_notebooks_are_executed_without_errors(name):
    nb = json.loads((TUTORIALS / name).read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, name
    assert all(c.get("execution_count") for c in code), f"{name} is committed with unexecuted cells"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{name} was committed with errors: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 4, f"{name}: expected the figures in its outputs, found {len(images)}"


@pytest.mark.slow
def test_quickstart_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("STEXP_CACHE_DIR", str(tmp_path / "cache"))  # the kernel is a new process: isolate its cache
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(TUTORIALS / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
