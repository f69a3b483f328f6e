"""Spot centres against their slide's extent: which spots of a library lie inside its image.

Below ``stexp.io`` so that the patch planner (:mod:`stexp.images._patches`) and the readers and
:func:`stexp.io.validate` share one check.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from stexp._docs import doc_params
from stexp._layout import LIBRARY_KEY, library_mask, spot_coords
from stexp._settings import logger

from ._slide import has_image, slide_view


@doc_params
def check_spots_in_image(
    adata,
    library_id: str,
    *,
    on_outside: Literal["raise", "drop"] = "raise",
    library_key: str = LIBRARY_KEY,
    view=None,
) -> np.ndarray:
    """Check that the spot centres of one library lie inside its full-resolution image.

    Parameters
    ----------
    adata
        AnnData in stexp's layout.
    library_id
        The library to check.
    on_outside
        ``"raise"``: a :class:`ValueError` names the library, the number of spots outside and their
        coordinate range. ``"drop"``: log a warning saying how many spots are outside and return the mask
        (the caller drops them; ``adata`` is not modified).
    {library_key}
    view
        The library's :class:`stexp.images.SlideView` when the caller already has it.

    Returns
    -------
    Boolean mask over the spots of ``library_id`` (in the order they appear in ``adata``): ``True`` when
    the centre lies inside ``[0, width) x [0, height)`` full-resolution pixels.

    Raises
    ------
    ValueError
        If the library has no image (nothing to check against), or spots are outside with
        ``on_outside="raise"``.
    """
    if on_outside not in ("raise", "drop"):
        raise ValueError(f"on_outside must be 'raise' or 'drop', got {on_outside!r}.")
    if view is None:
        if not has_image(adata, library_id):
            raise ValueError(
                f"library {library_id!r} has no image (no in-memory images and no readable source_image_path): "
                "cannot check whether its spots lie inside it."
            )
        view = slide_view(adata, library_id)
    width, height = view.extent
    xy = spot_coords(adata)[library_mask(adata, library_id, library_key)]
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < width) & (xy[:, 1] >= 0) & (xy[:, 1] < height)
    inside &= np.isfinite(xy).all(axis=1)
    n_out = int((~inside).sum())
    if n_out:
        out = xy[~inside]
        msg = (
            f"library {library_id!r}: {n_out} of {len(xy)} spots lie outside the full-resolution image "
            f"(width {width:g} x height {height:g} px); their centres span x in [{np.nanmin(out[:, 0]):.1f}, "
            f"{np.nanmax(out[:, 0]):.1f}], y in [{np.nanmin(out[:, 1]):.1f}, {np.nanmax(out[:, 1]):.1f}] px"
        )
        if on_outside == "raise":
            raise ValueError(msg + "; check the coordinate units / image_scale, or pass on_outside='drop'.")
        logger.warning(msg + "; dropping them.")
    return inside
