"""Feature standardisation, the one rule every model and the calibration use (numpy; torch models mirror it)."""

from __future__ import annotations

import numpy as np

#: A feature whose standard deviation is below this is constant: it is centred, not scaled.
CONSTANT_SCALE = 1e-12


#: The neural models' floor on a feature's standard deviation, as a fraction of the median one.
STD_FLOOR_FRACTION = 0.1


def feature_scaling(X: np.ndarray, *, floor_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation of ``X``, for standardising.

    ``floor_fraction=0`` (the retrieval and linear models, the calibration): a constant feature gets scale 1.
    ``floor_fraction > 0`` (the neural models, :data:`STD_FLOOR_FRACTION`): every standard deviation is
    floored at that fraction of their median (lower median), so that a feature that is nearly constant on
    the training spots (a CNN channel that never fires there) does not turn any variation on a new slide
    into z-scores of thousands (seen on HER2+ EfficientNet-Lite0 features: |z| ~ 1e5 on a held-out slide).
    """
    mean, scale = _mean_std(X)
    if floor_fraction > 0:
        lower_median = float(np.sort(scale)[(scale.size - 1) // 2]) if scale.size else 0.0
        return mean, np.maximum(scale, max(lower_median * floor_fraction, 1e-6)).astype(scale.dtype)
    return mean, np.where(scale > CONSTANT_SCALE, scale, 1.0)


#: Rows above which :func:`feature_scaling` reads ``X`` in blocks of this many rows (no full-size temporary: a
#: million spots of 1,704-d features are 6.8 GB, and ``X.std`` would make a second copy).
SCALING_BLOCK = 65_536


def _mean_std(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) standard deviation; two passes over row blocks for a large ``X``."""
    if X.shape[0] <= SCALING_BLOCK:
        return X.mean(axis=0), X.std(axis=0)
    dtype = np.result_type(X.dtype, np.float32)
    total = np.zeros(X.shape[1], dtype=np.float64)
    for s in range(0, X.shape[0], SCALING_BLOCK):
        total += np.asarray(X[s : s + SCALING_BLOCK], dtype=np.float64).sum(axis=0)
    mean = total / X.shape[0]
    squares = np.zeros(X.shape[1], dtype=np.float64)
    for s in range(0, X.shape[0], SCALING_BLOCK):
        squares += ((np.asarray(X[s : s + SCALING_BLOCK], dtype=np.float64) - mean) ** 2).sum(axis=0)
    return mean.astype(dtype), np.sqrt(squares / X.shape[0]).astype(dtype)


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm (float32; an all-zero row stays zero)."""
    X = np.asarray(X, dtype=np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
