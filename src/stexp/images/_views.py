"""What ``stexp.pp.embed_images`` may do to the patches: resample, stain-normalise, flip and rotate.

Resampling every slide to one µm/px, stain normalisation and test-time augmentation over the 8
flips/rotations of each patch.

Kept apart from ``_embed`` so that the embedding loop only calls three hooks:
:func:`resample_slide` (the decoded slide and its patch plan, at ``mpp`` µm/px), :func:`stain_normalizer`
(a per-slide patch transform, or ``None``) and :func:`encode` (the encoder's output, averaged over the
dihedral group with ``tta``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Final

import numpy as np

#: ``stain_norm`` values of ``embed_images``.
STAIN_NORMS = (None, "reinhard", "macenko")
#: ``embed_images``' default ``stain_norm``: on the shift protocol (``benchmarks/shift.py --stain-norm macenko``,
#: ``docs/shift.md``) it cost clean LOPO 0.002 PCC(ACG) and raised the strongest rendering from -0.003 to 0.026.
DEFAULT_STAIN_NORM: Final = "macenko"
#: Longest side (px) of the thumbnail a slide's stain statistics are taken from (``stain_norm``); smaller
#: than the readers' in-memory copy (:data:`stexp._layout.THUMBNAIL_PX`): colour statistics need no detail.
STAIN_THUMBNAIL_PX = 1024


def check_options(mpp, stain_norm, tta) -> tuple[float | None, str | None, bool]:
    """Validated ``mpp`` (None, or a plausible µm/px: :func:`stexp._layout.check_um_per_px`), ``stain_norm``, ``tta``.

    Raises
    ------
    TypeError
        If ``mpp`` is not a number (``True``, ``"0.5"``...).
    ValueError
        If ``mpp`` lies outside the plausible µm/px range, or ``stain_norm`` / ``tta`` are not among their values.
    """
    if mpp is not None:
        from stexp._layout import check_um_per_px

        mpp = check_um_per_px(mpp, what="mpp")
    if stain_norm not in STAIN_NORMS:
        raise ValueError(f"stain_norm must be one of {STAIN_NORMS}, got {stain_norm!r}.")
    if not isinstance(tta, (bool, np.bool_)):
        raise ValueError(f"tta must be True or False, got {tta!r}.")
    return mpp, stain_norm, bool(tta)


def resample_slide(image, plan, *, image_um_per_px: float, mpp: float | None):
    """The decoded slide ``image`` (PIL) and its :class:`~stexp.images._patches.PatchPlan` at ``mpp`` µm/px.

    ``None`` leaves both as they are. Resampling the whole slide first (Lanczos) means every slide, whatever
    its scanner's resolution, reaches the encoder through the same pixel size: a coarser ``mpp`` than the
    finest scan removes detail the coarser scans do not have.
    """
    if mpp is None:
        return image, plan
    from PIL import Image

    factor = float(image_um_per_px) / float(mpp)
    if math.isclose(factor, 1.0, rel_tol=1e-3):
        return image, plan
    w, h = image.size
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    resized = image.resize(size, Image.Resampling.LANCZOS)
    fx, fy = size[0] / w, size[1] / h
    centres = np.asarray(plan.centres, dtype=np.float64) * np.array([fx, fy])
    return resized, dataclasses.replace(plan, centres=centres, side=float(plan.side) * fx)


def stain_normalizer(
    image, stain_norm: str | None, *, library_id: str | None = None
) -> Callable[[np.ndarray], np.ndarray] | None:
    """A transform of uint8 patches fitted on the slide's thumbnail, or ``None`` without ``stain_norm``.

    ``"reinhard"``: :class:`~stexp.images._stain.ReinhardNormalizer`; ``"macenko"``:
    :class:`~stexp.images._stain.MacenkoNormalizer` (a ``ValueError`` naming ``library_id`` when the
    thumbnail shows no tissue).
    """
    if stain_norm is None:
        return None
    from ._stain import MacenkoNormalizer, ReinhardNormalizer

    fits: dict[str, Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]]]
    fits = {"reinhard": ReinhardNormalizer.fit, "macenko": MacenkoNormalizer.fit}
    if stain_norm not in fits:
        raise ValueError(f"stain_norm must be one of {STAIN_NORMS}, got {stain_norm!r}.")
    fit = fits[stain_norm]
    thumb = image.copy()
    thumb.thumbnail((STAIN_THUMBNAIL_PX, STAIN_THUMBNAIL_PX))
    try:
        return fit(np.asarray(thumb.convert("RGB")))
    except ValueError as err:
        slide = "" if library_id is None else f"slide {library_id!r}: "
        raise ValueError(
            f"{slide}stain_norm={stain_norm!r} failed: {err} (embed_images(stain_norm=None) embeds it without "
            "stain normalisation, e.g. a slide that is not H&E)"
        ) from err


def encode(module, x, *, tta: bool):
    """``module(x)``, or with ``tta`` its mean over the 8 flips/rotations of the ``(B, C, H, W)`` batch."""
    if not tta:
        return module(x)
    import torch

    total: torch.Tensor | None = None
    for k in range(4):
        r = torch.rot90(x, k, dims=(2, 3))
        for view in (r, torch.flip(r, dims=(3,))):
            y = module(view).float()
            total = y if total is None else total + y
    assert total is not None
    return total / 8.0
