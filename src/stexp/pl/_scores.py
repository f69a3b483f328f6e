"""``stexp.pl.scores``: distributions of per-gene scores per model or per slide."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import pandas as pd

from stexp._docs import doc_params
from stexp._layout import UNS_KEY, as_list
from stexp.pl._utils import finish, new_axes

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DEFAULT_MODEL = "prediction"


def _evaluate_entry(entry: Mapping, metric: str) -> pd.DataFrame:
    """Long table from one :func:`stexp.tl.evaluate` record: per-gene Pearson, or a per-slide metric."""
    per_slide = entry.get("per_slide")
    if metric != "pcc" and isinstance(per_slide, pd.DataFrame) and metric in per_slide.columns:
        df = per_slide.reset_index()
        return df.rename(columns={df.columns[0]: "library_id"})
    wide = entry["pcc"]  # genes x slides
    wide = wide.rename_axis(index="gene", columns="library_id")
    return wide.reset_index().melt(id_vars="gene", var_name="library_id", value_name="pcc")


def _is_evaluate_entry(obj) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("pcc"), pd.DataFrame)


def _as_frame(table, name: str | None, metric: str) -> pd.DataFrame:
    """One score table (long DataFrame, dict of equal-length columns, or an evaluate record) with a model column."""
    if _is_evaluate_entry(table):
        df = _evaluate_entry(table, metric)
    elif isinstance(table, pd.DataFrame):
        df = table.copy()
    else:
        df = pd.DataFrame(dict(table))
    if "model" not in df.columns:
        df["model"] = name or DEFAULT_MODEL
    return df


def _is_table(obj: Mapping) -> bool:
    """Whether a mapping is one table (columns of arrays) rather than a mapping of tables."""
    return bool(obj) and all(np.ndim(v) == 1 and not isinstance(v, Mapping) for v in obj.values())


def score_table(data: Any, *, key: str | Sequence[str] | None = None, metric: str = "pcc") -> pd.DataFrame:
    """Collect scores into one long DataFrame (a ``model`` column added when missing).

    ``data`` may be a DataFrame with one row per (gene, slide[, model]); a dict of such columns; an
    AnnData after :func:`stexp.tl.evaluate`, or the mapping it stores in
    ``adata.uns["stexp"]["evaluate"]`` (prediction key -> record with a genes x slides ``"pcc"``
    table and the ``"per_slide"`` table), or one such record; or a :func:`stexp.tl.cross_validate`
    result (its per-fold table: per-slide metrics such as ``"pcc_acg"``; its per-gene Pearson r is in
    the AnnData, under the result's layer names). ``key`` selects prediction keys of a mapping
    or AnnData, which become the ``model`` column. A ``metric`` other than ``"pcc"`` is read from the
    per-slide tables of evaluate records (one score per slide).
    """
    import anndata as ad

    keys = as_list(key)
    if isinstance(data, ad.AnnData):
        stored = data.uns.get(UNS_KEY, {}).get("evaluate")
        if not stored:
            raise KeyError("adata.uns['stexp']['evaluate'] is empty: run stexp.tl.evaluate first.")
        data = stored
    elif not isinstance(data, (pd.DataFrame, Mapping)):
        per_gene, per_fold = getattr(data, "per_gene", None), getattr(data, "per_fold", None)
        if isinstance(per_gene, (pd.DataFrame, Mapping)):
            return _as_frame(per_gene, None, metric)
        if isinstance(per_fold, pd.DataFrame):
            if metric not in per_fold.columns:
                layers = list(getattr(data, "layers", {}).values())
                raise KeyError(
                    f"a cross-validation result holds per-slide scores ({[c for c in per_fold.columns if 'pcc' in c]}, "
                    f"mse, mae), not {metric!r}: pass metric='pcc_acg', or the AnnData for per-gene Pearson r: "
                    f"stexp.pl.scores(adata, key={layers})."
                )
            return _as_frame(per_fold, None, metric)
        raise TypeError(
            f"cannot read scores from a {type(data).__name__}: pass a DataFrame (gene, library_id, pcc, model), "
            "an AnnData after stexp.tl.evaluate, or a stexp.tl.cross_validate result."
        )
    if isinstance(data, pd.DataFrame) or _is_evaluate_entry(data) or _is_table(data):
        return _as_frame(data, None, metric)
    available = list(data)
    if keys is not None:
        missing = [k for k in keys if k not in data]
        if missing:
            raise KeyError(f"prediction key(s) {missing} have no scores; available: {available}.")
        available = keys
    frames = [_as_frame(data[k], k, metric) for k in available]
    if not frames:
        raise ValueError("no scores to plot.")
    return pd.concat(frames, ignore_index=True)


@doc_params
def scores(
    data: AnnData | pd.DataFrame | Mapping[str, Any] | Any,
    *,
    by: str = "model",
    metric: str = "pcc",
    key: str | Sequence[str] | None = None,
    kind: Literal["box", "violin"] = "box",
    ax: Axes | None = None,
    return_fig: bool = False,
    save: str | Path | None = None,
) -> Figure | None:
    """Distribution of per-gene scores (Pearson r by default) per model or per slide.

    Each box (or violin) pools the per-gene scores of a group; NaN scores (genes constant on a
    slide) are left out. The white diamond marks the mean, i.e. the PCC over all genes (ACG)
    when the metric is the per-gene Pearson r. With ``by="library_id"`` and several models, the
    models are drawn side by side within each slide.

    Parameters
    ----------
    data
        Per-gene scores: a DataFrame with columns ``gene``, ``library_id``, ``model`` and the
        metric; the mapping :func:`stexp.tl.evaluate` stores in ``adata.uns["stexp"]["evaluate"]``
        (or the AnnData itself); or a :func:`stexp.tl.cross_validate` result, whose per-fold
        table holds per-slide scores (``metric="pcc_acg"``, ``"mse"``, ...).
    by
        Column that defines the groups: ``"model"`` or ``"library_id"`` (any column works).
    metric
        Column holding the score. From :func:`stexp.tl.evaluate` records, ``"pcc"`` is the per-gene
        Pearson r; a per-slide column such as ``"pcc_acg"`` or ``"mse"`` gives one score per slide.
    key
        Prediction key(s) to take from a mapping or AnnData (default: all).
    kind
        ``"box"`` or ``"violin"``.
    ax
        Axes to draw into; default: a new figure.
    {figure_output}

    Raises
    ------
    KeyError
        If ``by`` or ``metric`` is not a column of the scores.
    ValueError
        If ``kind`` is unknown or no score is finite.
    """
    if kind not in ("box", "violin"):
        raise ValueError(f"kind must be 'box' or 'violin', got {kind!r}.")
    df = score_table(data, key=key, metric=metric)
    for col, what in ((by, "by"), (metric, "metric")):
        if col not in df.columns:
            raise KeyError(f"{what}={col!r} is not a column of the scores (columns: {list(df.columns)}).")
    df = df[np.isfinite(pd.to_numeric(df[metric], errors="coerce"))]
    if df.empty:
        raise ValueError(f"no finite {metric!r} score to plot.")
    hue = "model" if by != "model" and "model" in df.columns and df["model"].nunique() > 1 else None

    groups = list(dict.fromkeys(df[by].astype(str)))
    hues = list(dict.fromkeys(df[hue].astype(str))) if hue else [None]
    if ax is None:
        fig, grid = new_axes(1, 1, panel_size=(max(4.0, 0.9 * len(groups) * len(hues) + 1.5), 4.0))
        ax = grid[0, 0]
    else:
        fig = cast("Figure", ax.figure)

    from matplotlib import colormaps
    from matplotlib.patches import Patch

    width = 0.8 / len(hues)
    colours = [colormaps["tab10"](i % 10) for i in range(len(hues))]
    handles = []
    for h, hue_value in enumerate(hues):
        sub = df if hue is None else df[df[hue].astype(str) == hue_value]
        data_h, pos = [], []
        for g, group in enumerate(groups):
            vals = sub.loc[sub[by].astype(str) == group, metric].to_numpy(dtype=float)
            if len(vals):
                data_h.append(vals)
                pos.append(g + (h - (len(hues) - 1) / 2) * width)
        if not data_h:
            continue
        if kind == "box":
            parts = ax.boxplot(
                data_h,
                positions=pos,
                widths=0.85 * width,
                patch_artist=True,
                showmeans=True,
                meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black", "gid": "mean"},
                medianprops={"color": "black", "gid": "median"},
                flierprops={"markersize": 3},
                manage_ticks=False,
            )
            for box in parts["boxes"]:
                box.set_facecolor(colours[h])
                box.set_alpha(0.8)
        else:
            parts = ax.violinplot(data_h, positions=pos, widths=0.85 * width, showmedians=True)
            for body in cast("list", parts["bodies"]):
                body.set_facecolor(colours[h])
                body.set_alpha(0.7)
            ax.scatter(pos, [v.mean() for v in data_h], marker="D", color="white", edgecolors="black", zorder=3)
        if hue is not None:
            handles.append(Patch(facecolor=colours[h], label=hue_value))
    # scores per box (per model within a group when models are side by side)
    keys = [df[by].astype(str)] + ([df[hue].astype(str)] if hue else [])
    counts = df.groupby(keys)[metric].size()
    counts = counts.groupby(level=0).max() if hue else counts
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g}\n(n={counts[g]})" for g in groups])
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(by)
    unit = "gene" if "gene" in df.columns else "row"
    unit = "slide" if unit == "row" and "library_id" in df.columns else unit
    ax.set_ylabel(f"{metric} per {unit}")
    ax.set_title(f"{metric} per {unit} by {by} (diamond: mean)", fontsize=10)
    if handles:
        ax.legend(handles=handles, title=hue, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return finish(fig, save=save, return_fig=return_fig)
