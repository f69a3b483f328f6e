"""``stexp.pl.spatial_genes``: measured next to predicted expression, spots at their true size on the H&E."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import numpy as np

from stexp._docs import doc_params
from stexp._layout import LIBRARY_KEY, as_list, is_unmeasured
from stexp.pl._utils import draw_tissue, finish, given_axes, new_axes, resolve_library, spot_collection, tissue_view

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MEASURED_LABEL = "measured"
SCALES = ("panel", "shared")


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over the spots where both are finite, as :func:`stexp.tl.evaluate` computes it.

    The number comes from :func:`stexp._metrics.pearson_columns`, the per-gene Pearson of
    ``tl.evaluate``, so a panel title and the evaluate table agree; NaN when either is constant or
    fewer than two spots are finite. (``evaluate`` refuses partially predicted genes; the plot draws
    their missing spots grey and scores the rest.)
    """
    from stexp._metrics import pearson_columns

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan")
    r, _ = pearson_columns(a[ok, None], b[ok, None])
    return float(r[0])


def _limit(pooled: np.ndarray, value: str | float | None, default: float, name: str) -> float:
    """A colour limit: a percentile such as ``"p99"`` of the pooled values, a number, or ``default``."""
    if value is None:
        return default
    if isinstance(value, str):
        q = value[1:]
        if not (value.startswith("p") and q.replace(".", "", 1).isdigit() and 0 <= float(q) <= 100):
            raise ValueError(f"{name} must be a number, None or a percentile like 'p99', got {value!r}.")
        return float(np.percentile(pooled, float(q)))
    return float(value)


def colour_limits(values: list[np.ndarray], vmin: str | float | None, vmax: str | float | None) -> tuple[float, float]:
    """(vmin, vmax) over the pooled values of one or more panels (NaN ignored)."""
    pooled = np.concatenate([v[np.isfinite(v)] for v in values])
    lo = _limit(pooled, vmin, float(pooled.min()), "vmin")
    hi = _limit(pooled, vmax, float(pooled.max()), "vmax")
    if hi <= lo:
        hi = lo + 1e-6
    return lo, hi


def _layer_values(adata, layer: str, mask: np.ndarray, genes: Sequence[str]) -> np.ndarray:
    """Predicted values of ``genes`` at the spots of ``mask`` (a layer or an obsm gene DataFrame; NaN: not predicted)."""
    from stexp.tl._storage import prediction_columns

    return prediction_columns(adata, layer, genes, rows=np.flatnonzero(mask)).astype(np.float64)


def best_genes(adata, pred_key: str = "stexp_pred", n: int = 6) -> list[str]:
    """The ``n`` genes with the highest expected PCC (``adata.var[f"{pred_key}_expected_pcc"]``), best first."""
    key = f"{pred_key}_expected_pcc"
    if key not in adata.var:
        raise KeyError(
            f"adata.var has no {key!r}: genes='best' ranks genes by a calibrated model's expected PCC; fit with "
            "stexp.tl.fit(..., calibrate=True) and predict with stexp.tl.predict(adata, model)."
        )
    if int(n) != n or n < 1:
        raise ValueError(f"n_best must be a positive integer, got {n!r}.")
    expected = adata.var[key].to_numpy(dtype=np.float64)
    order = [i for i in np.argsort(-np.nan_to_num(expected, nan=-np.inf), kind="stable") if np.isfinite(expected[i])]
    return adata.var_names[order[: int(n)]].tolist()


def _checked_request(
    adata, genes, layers, *, n_best: int, interval_width: bool, scale: str, ncols: int | None
) -> tuple[list[str], list[str | None], tuple[str, tuple[str, str]] | None]:
    """The genes and layers to draw, and the interval-width panel (its label and bound keys) or ``None``.

    Checks the request against ``adata`` before anything is drawn: layers and bounds exist, genes are
    known (to ``var`` or to a panel-only prediction), ``scale`` and ``ncols`` are valid.
    """
    from stexp.tl._storage import has_prediction, read_prediction

    layers = [layers] if layers is None or isinstance(layers, str) else list(layers)
    if not layers:
        raise ValueError("layers is empty: name at least one layer (None for the measured target).")
    predicted = [layer for layer in layers if layer is not None]
    if isinstance(genes, str) and genes == "best":
        genes = best_genes(adata, predicted[0] if predicted else "stexp_pred", n_best)
    genes = as_list(genes) or []
    if not genes:
        raise ValueError("genes is empty: name at least one gene.")
    width = None
    if interval_width:
        if not predicted:
            raise ValueError("interval_width=True needs a predicted layer in layers=.")
        from stexp.tl._keys import PredictionKeys

        names = PredictionKeys(predicted[0])
        bounds = (names.lo, names.hi)
        if not all(has_prediction(adata, b) for b in bounds):
            raise KeyError(
                f"interval_width=True needs the predictions {list(bounds)}: predict with a calibrated model and "
                "coverage=, e.g. stexp.tl.predict(adata, model, coverage=0.9)."
            )
        width = (f"{predicted[0]} interval width", bounds)
    for layer in layers:
        if layer is not None and not has_prediction(adata, layer):
            raise KeyError(
                f"prediction {layer!r} not found in adata.layers ({list(adata.layers)}) or adata.obsm ({list(adata.obsm)})."
            )
    known = set(adata.var_names)
    for layer in layers:  # a panel-only prediction (obsm gene DataFrame) may hold genes var lacks
        if layer is not None and layer not in adata.layers:
            known |= set(read_prediction(adata, layer)[0])
    missing = [g for g in genes if g not in known]
    if missing:
        raise KeyError(f"gene(s) {missing[:10]} not in adata.var_names ({adata.n_vars} genes).")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}.")
    if ncols is not None and ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}.")
    return genes, layers, width


def _measured(adata, view, genes: list[str], layers: list[str | None], title_scores: bool) -> np.ndarray | None:
    """The measured target of ``genes`` at the drawn spots, or ``None`` when nothing needs it or it cannot be had.

    It is drawn when ``None`` is among the layers (an AnnData without measured expression then raises),
    else computed only for the titles' scores, and skipped when ``X`` holds no raw counts.
    """
    from stexp.pp._target import expression_target

    unmeasured = is_unmeasured(adata)
    if None in layers:
        if unmeasured:
            raise ValueError(
                "this AnnData has no measured expression (uns['stexp']['unmeasured'] is set); "
                "draw only predicted layers, e.g. layers=('stexp_pred',)."
            )
        return expression_target(adata[view.mask], genes).astype(np.float64)
    if title_scores and not unmeasured:
        try:  # scores only: skip them when X holds no raw counts
            return expression_target(adata[view.mask], genes).astype(np.float64)
        except ValueError:
            return None
    return None


def _panel_values(
    adata, view, genes: list[str], layers: list[str | None], lib: str, measured, width
) -> dict[str | None, np.ndarray]:
    """Spots x genes values of each panel: the measured target (``None``), each layer and the interval width.

    Raises
    ------
    ValueError
        If a gene has no prediction (all NaN) in a layer for this library.
    """
    values: dict[str | None, np.ndarray] = {}
    for layer in layers:
        if layer is None:
            assert measured is not None  # computed whenever None is among the layers
            values[None] = measured
            continue
        v = _layer_values(adata, layer, view.mask, genes)
        empty = ~np.isfinite(v).any(axis=0)
        if empty.any():
            raise ValueError(
                f"gene(s) {[genes[int(i)] for i in np.flatnonzero(empty)]} have no prediction in "
                f"adata.layers[{layer!r}] for library {lib!r} (all NaN: outside the model's gene panel?)."
            )
        values[layer] = v
    if width is not None:
        label, bounds = width
        lo_v, hi_v = (_layer_values(adata, b, view.mask, genes) for b in bounds)
        values[label] = hi_v - lo_v
    return values


def _panel_axes(ax, n_genes: int, n_layers: int, per_row: int) -> tuple[Figure, list]:
    """The figure and one axes per panel (gene-major): a new grid of ``per_row`` genes a row, or the given ``ax``."""
    n_panels = n_genes * n_layers
    if ax is not None:
        axes = given_axes(ax, n_panels, "spatial_genes")
        return cast("Figure", axes[0].figure), axes
    n_rows = int(np.ceil(n_genes / per_row))
    fig, grid = new_axes(n_rows, per_row * n_layers)
    axes = list(grid.ravel())
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    return fig, axes[:n_panels]


def _draw_gene(
    fig, gene_axes, gene: str, g: int, panels, expression_layers, values, measured,
    *, view, colour_map, vmin, vmax, scale: str, title_scores: bool,
) -> None:  # fmt: skip
    """Draw the panels of one gene (column ``g`` of the values), with titles, scores and colour bars.

    The interval-width panel always has its own colour scale; the expression panels share one with
    ``scale="shared"`` (one colour bar), else each has its own.
    """
    shared = (
        colour_limits([values[layer][:, g] for layer in expression_layers], vmin, vmax) if scale == "shared" else None
    )
    coll = None
    for a, layer in zip(gene_axes, panels, strict=True):
        is_width = layer not in expression_layers
        lo, hi = (shared if not is_width else None) or colour_limits([values[layer][:, g]], vmin, vmax)
        draw_tissue(a, view)
        panel = spot_collection(view, values=values[layer][:, g], cmap=colour_map, vmin=lo, vmax=hi)
        a.add_collection(panel)
        label = MEASURED_LABEL if layer is None else layer
        title = f"{gene}: {label}"
        if layer is not None and not is_width and title_scores and measured is not None:
            title += f"\nPearson r = {pearson(measured[:, g], values[layer][:, g]):.3f}"
        a.set_title(title, fontsize=10)
        if is_width:
            fig.colorbar(panel, ax=a, shrink=0.8, label="interval width")
            continue
        coll = panel
        if shared is None:
            fig.colorbar(coll, ax=a, shrink=0.8, label="log1p(cp10k)")
    if shared is not None and coll is not None:
        expression_axes = [a for a, layer in zip(gene_axes, panels, strict=True) if layer in expression_layers]
        fig.colorbar(coll, ax=expression_axes, shrink=0.8, label="log1p(cp10k)")


@doc_params
def spatial_genes(
    adata: AnnData,
    genes: str | Sequence[str],
    *,
    library_id: str | None = None,
    layers: Sequence[str | None] | str | None = (None, "stexp_pred"),
    img: bool | str = True,
    ncols: int | None = None,
    cmap: str = "magma",
    vmax: str | float | None = "p99",
    vmin: str | float | None = None,
    scale: Literal["panel", "shared"] = "panel",
    title_scores: bool = True,
    ax: Axes | Sequence[Axes] | np.ndarray | None = None,
    return_fig: bool = False,
    save: str | Path | None = None,
    library_key: str = LIBRARY_KEY,
    spot_size: float | None = None,
    n_best: int = 6,
    interval_width: bool = False,
) -> Figure | None:
    """Measured next to predicted expression of genes, spots drawn at their true size on the H&E.

    One row per gene and one panel per layer. The measured panel (layer ``None``) shows the
    prediction target computed from raw counts, ``ln(1 + 1e4 * counts / total)``
    (:func:`stexp.pp.normalize_target`), so it is on the scale of the predictions. Each spot is a
    circle of the spot's physical diameter (``spot_diameter_fullres x tissue_<res>_scalef`` pixels
    of the displayed image).

    By default (``scale="panel"``) every panel has its own colour scale and colour bar, clipped at
    percentiles of that panel's values (``vmax="p99"``), like ``squidpy.pl.spatial_scatter(...,
    vmax="p99")``: a prediction usually spans a narrower range than the measurement (it regresses
    to the mean), and on the measurement's scale it would look flat although its pattern may be
    right. ``scale="shared"`` puts the panels of one gene on one scale (limits over all of them
    pooled) with one colour bar, to compare magnitudes.

    Parameters
    ----------
    adata
        AnnData in stexp's layout (also one converted by :func:`stexp.io.from_spatialdata`).
    genes
        Gene name(s) in ``adata.var_names``, or ``"best"``: the ``n_best`` genes the model predicts best,
        by the expected PCC of a calibrated model (``adata.var[f"{layer}_expected_pcc"]`` of the first
        predicted layer, written by :func:`stexp.tl.predict`).
    library_id
        The slide to draw; required when ``adata`` holds several.
    layers
        Predictions drawn side by side (keys of :func:`stexp.tl.predict`: a layer or an ``obsm`` gene
        DataFrame); ``None`` is the measured target.
    img
        ``True``: draw on the ``"hires"`` image (else ``"lowres"``); a string names the image;
        ``False``: no image.
    ncols
        Genes per row of the figure (default 1: one row per gene).
    cmap
        Colour map; spots with NaN values are grey.
    vmax
        Top of the colour scale: a percentile such as ``"p99"`` (of the panel's values, or of all the
        gene's panels pooled with ``scale="shared"``), a number, or ``None`` for the maximum.
    vmin
        Bottom of the colour scale, as ``vmax`` (e.g. ``"p1"``); ``None``: the minimum.
    scale
        ``"panel"``: each panel has its own colour scale and colour bar; ``"shared"``: the panels of
        one gene share one scale and one colour bar.
    title_scores
        Put the Pearson correlation of each predicted layer with the measured target, over the
        spots of this library, in the panel title. It is the per-gene r of
        :func:`stexp.tl.evaluate` for this gene and library.
    ax
        Axes to draw into, one per panel (``len(genes) * len(layers)``); default: a new figure.
    {library_key}
    spot_size
        Spot diameter in full-resolution pixels, instead of the library's true spot diameter.
    n_best
        Number of genes drawn with ``genes="best"``.
    interval_width
        Add a panel with the width of the prediction interval (``hi - lo`` of the layers ``<layer>_lo`` and
        ``<layer>_hi`` of the first predicted layer, from ``stexp.tl.predict(..., coverage=)``): wide where the
        model is less sure. It always has its own colour scale.

    {figure_output}

    Raises
    ------
    KeyError
        If a gene, a layer or the library does not exist.
    ValueError
        If ``scale`` is not ``"panel"`` or ``"shared"``, if a colour limit is not a number or a
        percentile, if several libraries are present and ``library_id`` is ``None``, if a gene has no
        prediction (all NaN) in a layer for this library, or if measured expression is asked for
        on data without it.
    """
    from matplotlib import colormaps

    genes, layers, width = _checked_request(
        adata, genes, layers, n_best=n_best, interval_width=interval_width, scale=scale, ncols=ncols
    )
    lib = resolve_library(adata, library_id, library_key)
    view = tissue_view(adata, lib, img=img, library_key=library_key, spot_size=spot_size)
    measured = _measured(adata, view, genes, layers, title_scores)
    values = _panel_values(adata, view, genes, layers, lib, measured, width)
    panels = [*layers, width[0]] if width is not None else list(layers)

    fig, axes = _panel_axes(ax, len(genes), len(panels), min(ncols or 1, len(genes)))
    colour_map = colormaps[cmap].with_extremes(bad="lightgrey")
    for g, gene in enumerate(genes):
        _draw_gene(
            fig, axes[g * len(panels) : (g + 1) * len(panels)], gene, g, panels, layers, values, measured,
            view=view, colour_map=colour_map, vmin=vmin, vmax=vmax, scale=scale, title_scores=title_scores,
        )  # fmt: skip
    fig.suptitle(f"library {lib}" + (f" ({view.image_res} image)" if view.image_res else ""), fontsize=11)
    return finish(fig, save=save, return_fig=return_fig)
