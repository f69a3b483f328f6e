"""Whether a slide's images show less detail than the model's training slides did (``tl.predict``'s check).

A model learns from the detail its training patches had. A slide scanned or exported at a coarser
resolution (a ~2000-px export of a whole slide, a low-magnification scan) lacks that detail, and the
model's answers degrade in a way the training slides never showed. :func:`stexp.tl.fit` records, per
training slide, the finest detail its features saw (``detail_um_per_px`` in the model card's training
libraries, :func:`stexp.images._slide.detail_um_per_px`); :func:`stexp.tl.predict` compares each new
slide with the coarsest of them, records the comparison and warns, naming what to try: embed the
training slides at the new slides' resolution (``embed_images(mpp=...)``) and refit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stexp._settings import logger

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

    from stexp.images._slide import SlideView
    from stexp.models._base import ExpressionModel

#: A slide whose finest detail is this many times coarser than every training slide's is reported.
COARSER_FACTOR = 1.5


def training_detail(model: ExpressionModel) -> float | None:
    """The coarsest ``detail_um_per_px`` of the model's training slides (``None``: not recorded)."""
    libraries = (model.card.training_data or {}).get("libraries") or {}
    values = [float(v["detail_um_per_px"]) for v in libraries.values() if v.get("detail_um_per_px")]
    return max(values) if values else None


def resolution_check(adata: AnnData, model: ExpressionModel, views: Mapping[str, SlideView]) -> dict[str, Any] | None:
    """Each slide's finest detail against the training slides'; warns for a coarser slide.

    ``views``: the slides' images (:func:`stexp.images._slide.readable_views`).

    Returns
    -------
    The record (``uns["stexp"][key]["resolution"]``): ``training_detail_um_per_px`` and per slide
    ``detail_um_per_px``, ``times_coarser`` and ``coarser``; ``None`` when the model does not record its
    training slides' detail or no slide's is known.
    """
    from stexp.images._slide import detail_um_per_px

    reference = training_detail(model)
    if reference is None:
        return None
    spec = model.encoder_spec or None
    slides: dict[str, dict[str, Any]] = {}
    for lib, view in views.items():
        detail = detail_um_per_px(adata, view, spec)
        if detail is None:
            continue
        ratio = detail / reference
        slides[lib] = {
            "detail_um_per_px": round(detail, 4),
            "times_coarser": round(ratio, 3),
            "coarser": bool(ratio > COARSER_FACTOR),
        }
        if ratio > COARSER_FACTOR:
            logger.warning(
                f"slide {lib!r}: its image shows detail down to {detail:.3g} µm/px, {ratio:.1f} times coarser than the "
                f"model's training slides ({reference:.3g} µm/px at most): the model learned from detail this slide "
                f"lacks, so its predictions are likely poorer than on a slide like the training slides. To train on "
                f"what this slide shows, embed the training slides with stexp.pp.embed_images(train, mpp={detail:.3g}, "
                "key_added=...) and refit on those features (on HER2+ ~2000-px exports a gain on the plain and JPEG exports, "
                "a loss once blur and stain changes came on top; measure it on your slides; docs/shift.md)."
            )
    if not slides:
        return None
    return {
        "what": "the finest detail (µm per pixel) each slide's image features can see, against the coarsest "
        "training slide's; a slide more than "
        f"{COARSER_FACTOR:g} times coarser is reported",
        "training_detail_um_per_px": reference,
        "slides": slides,
    }
