"""Per-gene Pearson correlation: the one metric that stexp reports and chooses on.

:func:`stexp.tl.evaluate` reports it; the choices made on training slides (smoothing σ, retrieval
temperature, the calibration's expected PCC) maximise or estimate the same number, with the same rule
for constant genes. Plain numpy, no AnnData.
"""

from __future__ import annotations

import numpy as np

#: A slide with fewer spots than this has no per-gene Pearson.
MIN_SPOTS = 3


def pearson_columns(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of each column of ``truth`` with the same column of ``pred`` (across rows).

    Computed at once for all columns in float64. Columns that are constant (up to float32 rounding) in
    either array get NaN: a prediction copied to every spot is constant whatever its value.

    Returns
    -------
    The per-column correlations and a boolean mask of the constant columns.
    """
    t = np.asarray(truth, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    tc = t - t.mean(axis=0)
    pc = p - p.mean(axis=0)
    t_ss = np.einsum("ij,ij->j", tc, tc)
    p_ss = np.einsum("ij,ij->j", pc, pc)
    n = t.shape[0]
    tol = lambda x: n * (1e-6 * (1.0 + np.abs(x).max(axis=0))) ** 2
    constant = (t_ss <= tol(t)) | (p_ss <= tol(p))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.einsum("ij,ij->j", tc, pc) / np.sqrt(t_ss * p_ss)
    r = np.clip(r, -1.0, 1.0)
    r[constant] = np.nan
    return r, constant


def nanmean(x: np.ndarray) -> float:
    """Mean of the finite entries (NaN when there are none), without numpy's empty-slice warning."""
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def per_slide_pearson(pred: np.ndarray, target: np.ndarray, library: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene Pearson of every slide with at least :data:`MIN_SPOTS` spots, by slide (NaN for constant genes)."""
    library = np.asarray(library).astype(str)
    out = {}
    for lib in dict.fromkeys(library.tolist()):
        rows = library == lib
        if rows.sum() >= MIN_SPOTS:
            out[lib] = pearson_columns(target[rows], pred[rows])[0]
    return out


def mean_gene_pearson(pred: np.ndarray, target: np.ndarray, library: np.ndarray) -> float:
    """PCC(ACG) averaged over slides: per slide the mean per-gene Pearson (constant genes skipped), as ``evaluate``."""
    scores = [nanmean(r) for r in per_slide_pearson(pred, target, library).values()]
    scores = [s for s in scores if np.isfinite(s)]
    return float(np.mean(scores)) if scores else float("nan")
