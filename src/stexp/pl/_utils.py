"""Helpers shared by the plots: one library, its H&E image, spots drawn at their true size."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stexp._layout import (
    LIBRARY_KEY,
    library_ids,
    library_mask,
    scalefactors,
    spatial_entry,
    spot_coords,
    spot_diameter_um,
)
from stexp._layout import um_per_px as _um_per_px
from stexp._settings import logger

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure


def resolve_library(adata: AnnData, library_id: str | None, library_key: str = LIBRARY_KEY) -> str:
    """The one library to draw.

    Raises
    ------
    ValueError
        If ``library_id`` is ``None`` and the AnnData holds several libraries (the message lists them).
    KeyError
        If ``library_id`` is not one of the libraries.
    """
    libs = library_ids(adata, library_key)
    if library_id is None:
        if len(libs) > 1:
            raise ValueError(
                f"adata holds {len(libs)} libraries in obs[{library_key!r}] ({libs[:10]}); "
                "pass library_id= naming the one to draw."
            )
        return libs[0]
    if str(library_id) not in libs:
        raise KeyError(f"library {library_id!r} not found in obs[{library_key!r}]; this AnnData holds {libs[:20]}.")
    return str(library_id)


@dataclass
class TissueView:
    """Where and how one library is drawn: the background image and spots in its pixel frame."""

    library_id: str
    image: np.ndarray | None  #: (H, W, 3) image, or None when drawing without a background
    image_res: str | None  #: "hires", "lowres", ... or None
    scalef: float  #: full-resolution px -> displayed px
    xy: np.ndarray  #: spot centres in displayed px, (n_spots, 2)
    radius: float  #: spot radius in displayed px
    mask: np.ndarray  #: the library's spots among adata's obs


def spot_diameter_fullres(adata: AnnData, library_id: str) -> float:
    """Spot diameter of a library in full-resolution pixels (scale factors, else µm / µm-per-px)."""
    sf = scalefactors(adata, library_id)
    if "spot_diameter_fullres" in sf:
        return float(sf["spot_diameter_fullres"])
    return spot_diameter_um(adata, library_id) / _um_per_px(adata, library_id)


def _is_blank(image) -> bool:
    """Whether an image is a single flat colour (e.g. the empty hires image of some test data)."""
    sample = np.asarray(image)[::16, ::16]
    return sample.size == 0 or bool(np.all(sample == sample[0, 0]))


def tissue_view(
    adata: AnnData,
    library_id: str,
    *,
    img: bool | str = True,
    library_key: str = LIBRARY_KEY,
    spot_size: float | None = None,
) -> TissueView:
    """Pick the image of a library and put its spots into the image's pixel frame.

    Parameters
    ----------
    img
        ``True``: the in-memory ``"hires"`` image, else ``"lowres"``, else any other (blank images
        skipped); a string names the resolution; ``False``: no image (spots in full-resolution pixels).
    spot_size
        Spot diameter in full-resolution pixels (default: the library's true spot diameter).

    Raises
    ------
    KeyError
        If ``img`` names a resolution the library does not have.
    """
    entry = spatial_entry(adata, library_id)
    images: dict[str, Any] = dict(entry.get("images") or {})
    sf = dict(entry.get("scalefactors") or {})
    image, res, scalef = None, None, 1.0
    if isinstance(img, str):
        if img not in images:
            raise KeyError(
                f"library {library_id!r} has no {img!r} image in adata.uns['spatial'][{library_id!r}]['images'] "
                f"(it has {list(images)})."
            )
        res = img
    elif img:
        candidates: list[str] = [r for r in ("hires", "lowres") if r in images] or list(images)
        shown = [r for r in candidates if not _is_blank(images[r])]
        if shown:
            res = shown[0]
        elif candidates:
            res = candidates[0]
            logger.warning(f"library {library_id!r}: every in-memory image is blank ({candidates}).")
        else:
            logger.warning(f"library {library_id!r} has no in-memory image; drawing the spots without the H&E.")
        if shown and shown[0] != candidates[0]:
            logger.info(f"library {library_id!r}: the {candidates[0]!r} image is blank; drawing on {shown[0]!r}.")
    if res is not None:
        image = np.asarray(images[res])
        key = f"tissue_{res}_scalef"
        if key not in sf:
            raise KeyError(
                f"library {library_id!r}: scale factor {key!r} is missing, so the {res!r} image cannot be aligned "
                f"with the spots (scale factors: {list(sf)})."
            )
        scalef = float(sf[key])
    diameter = float(spot_size) if spot_size is not None else spot_diameter_fullres(adata, library_id)
    if not math.isfinite(diameter) or diameter <= 0:
        raise ValueError(f"spot_size must be a positive diameter in full-resolution pixels, got {diameter!r}.")
    mask = library_mask(adata, library_id, library_key)
    xy = spot_coords(adata)[mask] * scalef
    return TissueView(library_id, image, res, scalef, xy, diameter * scalef / 2.0, mask)


def draw_tissue(ax: Axes, view: TissueView, *, margin: float | None = None) -> None:
    """Draw the background image and frame the axes on the spots (± ``margin`` displayed px)."""
    margin = 2.0 * view.radius if margin is None else margin
    if view.image is not None:
        ax.imshow(view.image, origin="upper", interpolation="antialiased")
    if len(view.xy):
        (x0, y0), (x1, y1) = view.xy.min(axis=0) - margin, view.xy.max(axis=0) + margin
    else:  # pragma: no cover - a library without spots is rejected earlier
        x0, y0, x1, y1 = 0.0, 0.0, 1.0, 1.0
    if view.image is not None:
        h, w = view.image.shape[:2]
        x0, y0, x1, y1 = max(x0, -0.5), max(y0, -0.5), min(x1, w - 0.5), min(y1, h - 0.5)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # image rows grow downwards
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def spot_collection(
    view: TissueView,
    *,
    values: Any = None,
    colors: Any = None,
    cmap: Any = None,
    vmin: float | None = None,
    vmax: float | None = None,
    **kwargs: Any,
) -> PatchCollection:
    """A PatchCollection of one Circle per spot, radius in data units of the displayed image."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

    circles = [Circle((float(x), float(y)), radius=view.radius) for x, y in view.xy]
    kwargs.setdefault("linewidths", 0)  # no outline: an outline would make dense spots look larger than they are
    coll = PatchCollection(circles, **kwargs)
    if values is not None:
        coll.set_array(np.asarray(values, dtype=float))
        coll.set_cmap(cmap)
        coll.set_clim(vmin, vmax)
    elif colors is not None:
        coll.set_facecolor(colors)
    return coll


def new_axes(n_rows: int, n_cols: int, *, panel_size: tuple[float, float] = (4.0, 4.0)) -> tuple[Figure, np.ndarray]:
    """A figure with an ``n_rows x n_cols`` grid of axes (constrained layout), axes as a 2-D array."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(panel_size[0] * n_cols, panel_size[1] * n_rows),
        squeeze=False,
        layout="constrained",
    )
    return fig, axes


def given_axes(ax: Any, n_panels: int, what: str) -> list[Axes]:
    """Flatten user-given axes and check there is one per panel."""
    axes = list(np.ravel(np.asarray(ax, dtype=object)))
    if len(axes) != n_panels:
        raise ValueError(f"{what} draws {n_panels} panels but ax= holds {len(axes)} axes.")
    return axes


def finish(fig: Figure, *, save: str | Path | None, return_fig: bool) -> Figure | None:
    """Save the figure when asked; return it when ``return_fig``."""
    if save is not None:
        fig.savefig(save, dpi=150, bbox_inches="tight")
        logger.info(f"saved figure to {str(save)!r}")
    return fig if return_fig else None
