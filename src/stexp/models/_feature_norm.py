"""Per-slide feature normalisation: a slide's image features centred (and scaled) by its own statistics.

A stain, scanner or resolution change moves all of a slide's features together; centring each slide on its
own mean (``"slide_centre"``) or standardising it (``"slide_standardise"``) removes that common move before
retrieval, at the price of also removing what really differs between slides on average. A recipe's
``feature_norm`` applies it to the training slides at fit and to every query slide at prediction
(:meth:`stexp.models.ExpressionModel.predict`). The statistics of a query slide are those of the spots
given: predict a whole slide at once, not a handful of its spots.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ._data import SpotData

#: The choices of ``feature_norm`` (``None``: features as embedded).
FEATURE_NORMS = (None, "slide_centre", "slide_standardise")


def check_feature_norm(value: str | None) -> str | None:
    """``value`` if it is one of :data:`FEATURE_NORMS`, else a ValueError listing them."""
    if value not in FEATURE_NORMS:
        raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {value!r}.")
    return value


def normalise_features(features: np.ndarray, library: np.ndarray, how: str | None) -> np.ndarray:
    """``features`` with each library's rows centred (``"slide_centre"``) or standardised (``"slide_standardise"``)."""
    check_feature_norm(how)
    if how is None:
        return features
    out = np.asarray(features, dtype=np.float32).copy()
    library = np.asarray(library).astype(str)
    for lib in np.unique(library):
        rows = library == lib
        block = out[rows].astype(np.float64)
        block -= block.mean(axis=0)
        if how == "slide_standardise":
            std = block.std(axis=0)
            block /= np.where(std > 1e-12, std, 1.0)
        out[rows] = block.astype(np.float32)
    return out


def normalise_spots(data: SpotData, how: str | None) -> SpotData:
    """``data`` with its features normalised per library (itself when ``how`` is ``None``)."""
    if how is None:
        return data
    return replace(data, features=normalise_features(data.features, data.library, how))
