"""Readers and writers: legacy ST folders, SpatialData, pseudo-spots over H&E-only and whole-slide images."""

from stexp._lazy import lazy_namespace

__getattr__, __dir__, __all__ = lazy_namespace(
    __name__,
    {
        "read_st": "._st",
        "read_visium": "._visium",
        "from_spatialdata": "._spatialdata",
        "to_spatialdata": "._spatialdata",
        "grid_spots": "._grid",
        "read_wsi": "._wsi",
        "validate": "._validate",
    },
)
