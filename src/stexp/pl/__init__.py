"""Plots: measured against predicted genes on the tissue, scores, domains."""

from stexp._lazy import lazy_namespace

__getattr__, __dir__, __all__ = lazy_namespace(
    __name__,
    {
        "spatial_genes": "._spatial",
        "scores": "._scores",
        "domains": "._domains",
    },
)
