"""``stexp.tl.domains`` and ``stexp.tl.score_domains``: spatial domains from (predicted) expression."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from stexp._docs import doc_params
from stexp._layout import LIBRARY_KEY, as_list, is_unmeasured, library_labels, record
from stexp._settings import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


#: Candidate numbers of domains tried by the silhouette search when ``n_domains`` is None.
N_DOMAINS_RANGE = (2, 10)


def _expression(adata, layer: str | None, genes: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    """Spots x genes matrix to cluster, with the all-NaN genes (outside the model's panel) dropped."""
    from stexp.pp._target import expression_target

    genes = as_list(genes)
    if genes is not None:
        missing = [g for g in genes if g not in adata.var_names]
        if missing:
            raise KeyError(f"{len(missing)} of {len(genes)} genes are not in adata.var_names, e.g. {missing[:5]}.")
        if not genes:
            raise ValueError("genes is empty.")
    if layer is not None:  # a prediction: its own genes (a layer, or an obsm gene DataFrame of the panel)
        from ._storage import has_prediction, prediction_columns, read_prediction

        if not has_prediction(adata, layer):
            raise KeyError(f"layer {layer!r} not found; adata.layers has {list(adata.layers)}.")
        names: list[str]
        if genes is None:
            read_names, X = read_prediction(adata, layer)
            names = [str(g) for g in read_names]
        else:
            names, X = list(genes), prediction_columns(adata, layer, genes)
    else:
        names = list(adata.var_names) if genes is None else list(genes)
    if layer is None:
        if is_unmeasured(adata):
            raise ValueError(
                "layer=None clusters measured expression, but this AnnData has none "
                "(uns['stexp']['unmeasured'] is set); pass layer= naming the prediction layer."
            )
        X = expression_target(adata, names)
    else:
        X = X.astype(np.float32, copy=False)
    keep = ~np.isnan(X).all(axis=0)  # all-NaN genes lie outside the model's panel; +-inf is refused below
    if not keep.any():
        where = "the measured target" if layer is None else f"adata.layers[{layer!r}]"
        raise ValueError(f"{where} is NaN for every gene: nothing to cluster (was stexp.tl.predict run?).")
    X = X[:, keep]
    bad_rows = ~np.isfinite(X).all(axis=1)
    if bad_rows.any():
        raise ValueError(
            f"{int(bad_rows.sum())} of {X.shape[0]} spots have NaN or infinite values in adata.layers[{layer!r}] "
            f"for genes that are predicted elsewhere (e.g. {list(adata.obs_names[bad_rows][:3])})."
        )
    return X, [n for n, k in zip(names, keep, strict=True) if k]


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters 0..k-1 from the largest to the smallest (ties by first appearance)."""
    uniq, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = sorted(range(len(uniq)), key=lambda i: (-counts[i], first[i]))
    mapping = {uniq[i]: new for new, i in enumerate(order)}
    return np.array([mapping[v] for v in labels], dtype=int)


@doc_params
def domains(
    adata: AnnData,
    *,
    layer: str | None = "stexp_pred",
    method: str = "kmeans",
    n_domains: int | None = None,
    n_pcs: int = 30,
    resolution: float = 1.0,
    key_added: str = "stexp_domain",
    library_key: str = LIBRARY_KEY,
    genes: str | Sequence[str] | None = None,
    seed: int = 0,
    copy: bool = False,
    spatial: float = 0.6,
) -> AnnData | None:
    """Cluster spots into spatial domains on their (predicted) expression.

    The expression of the chosen genes (genes that are NaN for every spot, i.e. outside the
    model's panel, are dropped) is standardised per gene, reduced to ``n_pcs`` principal
    components, and clustered. All libraries are clustered together, so a domain means the same
    expression state on every slide.

    Parameters
    ----------
    adata
        AnnData in stexp's layout.
    layer
        Expression to cluster: a layer such as ``"stexp_pred"`` from :func:`stexp.tl.predict`, or
        ``None`` for the measured target computed from raw counts (log1p of counts per 10k).
    method
        ``"kmeans"`` (scikit-learn, 10 restarts) or ``"leiden"`` (scanpy: exact 15-nearest-neighbour
        graph on the principal components with Gaussian-kernel weights, then :func:`scanpy.tl.leiden`,
        the ``igraph`` flavour when python-igraph is installed, else ``leidenalg``).
    n_domains
        Number of domains for ``"kmeans"``. ``None`` picks the number in 2..10 with the highest
        silhouette score on the principal components (at most 5,000 spots sampled).
        Not used by ``"leiden"``, whose number of domains follows ``resolution``.
    n_pcs
        Principal components kept (fewer when there are fewer genes or spots).
    resolution
        Leiden resolution (higher: more domains).
    key_added
        ``obs`` column written (categorical, domains ``"0"``, ``"1"``, ... from the largest).
    library_key
        ``obs`` column naming the slide of each spot (recorded for :func:`score_domains`).
    genes
        Genes to use (default: every gene with a prediction).
    seed
        Random seed of PCA, k-means and Leiden.
    {copy}
    spatial
        Weight ``λ`` in [0, 1) of each spot's neighbourhood (BANKSY-style, Singhal et al., Nat. Genet.
        2024): the standardised expression ``X`` is joined by its Gaussian average over spots of the same
        slide (σ = the spot pitch), ``[sqrt(1 - λ) X, sqrt(λ) X_neighbours]``, before PCA. ``0`` clusters
        spots alone. The default ``0.6`` was chosen by measurement (``benchmarks/domains.py``): on the seven
        HER2+ sections with a pathologist's annotation, k-means domains of the measured expression agree best
        with it at 0.6 (mean ARI 0.27 against 0.22 at 0; chosen on six sections it is 0.6 for six of seven
        held-out sections, held-out ARI 0.25 against 0.22), and domains of leave-one-patient-out predictions
        agree better with those of the measured expression (ARI 0.17 against 0.12).

    Raises
    ------
    KeyError
        If the layer or a gene is missing.
    ValueError
        If nothing can be clustered (all NaN, too few spots), a spot has NaN or infinite values, the
        method or ``n_domains`` is invalid, or (k-means) the expression has fewer distinct spot profiles
        than the domains asked for (``n_domains=None``: fewer than 2); never silently fewer domains. With
        ``spatial > 0``: spot centres (``obsm["spatial"]``) that are NaN or infinite (the spots are named).
    TypeError
        If ``n_domains`` is not an integer.
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    if method not in ("kmeans", "leiden"):
        raise ValueError(f"method must be 'kmeans' or 'leiden', got {method!r}.")
    if method == "leiden" and n_domains is not None:
        raise ValueError("n_domains applies to method='kmeans'; Leiden's number of domains follows resolution=.")
    if n_pcs < 1:
        raise ValueError(f"n_pcs must be at least 1, got {n_pcs}.")
    if isinstance(spatial, bool) or not isinstance(spatial, numbers.Real) or not 0 <= spatial < 1:
        raise ValueError(f"spatial must be a number in [0, 1), got {spatial!r}.")
    adata = adata.copy() if copy else adata
    library_labels(adata, library_key)  # checks the library column early
    n_spots = adata.n_obs
    if n_domains is not None and (isinstance(n_domains, bool) or not isinstance(n_domains, numbers.Integral)):
        raise TypeError(f"n_domains must be an integer or None, got {type(n_domains).__name__} {n_domains!r}.")
    if n_domains is not None and not 2 <= n_domains < n_spots:
        raise ValueError(f"n_domains must be between 2 and the number of spots - 1 ({n_spots - 1}), got {n_domains}.")
    if n_spots < 3:
        raise ValueError(f"at least 3 spots are needed to find domains, got {n_spots}.")
    if spatial:  # the spot centres, checked (finite) before any work
        from ._spatial_domains import spot_coords_um, with_neighbourhood

        coords, coord_libs = spot_coords_um(adata, library_key)

    X, used = _expression(adata, layer, genes)
    n_distinct = _n_distinct_rows(X)
    needed = 2 if n_domains is None else int(n_domains)
    if method == "kmeans" and n_distinct < needed:
        raise ValueError(_too_few_profiles(n_distinct, n_domains, n_spots))
    Z = StandardScaler().fit_transform(X)
    if spatial:
        Z = with_neighbourhood(Z, float(spatial), coords, coord_libs)
    n_comps = max(1, min(n_pcs, Z.shape[1], n_spots - 1))
    pcs = PCA(n_components=n_comps, random_state=seed).fit_transform(Z) if Z.shape[1] > 1 else Z

    info: dict = {}
    if method == "kmeans":
        labels, info = _kmeans(pcs, n_domains, seed, max_k=n_distinct)
        found = len(np.unique(labels))
        if n_domains is not None and found < n_domains:  # never silently fewer domains than asked for
            raise ValueError(_too_few_profiles(found, n_domains, n_spots, what="k-means found"))
    else:
        labels = _leiden(pcs, resolution, seed)
    labels = _relabel_by_size(labels)
    k = int(labels.max()) + 1
    adata.obs[key_added] = pd.Categorical(labels.astype(str), categories=[str(i) for i in range(k)])
    record(
        adata,
        key_added,
        {
            "step": "domains",
            "layer": layer,
            "method": method,
            "n_domains": k,
            "n_domains_requested": n_domains,
            "n_pcs": n_comps,
            "resolution": resolution if method == "leiden" else None,
            "n_genes": len(used),
            "library_key": library_key,
            "seed": seed,
            "spatial": float(spatial),
            **info,
        },
    )
    logger.info(f"added adata.obs[{key_added!r}] ({k} domains, {method} on {len(used)} genes of layer {layer!r})")
    return adata if copy else None


def _n_distinct_rows(X: np.ndarray) -> int:
    """Number of distinct spot profiles (rows) of ``X``, by their bytes."""
    Xc = np.ascontiguousarray(X)
    if Xc.shape[1] == 0:
        return 1
    Xc = Xc + np.zeros((), dtype=Xc.dtype)  # -0.0 -> 0.0, so equal values have equal bytes
    return len(np.unique(Xc.view(np.dtype((np.void, Xc.dtype.itemsize * Xc.shape[1]))).ravel()))


@doc_params
def _too_few_profiles(n_found: int, n_domains: int | None, n_spots: int, what: str = "the expression has") -> str:
    asked = f"n_domains={n_domains}" if n_domains is not None else "n_domains=None (2 or more)"
    return (
        f"cannot find {asked} domains: {what} only {n_found} distinct spot profile(s) among {n_spots} spots "
        "(constant expression?); check the layer and genes, or ask for fewer domains."
    )


def _kmeans(pcs: np.ndarray, n_domains: int | None, seed: int, max_k: int | None = None) -> tuple[np.ndarray, dict]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    if n_domains is not None:
        return KMeans(n_clusters=n_domains, n_init=10, random_state=seed).fit_predict(pcs), {}
    lo, hi = N_DOMAINS_RANGE
    hi = min(hi, pcs.shape[0] - 1, max_k if max_k is not None else hi)
    best, scores = None, {}
    for k in range(lo, hi + 1):
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(pcs)
        if len(np.unique(labels)) < 2:
            continue
        sample = min(pcs.shape[0], 5000)
        scores[k] = float(silhouette_score(pcs, labels, sample_size=sample, random_state=seed))
        if best is None or scores[k] > scores[best[0]]:
            best = (k, labels)
    if best is None:
        raise ValueError(_too_few_profiles(1, None, pcs.shape[0], what="k-means found"))
    return best[1], {"silhouette": {str(k): v for k, v in scores.items()}}


def _leiden(pcs: np.ndarray, resolution: float, seed: int) -> np.ndarray:
    import importlib.util

    import anndata as ad
    import scanpy as sc

    tmp = ad.AnnData(obsm={"X_pca": pcs.astype(np.float32)}, obs=pd.DataFrame(index=[str(i) for i in range(len(pcs))]))
    # Exact k-NN (scikit-learn) and Gaussian-kernel weights: deterministic, and no numba compilation.
    sc.pp.neighbors(
        tmp,
        use_rep="X_pca",
        n_neighbors=min(15, len(pcs) - 1),
        method="gauss",
        transformer="sklearn",
        random_state=seed,
    )
    if importlib.util.find_spec("igraph") is not None:
        kwargs = {"flavor": "igraph", "n_iterations": 2, "directed": False}
    elif importlib.util.find_spec("leidenalg") is not None:
        kwargs = {}
    else:
        raise ImportError("method='leiden' needs python-igraph (pip install igraph) or leidenalg.")
    sc.tl.leiden(tmp, resolution=resolution, random_state=seed, key_added="leiden", **kwargs)
    return tmp.obs["leiden"].astype(int).to_numpy()


@doc_params
def score_domains(
    adata: AnnData,
    *,
    key: str = "stexp_domain",
    truth_key: str = "label",
    ignore: Sequence[str] = ("undetermined",),
    library_key: str = LIBRARY_KEY,
) -> pd.DataFrame:
    """Agreement of domains with an annotation, per slide: adjusted Rand index and normalised mutual information.

    Spots whose annotation is missing or listed in ``ignore`` are left out.

    Parameters
    ----------
    adata
        AnnData with ``obs[key]`` (e.g. from :func:`domains`) and ``obs[truth_key]``.
    key
        ``obs`` column of the domains.
    truth_key
        ``obs`` column of the reference annotation (e.g. pathologist labels).
    ignore
        Annotation values left out (case-insensitive).
    {library_key}

    Returns
    -------
    DataFrame indexed by library id with columns ``ari``, ``nmi``, ``n_spots`` (spots scored) and
    ``n_domains`` / ``n_labels`` (distinct values among them); ARI and NMI are NaN for a slide
    without scored spots.

    Raises
    ------
    KeyError
        If ``key`` or ``truth_key`` is not in ``adata.obs``.
    """
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    for k, what in ((key, "domains"), (truth_key, "annotation")):
        if k not in adata.obs:
            raise KeyError(f"{what} column {k!r} not in adata.obs (columns: {list(adata.obs.columns)}).")
    libs = library_labels(adata, library_key)
    truth = adata.obs[truth_key]
    pred = adata.obs[key]
    ignored = {str(v).lower() for v in as_list(ignore) or []}
    valid = truth.notna().to_numpy() & pred.notna().to_numpy()
    valid &= ~truth.astype(str).str.lower().isin(ignored).to_numpy()
    truth_s, pred_s = truth.astype(str).to_numpy(), pred.astype(str).to_numpy()
    rows = {}
    for lib in dict.fromkeys(libs):
        m = valid & (libs == lib)
        n = int(m.sum())
        if n == 0:
            logger.warning(f"library {lib!r}: no spot has an annotation in obs[{truth_key!r}]; ARI/NMI are NaN.")
            rows[lib] = {"ari": np.nan, "nmi": np.nan, "n_spots": 0, "n_domains": 0, "n_labels": 0}
            continue
        rows[lib] = {
            "ari": float(adjusted_rand_score(truth_s[m], pred_s[m])),
            "nmi": float(normalized_mutual_info_score(truth_s[m], pred_s[m])),
            "n_spots": n,
            "n_domains": len(set(pred_s[m])),
            "n_labels": len(set(truth_s[m])),
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = library_key
    return table
