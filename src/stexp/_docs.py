"""Parameter descriptions shared by the public functions, written once (scanpy's ``_doc_params`` style).

Decorate a function with :func:`doc_params` and write ``{library_key}`` (etc.) in its docstring's
Parameters section, indented like the other entries.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

#: name -> the parameter's numpydoc entry (name line and description), unindented.
PARAMS: dict[str, str] = {
    "adata": """\
adata
    AnnData in stexp's layout (spot centres in ``obsm["spatial"]``, images and scale factors in
    ``uns["spatial"]``, see :doc:`/layout`).""",
    "library_key": """\
library_key
    ``obs`` column naming the slide (library) of each spot.""",
    "layer": """\
layer
    Layer with raw counts (``None``: ``adata.X``).""",
    "copy": """\
copy
    Return a modified copy instead of writing in place.""",
    "device": """\
device
    ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``: where the work runs.
    Checked before any work: another string, or a GPU this machine does not have, is a ValueError. A
    runtime choice, never saved with a model.""",
    "genes": """\
genes
    The gene panel. Default: ``var["stexp_panel"]`` from :func:`stexp.pp.select_hvg`, else all genes.""",
    "features_key": """\
features_key
    ``obsm`` key of frozen image features. ``None`` embeds the images first with the default encoder
    (EfficientNet-Lite0, whose ImageNet weights install offline).""",
    "model": """\
model
    A fitted model from :func:`stexp.tl.fit` or :func:`stexp.models.load`.""",
    "ax": """\
ax
    Matplotlib axes to draw on (``None``: a new figure).""",
    "figure_output": """\
return_fig
    Return the figure.
save
    Save the figure to this path.

Returns
-------
The :class:`~matplotlib.figure.Figure` when ``return_fig`` is true, else ``None``.""",
}


def doc_params(func: F) -> F:
    """Fill ``{name}`` placeholders of ``func``'s docstring with the shared descriptions of :data:`PARAMS`."""
    doc = func.__doc__
    if doc:
        lines = doc.splitlines()
        out = []
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("{") and stripped.endswith("}") and stripped[1:-1] in PARAMS:
                indent = line[: len(line) - len(line.lstrip())]
                out.append(textwrap.indent(PARAMS[stripped[1:-1]], indent))
            else:
                out.append(line)
        func.__doc__ = "\n".join(out)
    return func
