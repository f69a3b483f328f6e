"""Preprocessing: gene panels, the expression target and image features."""

from stexp._lazy import lazy_namespace

__getattr__, __dir__, __all__ = lazy_namespace(
    __name__,
    {
        "select_hvg": "._hvg",
        "embed_images": "._embed",
        "normalize_target": "._target",
    },
)
