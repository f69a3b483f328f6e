"""``stexp.pl.domains``: spatial domains next to a reference annotation on the tissue."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import pandas as pd

from stexp._docs import doc_params
from stexp._layout import LIBRARY_KEY, as_list
from stexp.pl._utils import draw_tissue, finish, given_axes, new_axes, resolve_library, spot_collection, tissue_view

if TYPE_CHECKING:
    import numpy as np
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MISSING_COLOUR = "#d3d3d3"


def _palette(n: int) -> list:
    """``n`` distinct colours (tab10, then tab20, then a sampled hsv)."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["hsv"](i / n) for i in range(n)]


def _categories(values: pd.Series) -> list[str]:
    if isinstance(values.dtype, pd.CategoricalDtype):
        cats = [str(c) for c in values.cat.categories]
        present = set(values.dropna().astype(str))
        return [c for c in cats if c in present]
    return sorted(set(values.dropna().astype(str)))


def match_colours(domains: pd.Series, truth: pd.Series | None, truth_colours: dict[str, tuple]) -> dict[str, tuple]:
    """Colour each domain like the annotation category it overlaps most (one-to-one, Hungarian matching).

    Domains left without a partner get colours no annotation category uses.
    """
    from scipy.optimize import linear_sum_assignment

    dom_cats = _categories(domains)
    colours: dict[str, tuple] = {}
    if truth is not None and truth_colours:
        ok = domains.notna().to_numpy() & truth.astype(str).isin(list(truth_colours)).to_numpy()
        table = pd.crosstab(domains[ok].astype(str), truth[ok].astype(str))
        table = table.reindex(index=dom_cats, columns=list(truth_colours), fill_value=0)
        rows, cols = linear_sum_assignment(-table.to_numpy())
        for r, c in zip(rows, cols, strict=True):
            if table.iat[r, c] > 0:
                colours[dom_cats[r]] = truth_colours[table.columns[c]]
    spare = [c for c in _palette(len(truth_colours) + len(dom_cats)) if c not in set(colours.values())]
    for d in dom_cats:
        if d not in colours:
            colours[d] = spare.pop(0)
    return colours


@doc_params
def _draw_categorical(ax, view, values: pd.Series, colours: dict[str, tuple], title: str) -> None:
    from matplotlib.patches import Patch

    labels = values.astype(object).where(values.notna(), None).to_numpy()
    face = [colours.get(str(v), MISSING_COLOUR) if v is not None else MISSING_COLOUR for v in labels]
    draw_tissue(ax, view)
    ax.add_collection(spot_collection(view, colors=face))
    present = set(values.dropna().astype(str))
    handles = [Patch(facecolor=colours[c], label=c) for c in colours if c in present]
    extra = sorted(present - set(colours))
    handles += [Patch(facecolor=MISSING_COLOUR, label=c) for c in extra]
    if values.isna().any():
        handles.append(Patch(facecolor=MISSING_COLOUR, label="NA"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)


@doc_params
def domains(
    adata: AnnData,
    *,
    key: str = "stexp_domain",
    truth_key: str | None = "label",
    library_id: str | None = None,
    ignore: Sequence[str] = ("undetermined",),
    match_colors: bool = True,
    title_scores: bool = True,
    img: bool | str = True,
    spot_size: float | None = None,
    library_key: str = LIBRARY_KEY,
    ax: Axes | Sequence[Axes] | np.ndarray | None = None,
    return_fig: bool = False,
    save: str | Path | None = None,
) -> Figure | None:
    """Spatial domains next to the reference annotation, on the tissue of one library.

    Parameters
    ----------
    adata
        AnnData with ``obs[key]`` (from :func:`stexp.tl.domains`).
    key
        ``obs`` column of the domains.
    truth_key
        ``obs`` column of the reference annotation drawn beside them; ``None``: domains only.
    library_id
        The slide to draw; required when ``adata`` holds several.
    ignore
        Annotation values drawn in grey and left out of the scores and the colour matching.
    match_colors
        Colour each domain like the annotation category it overlaps most (over all spots), so
        agreement is visible at a glance.
    title_scores
        Put the adjusted Rand index and NMI of this library (:func:`stexp.tl.score_domains`) in the title.
    img
        ``True``: draw on the ``"hires"`` image (else ``"lowres"``); a string names the image;
        ``False``: no image.
    spot_size
        Spot diameter in full-resolution pixels, instead of the library's true spot diameter.
    {library_key}
    ax
        Axes to draw into, one per panel (2 with an annotation, else 1); default: a new figure.
    {figure_output}

    Raises
    ------
    KeyError
        If ``key``, ``truth_key`` or the library does not exist.
    ValueError
        If several libraries are present and ``library_id`` is ``None``.
    """
    for k, what in ((key, "domains"), (truth_key, "annotation")):
        if k is not None and k not in adata.obs:
            hint = " Run stexp.tl.domains first." if k == key else " Pass truth_key=None to draw the domains only."
            raise KeyError(f"{what} column {k!r} not in adata.obs (columns: {list(adata.obs.columns)}).{hint}")
    lib = resolve_library(adata, library_id, library_key)
    view = tissue_view(adata, lib, img=img, library_key=library_key, spot_size=spot_size)
    ignored = {str(v).lower() for v in as_list(ignore) or []}

    truth_colours: dict[str, tuple] = {}
    truth = None
    if truth_key is not None:
        truth = adata.obs[truth_key]
        kept = [c for c in _categories(truth) if c.lower() not in ignored]
        truth_colours = dict(zip(kept, _palette(len(kept)), strict=True))
    dom = adata.obs[key]
    if match_colors:
        matched = match_colours(dom, truth, truth_colours)
        dom_colours = {d: matched[d] for d in _categories(dom)}  # legend in the domains' order
    else:
        cats = _categories(dom)
        dom_colours = dict(zip(cats, _palette(len(cats)), strict=True))

    n_panels = 1 if truth is None else 2
    if ax is None:
        fig, grid = new_axes(1, n_panels, panel_size=(5.0, 4.0))
        axes = list(grid.ravel())
    else:
        axes = given_axes(ax, n_panels, "domains")
        fig = cast("Figure", axes[0].figure)

    title = f"domains: obs[{key!r}]"
    if truth is not None and truth_key is not None and title_scores:
        from stexp.tl._domains import score_domains

        sub = adata[view.mask]
        row = score_domains(sub, key=key, truth_key=truth_key, ignore=tuple(ignored), library_key=library_key).iloc[0]
        title += f"\nARI = {row['ari']:.3f}, NMI = {row['nmi']:.3f} ({int(row['n_spots'])} spots)"
    _draw_categorical(axes[0], view, dom[view.mask], dom_colours, title)
    if truth is not None:
        _draw_categorical(axes[1], view, truth[view.mask], truth_colours, f"annotation: obs[{truth_key!r}]")
    fig.suptitle(f"library {lib}" + (f" ({view.image_res} image)" if view.image_res else ""), fontsize=11)
    return finish(fig, save=save, return_fig=return_fig)
