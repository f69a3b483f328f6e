"""Package versions recorded with every result."""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version

_PACKAGES = ("stexp", "torch", "torchvision", "anndata", "scanpy", "squidpy", "spatialdata", "numpy")


@cache
def versions() -> dict[str, str]:
    """Installed versions of stexp and the libraries its results depend on."""
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
