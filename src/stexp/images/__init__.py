"""Histology images: the patch reader, image encoders, feature cache and a patch Dataset for fine-tuning."""

from stexp._lazy import lazy_namespace

__getattr__, __dir__, __all__ = lazy_namespace(
    __name__,
    {
        "read_patches": "._patches",
        "default_patch_um": "._patches",
        "load_slide": "._source",
        "Encoder": "._encoders",
        "list_encoders": "._encoders",
        "build_encoder": "._encoders",
        "PatchDataset": "._dataset",
    },
)
