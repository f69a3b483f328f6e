"""The prediction target: log1p of counts per 10,000, from raw counts over all genes.

One transform is used everywhere (training, the reference bank, evaluation, plots)::

    target[spot, gene] = ln(1 + 1e4 * counts[spot, gene] / sum_over_all_genes(counts[spot, :]))

The per-spot total is taken over **all** genes of the AnnData, not only the panel, so the target
of a gene does not depend on which panel was chosen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse

TARGET_SCALE = 1e4
TARGET_DESCRIPTION = "log1p of counts per 10,000 (natural log), totals over all genes"


def raw_counts(adata, layer: str | None = None):
    """Raw counts (``adata.X`` or ``adata.layers[layer]``), checked for NaN, negative and non-integer values.

    Raises
    ------
    KeyError
        If the layer does not exist.
    ValueError
        If counts contain NaN or negative values, or are not integers (normalised or log data were
        given where raw counts are expected).
    """
    if layer is None:
        X, where = adata.X, "adata.X"
    else:
        if layer not in adata.layers:
            raise KeyError(f"layer {layer!r} not found; adata.layers has {list(adata.layers)}.")
        X, where = adata.layers[layer], f"adata.layers[{layer!r}]"
    if X is None:
        raise ValueError(f"{where} is empty: raw counts are needed.")
    values = X.data if sparse.issparse(X) else np.asarray(X)
    if values.size:
        if np.isnan(values).any():
            n = int(np.isnan(values).sum())
            raise ValueError(f"{where} contains {n} NaN values; raw counts must be finite.")
        if (values < 0).any():
            raise ValueError(f"{where} contains negative values (min {values.min():g}); raw counts are needed.")
        sample = values[: min(values.size, 100_000)]
        if not np.allclose(sample, np.round(sample)):
            raise ValueError(
                f"{where} holds non-integer values (e.g. {sample[~np.isclose(sample, np.round(sample))][:3]}): "
                "stexp needs raw counts. Pass layer= naming a layer of raw counts."
            )
    return X


def log1p_cp10k(counts, totals: np.ndarray | None = None) -> np.ndarray:
    """``ln(1 + 1e4 * counts / totals)`` as a dense float32 array; spots with zero total give zeros."""
    X = counts.toarray() if sparse.issparse(counts) else np.asarray(counts)
    X = X.astype(np.float32, copy=False)
    if totals is None:
        totals = X.sum(axis=1)
    totals = np.asarray(totals, dtype=np.float64).reshape(-1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(totals > 0, X / totals * TARGET_SCALE, 0.0)
    return np.log1p(scaled).astype(np.float32)


def expression_target(adata, genes: Sequence[str] | None = None, *, layer: str | None = None) -> np.ndarray:
    """The target matrix ``(n_obs, len(genes))`` for the given genes (all genes when ``None``).

    Raises
    ------
    KeyError
        If a gene is not in ``adata.var_names`` (the message names up to five).
    """
    X = raw_counts(adata, layer)
    totals = np.asarray(X.sum(axis=1)).ravel()
    if genes is None:
        return log1p_cp10k(X, totals)
    idx = adata.var_names.get_indexer(list(genes))
    if (idx < 0).any():
        missing = [g for g, i in zip(genes, idx, strict=True) if i < 0]
        raise KeyError(f"{len(missing)} of {len(idx)} genes are not in adata.var_names, e.g. {missing[:5]}.")
    return log1p_cp10k(X[:, idx], totals)


def normalize_target(adata, *, layer: str | None = None, key_added: str = "log1p_cp10k", copy: bool = False):
    """Store the prediction target (log1p of counts per 10k) of every gene in ``adata.layers[key_added]``.

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
    adata.layers[key_added] = expression_target(adata, None, layer=layer)
    record(adata, "normalize_target", {"layer": layer, "key_added": key_added, "transform": TARGET_DESCRIPTION})
    logger.info(f"added adata.layers[{key_added!r}] ({TARGET_DESCRIPTION})")
    return adata if copy else None
