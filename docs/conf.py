"""Sphinx configuration of the stexp documentation."""

from __future__ import annotations

import shutil
import sys
from importlib.metadata import version as _version
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

project = "stexp"
author = "stexp developers"
copyright = "2025, stexp developers"
release = _version("stexp")
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
]

# Notebooks are committed executed; the docs only render them.
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}  # .rst first: autosummary stubs

autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
typehints_document_rtype = True
always_use_bars_union = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True
napoleon_use_ivar = True  # class "Attributes" sections as fields, not cross-referenced targets

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]

html_theme = "sphinx_book_theme"
html_title = "stexp"
html_theme_options = {
    "show_toc_level": 2,
}

suppress_warnings: list[str] = []

# Tutorials live in ../tutorials (committed executed); copy them next to the docs so Sphinx can render them.
_TUTORIALS_SRC, _TUTORIALS_DST = ROOT / "tutorials", HERE / "tutorials"
if _TUTORIALS_DST.exists():
    shutil.rmtree(_TUTORIALS_DST)
_notebooks = sorted(_TUTORIALS_SRC.glob("*.ipynb"))
if _notebooks:
    _TUTORIALS_DST.mkdir()
    for _nb in _notebooks:
        shutil.copy2(_nb, _TUTORIALS_DST / _nb.name)
else:  # no tutorial committed yet: a placeholder keeps the glob in tutorials.md from matching nothing
    _TUTORIALS_DST.mkdir()
    (_TUTORIALS_DST / "none.md").write_text("# No tutorials yet\n\nNo notebook was found in `tutorials/`.\n")

# Pages written by other parts of the project; until they exist, the toctree entries pointing at
# them must not break a -W build.
if not all((HERE / page).exists() for page in ("layout.md", "benchmarks.md")):
    suppress_warnings.append("toc.not_readable")


def _join_prose_returns(app, what, name, obj, options, lines: list[str]) -> None:
    """Let a numpy ``Returns`` section be a prose paragraph, as stexp's docstrings write it.

    Napoleon reads every unindented line of a ``Returns`` section as a separate return value, so a
    sentence wrapped over lines turns into a bullet list (and breaks inline literals across items).
    A section whose lines are all unindented and contain no ``name : type`` field is joined into one
    line before napoleon sees it; sections written as ``type`` + indented description are untouched.
    """
    i = 0
    while i < len(lines) - 1:
        if lines[i].strip() == "Returns" and set(lines[i + 1].strip()) == {"-"}:
            start = end = i + 2
            while end < len(lines) and lines[end].strip():
                end += 1
            block = lines[start:end]
            indent = len(block[0]) - len(block[0].lstrip()) if block else 0
            is_prose = len(block) > 1 and all(len(b) - len(b.lstrip()) == indent and " : " not in b for b in block)
            if is_prose:
                lines[start:end] = [" " * indent + " ".join(b.strip() for b in block)]
            i = start
        i += 1


def setup(app):
    """Register the docstring hook before napoleon (priority 500) runs."""
    app.connect("autodoc-process-docstring", _join_prose_returns, priority=400)
