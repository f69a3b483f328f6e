"""Where predicted expression lives in the AnnData: the one module that writes and reads it.

Rule (:func:`write_prediction`):

- the predicted genes are exactly ``adata.var_names`` -> ``adata.layers[key]``, float32 ``n_obs x n_vars``
  (scanpy's usual place; nothing is NaN-padded);
- otherwise (a model panel smaller than ``var``, e.g. 785 genes of 18,000, or genes absent from ``var``)
  -> ``adata.obsm[key]``, a ``pandas.DataFrame`` indexed by ``obs_names`` with one float32 column per
  predicted gene. Memory is ``n_obs x n_panel``: 100,000 spots x 785 genes is 314 MB, where a dense
  all-genes layer would be 7 GB. ``adata.obsm[key]["ERBB2"]`` is one gene; anndata subsets the frame with
  the spots and writes it to h5ad / zarr.

Any key uses the same rule (``stexp_pred``, its ``_std`` spread, cross-validation layers, intervals);
the names of a prediction's companions, and the rule that a new prediction replaces all of them, are
in :mod:`stexp.tl._keys`.
Every stexp reader (:func:`read_prediction`, :func:`prediction_columns`) accepts both places, and also
an all-genes layer from older versions of stexp with NaN outside the panel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from anndata import AnnData


def write_prediction(adata, key: str, genes: Sequence[str], values) -> str:
    """Store ``values`` (``n_obs x len(genes)``) of ``genes`` under ``key``; returns where (``"adata.layers[...]"``).

    The genes are stored in ``var`` order in a layer when they are exactly ``adata.var_names``, else as an
    ``obsm`` DataFrame with the genes as columns (see the module docstring). An entry of the same key in
    the other place is removed, so a key never means two things.

    Raises
    ------
    ValueError
        If the shape does not match, or genes repeat.
    """
    import pandas as pd

    genes = [str(g) for g in genes]
    values = np.asarray(values, dtype=np.float32)
    if values.shape != (adata.n_obs, len(genes)):
        raise ValueError(
            f"prediction {key!r}: values have shape {values.shape}, expected (n_obs, n_genes) = "
            f"{(adata.n_obs, len(genes))}."
        )
    if len(set(genes)) != len(genes):
        raise ValueError(f"prediction {key!r}: genes repeat.")
    var = adata.var_names
    if len(genes) == len(var) and var.is_unique and set(genes) == set(map(str, var)):
        order = pd.Index(genes).get_indexer(var.astype(str))
        adata.layers[key] = np.ascontiguousarray(values[:, order])
        adata.obsm.pop(key, None)
        return f"adata.layers[{key!r}]"
    adata.obsm[key] = pd.DataFrame(values, index=adata.obs_names.copy(), columns=pd.Index(genes, dtype=object))
    if key in adata.layers:
        del adata.layers[key]
    return f"adata.obsm[{key!r}]"


def has_prediction(adata, key: str) -> bool:
    """Whether ``key`` holds a prediction (an ``obsm`` DataFrame or a layer)."""
    return _is_frame(adata, key) or key in adata.layers


def where(adata, key: str) -> str:
    """``"adata.obsm[key]"`` or ``"adata.layers[key]"``, for messages."""
    return f"adata.obsm[{key!r}]" if _is_frame(adata, key) else f"adata.layers[{key!r}]"


def _is_frame(adata, key: str) -> bool:
    import pandas as pd

    return key in adata.obsm and isinstance(adata.obsm[key], pd.DataFrame)


def _missing(adata, key: str) -> KeyError:
    frames = [k for k in adata.obsm if _is_frame(adata, k)]
    return KeyError(
        f"no prediction {key!r}: neither adata.obsm[{key!r}] (a gene DataFrame) nor adata.layers[{key!r}] "
        f"(predictions: obsm {frames}, layers {list(adata.layers)}); run stexp.tl.predict (key_added=...) "
        "or name the prediction's key."
    )


def read_prediction(adata, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(genes, values)`` of a prediction: the predicted genes and float32 ``n_obs x len(genes)`` values.

    For a layer, genes that are NaN on every spot (outside the panel, in layers of older versions) are
    left out.

    Raises
    ------
    KeyError
        If ``key`` holds no prediction.
    ValueError
        If the values are not numeric or not ``n_obs`` rows.
    """
    if _is_frame(adata, key):
        frame = adata.obsm[key]
        genes = np.asarray(frame.columns.astype(str), dtype=object)
        values = _numeric(frame.to_numpy(), adata, key)
        return genes, values
    if key not in adata.layers:
        raise _missing(adata, key)
    values = _numeric(adata.layers[key], adata, key)
    keep = ~np.isnan(values).all(axis=0)
    genes = np.asarray(adata.var_names.astype(str), dtype=object)
    if keep.all():
        return genes, values
    return genes[keep], values[:, keep]


def prediction_columns(adata, key: str, genes: Sequence[str], rows=None) -> np.ndarray:
    """float32 ``(n_rows, len(genes))`` values of ``genes`` (NaN for genes not predicted), rows ``rows`` (default all).

    Reads only the requested columns of a layer or DataFrame.
    """
    import pandas as pd

    genes = [str(g) for g in genes]
    if _is_frame(adata, key):
        frame = adata.obsm[key]
        cols = pd.Index(frame.columns.astype(str)).get_indexer(genes)
        source = frame.to_numpy() if rows is None else frame.to_numpy()[rows]
    elif key in adata.layers:
        cols = adata.var_names.astype(str).get_indexer(genes)
        layer = adata.layers[key]
        source = layer if rows is None else layer[rows]
    else:
        raise _missing(adata, key)
    n = adata.n_obs if rows is None else len(np.arange(adata.n_obs)[rows])
    out = np.full((n, len(genes)), np.nan, dtype=np.float32)
    ok = cols >= 0
    if ok.any():
        out[:, ok] = _numeric(source[:, cols[ok]], adata, key, n_rows=n)
    return out


def _numeric(values, adata, key: str, *, n_rows: int | None = None) -> np.ndarray:
    from scipy import sparse

    values = values.toarray() if sparse.issparse(values) else np.asarray(values)
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"prediction {key!r} is not numeric (dtype {values.dtype}).")
    n = adata.n_obs if n_rows is None else n_rows
    if values.ndim != 2 or values.shape[0] != n:
        raise ValueError(f"prediction {key!r} has shape {values.shape}; expected {n} rows.")
    return values.astype(np.float32, copy=False)


def get_prediction(adata: AnnData, key: str = "stexp_pred", genes: Sequence[str] | None = None) -> pd.DataFrame:
    """A prediction as a ``pandas.DataFrame`` (spots x genes), wherever it is stored.

    Parameters
    ----------
    adata
        AnnData holding the prediction (from :func:`stexp.tl.predict` or :func:`stexp.tl.cross_validate`).
    key
        Its key: ``adata.layers[key]`` or the gene DataFrame ``adata.obsm[key]``.
    genes
        Genes to return (NaN for genes that were not predicted); default: every predicted gene.

    Returns
    -------
    DataFrame indexed by ``adata.obs_names`` with one float32 column per gene.
    """
    import pandas as pd

    names: Any
    if genes is None:
        names, values = read_prediction(adata, key)
    else:
        names, values = [str(g) for g in genes], prediction_columns(adata, key, genes)
    return pd.DataFrame(values, index=adata.obs_names.copy(), columns=pd.Index(list(names), dtype=object))
