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
    from stexp.images._quality import Compression
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
    The record (``uns["stexp"][key]["compression"]``): per slide ``jpeg_blockiness``, ``heavy``,
    ``estimated_quality`` (of a heavy slide; else ``None``) and ``deblocked``; ``None`` when no slide's image
    is in memory.
    """
    from stexp.images._quality import measure_compression

    slides: dict[str, dict[str, Any]] = {}
    for lib, view in views.items():
        if view.array is None:  # a file or a lazy pyramid: not decoded again for this
            continue
        found = measure_compression(view.array)
        if found.blockiness is None:
            continue
        slides[lib] = {
            "jpeg_blockiness": round(found.blockiness, 3),
            "heavy": found.heavy,
            "estimated_quality": found.quality,
            "deblocked": deblocked and found.deblock,
        }
        if found.heavy:
            logger.warning(_warning(lib, found, deblocked))
    if not slides:
        return None
    return {
        "what": "mean grey-level step across JPEG's 8-px block boundaries over the mean step inside the blocks "
        f"(1.0: no block artefacts); above {HEAVY:g} is reported; estimated_quality: the JPEG quality a heavy "
        "slide was last saved at; deblocked: its features were computed from the image deblocked (the deblock "
        "view option; heavy slides saved at quality 50 or lower)",
        "slides": slides,
    }


def _warning(lib: str, found: Compression, model_deblocks: bool) -> str:
    """What a heavy slide's warning says: what it means, what was done, what to try."""
    head = (
        f"slide {lib!r}: its image shows heavy JPEG block artefacts (blockiness {found.blockiness:.2f}; 1.0 for an "
        "image never compressed, about 1.5 at JPEG quality 30): compression erased detail the model reads"
    )
    try_next = (
        "Use a lossless or high-quality export of the slide if there is one; if every new slide comes so "
        "compressed, embed the training slides as they are seen "
        "(stexp.pp.embed_images(train, mpp=..., jpeg_quality=..., key_added=...)) and refit on those features."
    )
    if model_deblocks and found.deblock:
        return (
            f"{head}. Its features were computed from the image deblocked (the deblock view option, at its "
            f"estimated JPEG quality {found.quality}), which recovers much of the loss ({DEBLOCK_MEASURED}; "
            f"docs/shift.md), but its predictions are still likely poorer than on a slide like the training "
            f"slides. {try_next}"
        )
    if model_deblocks:  # heavy, but at a high estimated quality: not deblocked
        return (
            f"{head}, though it reads as saved at JPEG quality {found.quality}, so it was not deblocked (a pattern "
            f"on the 8-px grid, or another encoder's tables): its predictions may be poorer. {try_next}"
        )
    return (
        f"{head}, and the model's features are not deblocked (deblock=False, or a model fitted before the option): "
        f"its predictions are likely poorer (on HER2+ ~2000-px exports, quality 8 halved all-gene PCC; "
        f"docs/shift.md). Refit on features embedded with deblock=True (the default), or: {try_next}"
    )
