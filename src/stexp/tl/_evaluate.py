"""``stexp.tl.evaluate``: per-slide, per-gene scores of predicted against measured expression."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from stexp._docs import doc_params
from stexp._layout import LIBRARY_KEY, as_list, is_unmeasured, library_labels, record
from stexp._metrics import nanmean as _nanmean
from stexp._metrics import pearson_columns
from stexp._settings import logger

from ._keys import PredictionKeys

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData


#: Columns of the per-slide table, in order.
SCORE_COLUMNS = ("pcc_acg", "pcc_heg", "pcc_hvg", "mse", "mae", "n_spots", "n_genes", "n_constant")
#: Columns added when the prediction has intervals (``<pred_key>_lo`` / ``_hi``) and an expected PCC.
UNCERTAINTY_COLUMNS = ("coverage", "interval_width", "unc_spot_spearman", "expected_pcc_spearman")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation over the entries where both are finite (NaN if fewer than 3 or constant)."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    r, _ = pearson_columns(rankdata(a[ok])[:, None], rankdata(b[ok])[:, None])
    return float(r[0])


def interval_scores(truth: np.ndarray, pred: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> dict[str, float]:
    """Coverage, mean width and the spot-level Spearman of width against error, on one slide.

    ``coverage``: share of measured values with ``lo <= truth <= hi``; ``interval_width``: mean ``hi - lo``
    (target scale); ``unc_spot_spearman``: Spearman, across spots, between a spot's mean interval width and its
    mean absolute error (over genes).
    """
    truth, pred = np.asarray(truth, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    width = hi - lo
    return {
        "coverage": float(np.mean((truth >= lo) & (truth <= hi))),
        "interval_width": float(np.mean(width)),
        "unc_spot_spearman": spearman(width.mean(axis=1), np.abs(pred - truth).mean(axis=1)),
    }


def _prediction_layer(adata, pred_key: str):
    """``take(rows, var_cols)``: the prediction at those spots and ``var`` columns (NaN where not predicted).

    Reads through :mod:`stexp.tl._storage` (a layer or an ``obsm`` gene DataFrame); nothing n_obs x n_vars
    is allocated.
    """
    from ._storage import prediction_columns, read_prediction

    genes, _ = read_prediction(adata, pred_key)  # raises KeyError naming the key; checks numeric and shape
    del _
    var = adata.var_names

    def take(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        values = prediction_columns(adata, pred_key, var[np.asarray(cols)], rows=np.asarray(rows))
        if np.isinf(values).any():
            raise ValueError(f"prediction {pred_key!r} contains {int(np.isinf(values).sum())} infinite values.")
        return values

    take.genes = genes  # type: ignore[attr-defined]
    return take


def _interval_layers(adata, pred_key: str):
    """The ``<pred_key>_lo`` and ``_hi`` bounds written by ``stexp.tl.predict(..., coverage=)``, if both exist."""
    from ._storage import has_prediction

    names = PredictionKeys(pred_key)
    keys = (names.lo, names.hi)
    if not all(has_prediction(adata, k) for k in keys):
        return None
    return _prediction_layer(adata, keys[0]), _prediction_layer(adata, keys[1])


@doc_params
def evaluate(
    adata: AnnData,
    *,
    pred_key: str = "stexp_pred",
    genes: str | Sequence[str] | None = None,
    library_key: str = LIBRARY_KEY,
    top_n: int = 50,
    layer: str | None = None,
) -> pd.DataFrame:
    """Score predicted against measured expression, one row per slide.

    On each slide, the Pearson correlation of every panel gene is computed across the spots of
    that slide (never pooled over slides) between the prediction and the measured target (log1p
    of counts per 10k, :func:`stexp.pp._target.expression_target`). Genes constant in the truth or
    in the prediction on a slide have no correlation; they are skipped and counted in
    ``n_constant``. MSE and MAE are averaged over all spots and panel genes of the slide.

    Parameters
    ----------
    adata
        AnnData with raw counts (``X`` or ``layer``) and the prediction ``pred_key`` (``adata.layers[pred_key]``
        or the gene DataFrame ``adata.obsm[pred_key]``, as :func:`stexp.tl.predict` writes it).
    pred_key
        The prediction layer (from :func:`stexp.tl.predict` or :func:`stexp.tl.cross_validate`).
    genes
        Genes to score. Default: the panel, i.e. the genes with predictions (not NaN) on each slide.
        Given genes must be predicted on every slide.
    {library_key}
    top_n
        Number of highest-expressed (HEG, by mean measured target on the slide) and most variable
        (HVG, by variance of the measured target on the slide) panel genes to average over.
    {layer}

    Returns
    -------
    A DataFrame indexed by slide with columns ``pcc_acg`` (mean Pearson over all panel genes),
    ``pcc_heg``, ``pcc_hvg``, ``mse``, ``mae``, ``n_spots``, ``n_genes``, ``n_constant``.
    Also writes ``adata.uns["stexp"]["evaluate"][pred_key]`` (``"pcc"``: genes x slides DataFrame
    of per-gene Pearson; ``"per_slide"``: the returned table; the parameters) and
    ``adata.var[f"{pred_key}_pcc"]`` (per-gene Pearson averaged over slides; NaN outside the panel).

    With intervals from ``stexp.tl.predict(..., coverage=)`` (layers ``<pred_key>_lo``, ``_hi``), the
    table also has ``coverage`` (share of measured values inside the interval), ``interval_width`` (mean
    width, target scale) and ``unc_spot_spearman`` (Spearman across the slide's spots between a spot's
    mean interval width and its mean absolute error). With a calibrated model's
    ``adata.var[f"{pred_key}_expected_pcc"]``, ``expected_pcc_spearman`` is the Spearman across genes
    between expected and realised PCC on the slide; the record's ``"expected_pcc_spearman"`` is the same
    against the PCC averaged over slides.

    Raises
    ------
    KeyError
        If the prediction layer, the library key or a gene is missing.
    ValueError
        If the AnnData holds no measured expression (``uns["stexp"]["unmeasured"]``), the prediction
        has another shape or infinite values, a slide has fewer than two spots, given genes are not
        predicted (NaN), or a gene is predicted on only some spots of a slide.
    """
    return score_prediction(adata, pred_key=pred_key, genes=genes, library_key=library_key, top_n=top_n, layer=layer)


def _candidate_genes(adata, genes: list[str] | None, pred) -> np.ndarray:
    """``var`` positions of the genes to score: the given ones (checked), else the predicted genes of ``var``."""
    if genes is None:  # the predicted genes of var (all of var for a layer)
        cand = adata.var_names.get_indexer(pred.genes)
        return np.sort(cand[cand >= 0])
    if len(genes) == 0:
        raise ValueError("genes= is empty.")
    missing = [g for g in genes if g not in adata.var_names]
    if missing:
        raise KeyError(f"{len(missing)} of {len(genes)} genes are not in adata.var_names, e.g. {missing[:5]}.")
    return adata.var_names.get_indexer(genes)


def _slide_panels(
    adata, pred, labels: np.ndarray, cand: np.ndarray, pred_key: str, *, given_genes: bool
) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The slides to score, each slide's spot rows and its panel: the candidate genes predicted on every spot.

    A slide without any predicted gene is left out with a warning.

    Raises
    ------
    ValueError
        If a slide has fewer than two spots, a gene is predicted on only some spots of a slide, a given
        gene is not predicted on a slide, or nothing is predicted anywhere.
    """
    slides = list(dict.fromkeys(labels.tolist()))
    rows: dict[str, np.ndarray] = {}
    panels: dict[str, np.ndarray] = {}
    for lib in slides:
        idx = np.flatnonzero(labels == lib)
        if idx.size < 2:
            raise ValueError(
                f"slide {lib!r} has {idx.size} spot: a per-gene Pearson across spots needs at least two; "
                "drop the slide or merge it."
            )
        finite = np.isfinite(pred(idx, cand))
        n_pred = finite.sum(axis=0)
        partial = (n_pred > 0) & (n_pred < idx.size)
        if partial.any():
            bad = adata.var_names[cand[partial]][:5].tolist()
            raise ValueError(
                f"slide {lib!r}: {int(partial.sum())} genes are predicted on only some of its {idx.size} spots "
                f"(e.g. {bad}); predict the whole slide."
            )
        if given_genes and (n_pred == 0).any():
            bad = adata.var_names[cand[n_pred == 0]].tolist()
            raise ValueError(
                f"slide {lib!r}: {len(bad)} of the given genes have no prediction (not in or NaN in "
                f"prediction {pred_key!r}), e.g. {bad[:5]}; they are not in the model's panel."
            )
        rows[lib] = idx
        panels[lib] = cand[n_pred == idx.size]
    empty = [lib for lib in slides if panels[lib].size == 0]
    if len(empty) == len(slides):
        raise ValueError(f"prediction {pred_key!r} is NaN everywhere: no gene of var was predicted.")
    for lib in empty:
        logger.warning(f"slide {lib!r} has no predicted gene in prediction {pred_key!r}; it is not scored.")
        slides.remove(lib)
    return slides, rows, panels


def _truth(adata, genes: list[str], target, layer: str | None) -> np.ndarray:
    """The measured target of ``genes`` (``n_obs x len(genes)``): from the given ``target``, else from the counts."""
    from stexp.pp._target import expression_target

    if target is None:
        return expression_target(adata, genes, layer=layer)
    column = {g: j for j, g in enumerate(target[0])}
    missing = [g for g in genes if g not in column]
    if missing:
        raise KeyError(f"the given target lacks {len(missing)} predicted genes, e.g. {missing[:5]}.")
    return np.asarray(target[1])[:, [column[g] for g in genes]]


def _score_slides(
    adata, pred, slides, rows, panels, union: np.ndarray, truth_all: np.ndarray,
    *, top_n: int, library_key: str, bounds, expected: np.ndarray | None,
) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """Per-gene Pearson (genes of ``union`` x slides) and the per-slide table :func:`evaluate` returns.

    ``truth_all`` has one column per gene of ``union``. With interval ``bounds`` and ``expected`` PCCs,
    the table gets the interval and expected-PCC columns.
    """
    col_of = {g: j for j, g in enumerate(union)}
    pcc = pd.DataFrame(np.nan, index=adata.var_names[union], columns=slides, dtype=np.float64)
    table = []
    for lib in slides:
        idx, panel = rows[lib], panels[lib]
        truth = truth_all[np.ix_(idx, np.asarray([col_of[g] for g in panel], dtype=np.int64))].astype(np.float64)
        p = pred(idx, panel).astype(np.float64)
        r, constant = pearson_columns(truth, p)
        pcc.loc[adata.var_names[panel], lib] = r
        k = min(top_n, panel.size)
        heg = np.argsort(-truth.mean(axis=0), kind="stable")[:k]
        hvg = np.argsort(-truth.var(axis=0), kind="stable")[:k]
        err = p - truth
        table.append(
            {
                "pcc_acg": _nanmean(r),
                "pcc_heg": _nanmean(r[heg]),
                "pcc_hvg": _nanmean(r[hvg]),
                "mse": float(np.mean(err**2)),
                "mae": float(np.mean(np.abs(err))),
                "n_spots": int(idx.size),
                "n_genes": int(panel.size),
                "n_constant": int(constant.sum()),
            }
        )
        if bounds is not None:
            lo, hi = (b(idx, panel) for b in bounds)
            table[-1].update(interval_scores(truth, p, lo, hi))
        if expected is not None:
            table[-1]["expected_pcc_spearman"] = spearman(expected[panel], r)
    columns = list(SCORE_COLUMNS)
    if bounds is not None:
        columns += ["coverage", "interval_width", "unc_spot_spearman"]
    if expected is not None:
        columns += ["expected_pcc_spearman"]
    return pcc, pd.DataFrame(table, index=pd.Index(slides, name=library_key), columns=columns)


def _mean_over_slides(pcc: pd.DataFrame, union: np.ndarray, n_vars: int) -> np.ndarray:
    """Per-gene Pearson averaged over the slides that scored it, over all ``var`` (NaN outside the panel)."""
    mean_pcc = np.full(n_vars, np.nan)
    with np.errstate(invalid="ignore"):
        values = pcc.to_numpy()
        counts = (~np.isnan(values)).sum(axis=1)
        mean_pcc[union] = np.where(counts > 0, np.nansum(values, axis=1) / np.maximum(counts, 1), np.nan)
    return mean_pcc


def score_prediction(
    adata: AnnData,
    *,
    pred_key: str,
    genes: str | Sequence[str] | None = None,
    library_key: str = LIBRARY_KEY,
    top_n: int = 50,
    layer: str | None = None,
    target: tuple[Sequence[str], np.ndarray] | None = None,
) -> pd.DataFrame:
    """:func:`evaluate`, optionally with the measured target already computed.

    ``target`` is ``(genes, matrix)`` (``n_obs x len(genes)``), e.g. from :func:`stexp.tl.cross_validate`,
    which has it for every fold's panel; without it the target is computed from the counts.
    """
    if is_unmeasured(adata):
        raise ValueError(
            "this AnnData has no measured expression (uns['stexp']['unmeasured'] is set): "
            "there is nothing to evaluate the prediction against."
        )
    if int(top_n) != top_n or top_n < 1:
        raise ValueError(f"top_n must be a positive integer, got {top_n!r}.")
    top_n = int(top_n)
    pred = _prediction_layer(adata, pred_key)
    if library_key not in adata.obs and len(adata.uns.get("spatial", {})) != 1:
        raise KeyError(f"adata.obs has no column {library_key!r} naming the slide of each spot.")
    labels = library_labels(adata, library_key)
    genes = as_list(genes)
    cand = _candidate_genes(adata, genes, pred)
    slides, rows, panels = _slide_panels(adata, pred, labels, cand, pred_key, given_genes=genes is not None)

    union = np.unique(np.concatenate([panels[lib] for lib in slides]))
    truth_all = _truth(adata, adata.var_names[union].tolist(), target, layer)
    bounds = _interval_layers(adata, pred_key)
    expected_key = PredictionKeys(pred_key).expected_pcc
    expected = adata.var[expected_key].to_numpy(dtype=np.float64) if expected_key in adata.var else None
    pcc, result = _score_slides(
        adata, pred, slides, rows, panels, union, truth_all, top_n=top_n, library_key=library_key,
        bounds=bounds, expected=expected,
    )  # fmt: skip

    var_key = PredictionKeys(pred_key).pcc
    mean_pcc = _mean_over_slides(pcc, union, adata.n_vars)
    adata.var[var_key] = mean_pcc
    record(
        adata,
        ("evaluate", pred_key),
        {
            "pcc": pcc,
            "per_slide": result.copy(),
            "genes": None if genes is None else list(genes),
            "library_key": library_key,
            "top_n": top_n,
            "layer": layer,
            "target": "log1p of counts per 10,000",
            # Spearman across genes of the expected PCC against the realised PCC averaged over slides
            "expected_pcc_spearman": None if expected is None else spearman(expected, mean_pcc),
        },
    )
    n_const = int(result["n_constant"].sum())
    logger.info(
        f"scored {len(slides)} slide(s), {union.size} genes: mean PCC(ACG) {result['pcc_acg'].mean():.3f}"
        + (f"; {n_const} gene-slide pairs skipped as constant" if n_const else "")
    )
    logger.info(f"added adata.var[{var_key!r}], adata.uns['stexp']['evaluate'][{pred_key!r}]")
    return result
