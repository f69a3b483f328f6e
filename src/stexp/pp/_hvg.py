"""``stexp.pp.select_hvg``: the mclSTExp gene-panel protocol (per-slide HVGs, union, detection filter)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from stexp._docs import doc_params
from stexp._layout import LIBRARY_KEY, library_labels, record
from stexp._settings import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

#: ``adata.var`` column of the gene panel that :func:`select_hvg` writes and ``stexp.tl.fit`` reads.
PANEL_KEY = "stexp_panel"
#: The paper's detection threshold (genes detected in at least this many spots over all slides).
PAPER_MIN_SPOTS = 1000
#: With ``min_spots=None`` on data with fewer than 10,000 spots, the threshold is this fraction of spots.
AUTO_MIN_SPOTS_FRACTION = 0.1
#: With ``n_bins=None``, at most 20 mean bins (scanpy's default) and at least this many genes per bin.
GENES_PER_BIN = 20


def _resolve_min_spots(min_spots: int | float | None, n_obs: int) -> int:
    if min_spots is None:
        return int(min(PAPER_MIN_SPOTS, math.ceil(AUTO_MIN_SPOTS_FRACTION * n_obs)))
    if isinstance(min_spots, float) and 0 < min_spots < 1:
        return int(math.ceil(min_spots * n_obs))
    if min_spots != int(min_spots) or min_spots < 0:
        raise ValueError(
            f"min_spots must be a non-negative number of spots or a fraction in (0, 1), got {min_spots!r}."
        )
    return int(min_spots)


def _slide_hvg(counts, n_top_genes: int, flavor: str, n_bins: int | None) -> np.ndarray:
    """Boolean mask of the ``n_top_genes`` most variable genes of one slide, on a log1p-cp10k copy."""
    import anndata as ad
    import scanpy as sc

    from stexp.pp._target import TARGET_SCALE

    sub = ad.AnnData(X=counts.astype(np.float32))
    sc.pp.normalize_total(sub, target_sum=TARGET_SCALE)
    sc.pp.log1p(sub)
    detected = np.asarray((sub.X > 0).sum(axis=0)).ravel() > 0
    if n_top_genes >= int(detected.sum()):
        return detected
    if n_bins is None:  # z-scoring dispersions within a mean bin needs tens of genes per bin
        n_bins = int(min(20, max(1, detected.sum() // GENES_PER_BIN)))
    sc.pp.highly_variable_genes(sub, n_top_genes=n_top_genes, flavor=flavor, n_bins=n_bins, subset=False, inplace=True)
    return sub.var["highly_variable"].to_numpy(dtype=bool) & detected


@doc_params
def select_hvg(
    adata: AnnData,
    *,
    n_top_genes: int = 1000,
    library_key: str = LIBRARY_KEY,
    min_spots: int | float | None = None,
    genes: Sequence[str] | None = None,
    layer: str | None = None,
    flavor: str = "seurat",
    n_bins: int | None = None,
    key_added: str = PANEL_KEY,
    copy: bool = False,
) -> AnnData | None:
    """Select the gene panel as mclSTExp (and HisToGene/Hist2ST before it) did.

    For each slide, the ``n_top_genes`` most variable genes are found with
    :func:`scanpy.pp.highly_variable_genes` on a log1p-of-counts-per-10k copy of that slide's counts
    (the user's data are not altered); the per-slide sets are pooled by union; genes detected
    (count > 0) in fewer than ``min_spots`` spots over all slides are dropped. With ``genes=`` a
    fixed panel is used instead (e.g. the HER2+ 785 genes).

    Parameters
    ----------
    adata
        AnnData with raw counts, one or more slides.
    n_top_genes
        Highly variable genes per slide.
    {library_key}
    min_spots
        Keep genes detected in at least this many spots over all slides; a float in (0, 1) is a
        fraction of spots. ``None``: the paper's 1000, or 10% of the spots when that is smaller
        (1000 spots would remove every gene of a small data set).
    genes
        A fixed panel; every gene must be in ``adata.var_names``.
    {layer}
    flavor
        ``flavor`` of :func:`scanpy.pp.highly_variable_genes` (``"seurat"`` works on log data).
    n_bins
        Mean bins in which dispersions are z-scored. ``None``: scanpy's 20, fewer on small gene sets
        (at least 20 genes per bin; a bin holding one gene gets a normalised dispersion of 1 and
        makes a flat gene look variable).
    key_added
        ``adata.var[key_added]`` (bool) marks the panel; ``var[key_added + "_n_slides"]`` counts the
        slides in which a gene was highly variable, ``var[key_added + "_n_spots"]`` the spots in
        which it was detected.
    {copy}

    Raises
    ------
    KeyError
        If a gene of ``genes`` is not in ``adata.var_names`` (the message names them) or ``layer``
        does not exist.
    ValueError
        If the panel comes out empty, ``n_top_genes``/``min_spots`` are invalid, ``adata.var_names`` holds
        duplicated genes (named), ``genes`` names a gene twice, or the counts hold NaN, infinite or negative
        values (see :func:`stexp.pp._target.raw_counts`).
    """
    from scipy import sparse

    from stexp.pp._target import raw_counts

    if not adata.var_names.is_unique:
        dup = list(dict.fromkeys(adata.var_names[adata.var_names.duplicated()].astype(str)))
        raise ValueError(
            f"adata.var_names holds {len(dup)} duplicated gene name(s), e.g. {dup[:10]}: a panel of gene names "
            "would be ambiguous. Make them unique (adata.var_names_make_unique()) or drop the duplicates first."
        )
    adata = adata.copy() if copy else adata
    counts = raw_counts(adata, layer)
    counts = sparse.csr_matrix(counts) if not sparse.issparse(counts) else counts.tocsr()
    n_spots = np.asarray((counts > 0).sum(axis=0)).ravel().astype(np.int64)
    labels = library_labels(adata, library_key)
    libs = list(dict.fromkeys(labels.tolist()))

    n_slides = np.zeros(adata.n_vars, dtype=np.int64)
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else list(genes)
        twice = list(dict.fromkeys(g for g, n in Counter(genes).items() if n > 1))
        if twice:
            raise ValueError(f"genes names {len(twice)} gene(s) more than once: {twice[:10]}.")
        idx = adata.var_names.get_indexer(genes)
        if (idx < 0).any():
            missing = [g for g, i in zip(genes, idx, strict=True) if i < 0]
            raise KeyError(
                f"{len(missing)} of {len(genes)} panel genes are not in adata.var_names: {missing[:10]}"
                + (" ..." if len(missing) > 10 else "")
            )
        panel = np.zeros(adata.n_vars, dtype=bool)
        panel[idx] = True
        resolved_min_spots = None
    else:
        if int(n_top_genes) != n_top_genes or n_top_genes < 1:
            raise ValueError(f"n_top_genes must be a positive integer, got {n_top_genes!r}.")
        resolved_min_spots = _resolve_min_spots(min_spots, adata.n_obs)
        for lib in libs:
            mask = labels == lib
            if mask.sum() < 2:
                raise ValueError(f"slide {lib!r} has {int(mask.sum())} spot(s); HVG selection needs at least 2.")
            n_slides += _slide_hvg(counts[mask], int(n_top_genes), flavor, n_bins)
        panel = (n_slides > 0) & (n_spots >= resolved_min_spots)
        if not panel.any():
            raise ValueError(
                f"no gene is highly variable in a slide and detected in >= {resolved_min_spots} of the "
                f"{adata.n_obs} spots (the most-detected gene is in {int(n_spots.max(initial=0))}); lower min_spots."
            )

    adata.var[key_added] = panel
    adata.var[f"{key_added}_n_spots"] = n_spots
    if genes is None:
        adata.var[f"{key_added}_n_slides"] = n_slides
    record(
        adata,
        "select_hvg",
        {
            "key_added": key_added,
            "n_genes": int(panel.sum()),
            "n_top_genes": None if genes is not None else int(n_top_genes),
            "min_spots": resolved_min_spots,
            "fixed_panel": genes is not None,
            "flavor": flavor,
            "n_bins": n_bins,
            "library_key": library_key,
            "libraries": libs,
            "layer": layer,
            "transform": "per-slide log1p of counts per 10,000 (on a copy)",
        },
    )
    how = (
        "fixed panel"
        if genes is not None
        else f"union of per-slide top {n_top_genes} HVGs over {len(libs)} slide(s), detected in >= {resolved_min_spots} spots"
    )
    logger.info(f"added adata.var[{key_added!r}]: {int(panel.sum())} genes ({how})")
    return adata if copy else None
