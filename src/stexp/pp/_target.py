"""The prediction target: log1p of counts per 10,000, from raw counts over all genes.

One transform is used everywhere (training, the reference bank, evaluation, plots)::

    target[spot, gene] = ln(1 + 1e4 * counts[spot, gene] / sum_over_all_genes(counts[spot, :]))

The per-spot total is taken over **all** genes of the AnnData, not only the panel, so the target
of a gene does not depend on which panel was chosen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import sparse

from stexp._layout import counts_matrix

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

TARGET_SCALE = 1e4
TARGET_DESCRIPTION = "log1p of counts per 10,000 (natural log), totals over all genes"


def _example(adata, X, mask: np.ndarray) -> str:
    """``"spot 'a', gene 'b'"`` of the first entry of ``X`` (its stored values for sparse) flagged by ``mask``."""
    if sparse.issparse(X):
        coo = X.tocoo()  # keeps the order of X.data
        k = int(np.flatnonzero(mask)[0])
        r, c = coo.row[k], coo.col[k]
    else:
        r, c = np.argwhere(mask.reshape(np.shape(X)))[0]
    return f"spot {str(adata.obs_names[r])!r}, gene {str(adata.var_names[c])!r}"


def raw_counts(adata: AnnData, layer: str | None = None):
    """Raw counts (``adata.X`` or ``adata.layers[layer]``), checked for NaN, infinite, negative and non-integer values.

    The checks allocate nothing of the matrix's size (min / max first; counting only on failure).

    Raises
    ------
    KeyError
        If the layer does not exist.
    ValueError
        If counts are not numeric, contain NaN, infinite or negative values (the message gives their number
        and an example spot and gene), or are not integers (normalised or log data were given where raw
        counts are expected).
    """
    X, where = counts_matrix(adata, layer)
    if X is None:
        raise ValueError(f"{where} is empty: raw counts are needed.")
    values = X.data if sparse.issparse(X) else np.asarray(X)
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise ValueError(f"{where} must hold numeric raw counts, got dtype {values.dtype}.")
    if values.size:
        lo, hi = values.min(), values.max()  # NaN propagates; +-inf shows in one of them
        if not (np.isfinite(lo) and np.isfinite(hi)):
            bad = ~np.isfinite(values)
            raise ValueError(
                f"{where} contains {int(bad.sum())} NaN or infinite values (e.g. {_example(adata, X, bad)}); "
                "raw counts must be finite."
            )
        if lo < 0:
            neg = values < 0
            raise ValueError(
                f"{where} contains {int(neg.sum())} negative values (min {lo:g}, e.g. {_example(adata, X, neg)}); "
                "raw counts are needed."
            )
        sample = values.ravel()[: min(values.size, 100_000)]
        if not np.allclose(sample, np.round(sample)):
            raise ValueError(
                f"{where} holds non-integer values (e.g. {sample[~np.isclose(sample, np.round(sample))][:3]}): "
                "stexp needs raw counts. Pass layer= naming a layer of raw counts."
            )
    return X


def _totals(X) -> np.ndarray:
    """Per-spot totals over every gene (float64), without densifying a sparse matrix."""
    return np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()


def _transform(values: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """``ln(1 + 1e4 * values / totals)`` elementwise in float64, as float32; zero totals give zeros."""
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = values.astype(np.float32, copy=False) / totals * TARGET_SCALE
    zero = ~(totals > 0)
    if zero.any():  # 0 / 0 for a spot without counts
        scaled[np.broadcast_to(zero, scaled.shape)] = 0.0
    return np.log1p(scaled, out=scaled).astype(np.float32)


def log1p_cp10k_sparse(counts, totals: np.ndarray | None = None):
    """:func:`log1p_cp10k` of sparse counts as a CSR matrix of the same sparsity (``log1p(0) = 0``).

    Only the stored values are transformed, so nothing of the matrix's dense size is allocated.
    """
    X = sparse.csr_matrix(counts)
    if totals is None:
        totals = _totals(X)
    totals = np.asarray(totals, dtype=np.float64).ravel()
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    out = sparse.csr_matrix((_transform(X.data, totals[rows]), X.indices.copy(), X.indptr.copy()), shape=X.shape)
    return out


def log1p_cp10k(counts, totals: np.ndarray | None = None) -> np.ndarray:
    """``ln(1 + 1e4 * counts / totals)`` as a dense float32 array; spots with zero total give zeros.

    Sparse counts are transformed on their stored values and only the result is made dense.
    """
    if totals is None:
        totals = _totals(counts)
    totals = np.asarray(totals, dtype=np.float64).ravel()
    if sparse.issparse(counts):
        return log1p_cp10k_sparse(counts, totals).toarray()
    X = np.asarray(counts)
    out = np.empty(X.shape, dtype=np.float32)
    step = max(1, 2**21 // max(1, X.shape[1]))  # ~16 MiB of float64 at a time
    for start in range(0, X.shape[0], step):
        rows = slice(start, start + step)
        out[rows] = _transform(X[rows], totals[rows, None])
    return out


def panel_indices(var_names, genes: Sequence[str]) -> np.ndarray:
    """Positions of ``genes`` in ``var_names``.

    Raises
    ------
    KeyError
        If a gene is not in ``var_names`` (the message names up to five).
    ValueError
        If a gene of ``genes`` appears more than once in ``var_names`` (which column is meant is ambiguous).
    """
    import pandas as pd

    var_names = pd.Index(var_names)
    genes = [genes] if isinstance(genes, str) else list(genes)
    if var_names.is_unique:
        idx = var_names.get_indexer(genes)
    else:
        counts = var_names.value_counts()
        dup = [g for g in dict.fromkeys(genes) if counts.get(g, 0) > 1]
        if dup:
            raise ValueError(
                f"{len(dup)} requested gene(s) appear more than once in adata.var_names: {dup[:10]}; "
                "make var_names unique (adata.var_names_make_unique()) or drop the duplicates."
            )
        first = {g: i for i, g in reversed(list(enumerate(var_names)))}
        idx = np.array([first.get(g, -1) for g in genes], dtype=np.int64)
    if (idx < 0).any():
        missing = [g for g, i in zip(genes, idx, strict=True) if i < 0]
        raise KeyError(f"{len(missing)} of {len(idx)} genes are not in adata.var_names, e.g. {missing[:5]}.")
    return idx


def expression_target(adata: AnnData, genes: Sequence[str] | None = None, *, layer: str | None = None) -> np.ndarray:
    """The target matrix ``(n_obs, len(genes))`` for the given genes (all genes when ``None``).

    Totals are taken over every gene from the (sparse) counts; only the requested genes are made dense.

    Raises
    ------
    KeyError
        If a gene is not in ``adata.var_names`` (the message names up to five).
    ValueError
        Bad counts (see :func:`raw_counts`), or a requested gene that appears more than once in ``var_names``.
    """
    return expression_target_and_depth(adata, genes, layer=layer)[0]


def expression_target_and_depth(
    adata: AnnData, genes: Sequence[str] | None = None, *, layer: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`expression_target` and the total counts of every spot (over all genes), from one read of the counts."""
    X = raw_counts(adata, layer)
    totals = _totals(X)
    if genes is None:
        return log1p_cp10k(X, totals), totals
    idx = panel_indices(adata.var_names, genes)
    if sparse.issparse(X):
        return log1p_cp10k(sparse.csr_matrix(X)[:, idx], totals), totals
    return log1p_cp10k(np.asarray(X)[:, idx], totals), totals


def normalize_target(
    adata: AnnData, *, layer: str | None = None, key_added: str = "log1p_cp10k", copy: bool = False
) -> AnnData | None:
    """Store the prediction target (log1p of counts per 10k) of every gene in ``adata.layers[key_added]``.

    The layer is sparse (CSR, same sparsity) when the counts are sparse, dense otherwise. The counts are not
    changed.

    Parameters
    ----------
    adata
        AnnData with raw counts.
    layer
        Layer holding the raw counts (``None``: ``adata.X``).
    key_added
        Name of the new layer.
    copy
        Return a copy instead of writing in place.
    """
    from stexp._layout import record
    from stexp._settings import logger

    adata = adata.copy() if copy else adata
    X = raw_counts(adata, layer)
    # sparse counts give a sparse layer of the same sparsity (log1p(0) = 0): no dense genes x spots copy
    adata.layers[key_added] = (
        log1p_cp10k_sparse(X) if sparse.issparse(X) else expression_target(adata, None, layer=layer)
    )
    record(adata, "normalize_target", {"layer": layer, "key_added": key_added, "transform": TARGET_DESCRIPTION})
    logger.info(f"added adata.layers[{key_added!r}] ({TARGET_DESCRIPTION})")
    return adata if copy else None
