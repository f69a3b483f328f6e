"""Tools: train, predict, evaluate, cross-validate, spatial domains."""

from stexp._lazy import lazy_namespace

__getattr__, __dir__, __all__ = lazy_namespace(
    __name__,
    {
        "fit": "._fit",
        "predict": "._predict",
        "evaluate": "._evaluate",
        "cross_validate": "._cross_validate",
        "domains": "._domains",
        "score_domains": "._domains",
        "get_prediction": "._storage",
    },
)
