"""Datasets: a synthetic default and the real HER2+ breast cancer ST data."""

from stexp._lazy import lazy_namespace

__getattr__, __dir__, __all__ = lazy_namespace(
    __name__,
    {
        "synthetic": "._synthetic",
        "her2st": "._her2st",
    },
)
