"""Whether a slide's image carries heavy JPEG block artefacts (``tl.predict``'s compression check).

A slide exported as a strongly compressed JPEG has lost the detail inside each 8-px block: on a
~2000-px export (3.6 µm/px) a 100-µm spot covers about 3 x 3 blocks of nearly flat colour. On HER2+ such
an export at JPEG quality 8 halved the default pipeline's all-gene PCC (0.096 -> 0.051, the
``lowdark_jpeg2`` rendering of ``benchmarks/shift.py``), while the shift score flagged two of its three
slides. :func:`stexp.tl.predict` measures the block artefacts of each slide's in-memory image
(:func:`stexp.images._quality.jpeg_blockiness`; whole-slide files are not decoded a second time for it),
records them and warns above :data:`HEAVY`. By default (the ``deblock`` view option of
``embed_images``, recorded in the model's encoder spec) such a slide's features were computed from its
image deblocked, which recovers much of the loss; the warning says so, and names what else to try: a
better export, or training slides embedded as the export is seen (``embed_images(mpp=..., jpeg_quality=...)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stexp._settings import logger
from stexp.images._quality import HEAVY_BLOCKINESS

if TYPE_CHECKING:  # pragma: no cover
    from stexp.images._slide import SlideView

#: Blockiness above this (about JPEG quality 30 or lower on the HER2+ images) is reported.
HEAVY = HEAVY_BLOCKINESS
#: What deblocking recovered on the benchmark (quoted in the warning).
DEBLOCK_MEASURED = (
    "on HER2+ ~2000-px exports at JPEG quality 8 with blur and stain changes, all-gene PCC 0.026 -> 0.070"
)


def compression_check(views: Mapping[str, SlideView], *, deblocked: bool = False) -> dict[str, Any] | None:
    """Each slide's JPEG blockiness (in-memory images only); warns for heavy block artefacts.

    ``views``: the slides' images (:func:`stexp.images._slide.readable_views`); ``deblocked``: whether the
    features were computed with the ``deblock`` view option (a heavy slide was then deblocked first).

    Returns
    -------
    The record (``uns["stexp"][key]["compression"]``): per slide ``jpeg_blockiness``, ``heavy`` and
    ``deblocked``; ``None`` when no slide's image is in memory.
    """
    from stexp.images._quality import jpeg_blockiness

    slides: dict[str, dict[str, Any]] = {}
    for lib, view in views.items():
        if view.array is None:  # a file or a lazy pyramid: not decoded again for this
            continue
        blockiness = jpeg_blockiness(view.array)
        if blockiness is None:
            continue
        heavy = bool(blockiness > HEAVY)
        slides[lib] = {"jpeg_blockiness": round(blockiness, 3), "heavy": heavy, "deblocked": heavy and deblocked}
        if heavy:
            logger.warning(_warning(lib, blockiness, deblocked))
    if not slides:
        return None
    return {
        "what": "mean grey-level step across JPEG's 8-px block boundaries over the mean step inside the blocks "
        f"(1.0: no block artefacts); above {HEAVY:g} is reported; deblocked: its features were computed from "
        "the image deblocked (the deblock view option)",
        "slides": slides,
    }


def _warning(lib: str, blockiness: float, deblocked: bool) -> str:
    """What a heavy slide's warning says: what it means, what was done, what to try."""
    head = (
        f"slide {lib!r}: its image shows heavy JPEG block artefacts (blockiness {blockiness:.2f}; 1.0 for an image "
        "never compressed, about 1.5 at JPEG quality 30): compression erased detail the model reads"
    )
    try_next = (
        "Use a lossless or high-quality export of the slide if there is one; if every new slide comes so "
        "compressed, embed the training slides as they are seen "
        "(stexp.pp.embed_images(train, mpp=..., jpeg_quality=..., key_added=...)) and refit on those features."
    )
    if deblocked:
        return (
            f"{head}. Its features were computed from the image deblocked (the deblock view option), which "
            f"recovers much of the loss ({DEBLOCK_MEASURED}; docs/shift.md), but its predictions are still "
            f"likely poorer than on a slide like the training slides. {try_next}"
        )
    return (
        f"{head}, and the model's features are not deblocked (deblock=False, or a model fitted before the option): "
        f"its predictions are likely poorer (on HER2+ ~2000-px exports, quality 8 halved all-gene PCC; "
        f"docs/shift.md). Refit on features embedded with deblock=True (the default), or: {try_next}"
    )
