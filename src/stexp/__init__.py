"""stexp: predict spatial gene expression from H&E histology.

An scverse-style AnnData plugin. The public namespaces are :mod:`stexp.pp`
(preprocessing), :mod:`stexp.tl` (tools: fit, predict, evaluate, domains),
:mod:`stexp.pl` (plots), :mod:`stexp.io` (readers), :mod:`stexp.datasets` and
:mod:`stexp.models`. Heavy libraries (torch, squidpy, spatialdata) are imported
only inside the functions that need them, so ``import stexp`` stays fast.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

from ._settings import settings

try:
    __version__ = version("stexp")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

_SUBMODULES = ("pp", "tl", "pl", "io", "datasets", "models")

__all__ = ["settings", "__version__", *_SUBMODULES]


def __getattr__(name: str):
    # Sub-packages load on first access (``stexp.tl``) to keep ``import stexp`` cheap.
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'stexp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
