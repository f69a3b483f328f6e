"""Histology images: slide views, the patch reader, image encoders, feature specs and a patch Dataset."""

from stexp._lazy import lazy_namespace

__getattr__, __dir__, __all__ = lazy_namespace(
    __name__,
    {
        "SlideView": "._slide",
        "slide_view": "._slide",
        "open_image": "._slide",
        "RegionReader": "._slide",
        "read_patches": "._patches",
        "default_patch_um": "._patches",
        "PatchSource": "._patches",
        "Encoder": "._encoders",
        "EncoderSpec": "._spec",
        "DEFAULT_ENCODER": "._encoders",
        "list_encoders": "._encoders",
        "build_encoder": "._encoders",
        "register_encoder": "._encoders",
        "Preset": "._presets",
        "list_presets": "._presets",
        "preset_table": "._presets",
        "preset_checkpoint": "._presets",
        "PatchDataset": "._dataset",
        "hed_shift": "._stain",
        "DEFAULT_STAIN_NORM": "._views",
    },
)
