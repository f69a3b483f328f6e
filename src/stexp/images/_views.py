"""What ``stexp.pp.embed_images`` may do to the patches and the encoder: resample, stain-normalise, adapt.

Resampling every slide to one µm/px, stain normalisation, test-time augmentation over the 8
flips/rotations of each patch, and test-time BatchNorm re-estimation per slide (AdaBN).

Kept apart from ``_embed`` so that the embedding loop only calls a few hooks:
:func:`resample_slide` (the decoded slide and its patch plan, at ``mpp`` µm/px), :func:`stain_normalizer`
(a per-slide patch transform, or ``None``), :func:`encode` (the encoder's output, averaged over the
dihedral group with ``tta``) and, with ``adapt_bn``, :func:`adapt_sample` (which spots adapt the encoder)
and :func:`adapted_batchnorm` (the encoder with the slide's own BatchNorm statistics, restored afterwards).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, Final

import numpy as np

#: ``stain_norm`` values of ``embed_images``.
STAIN_NORMS = (None, "reinhard", "macenko", "vahadane", "haematoxylin")
#: ``embed_images``' default ``stain_norm``: on the shift protocol (``benchmarks/shift.py --stain-norm macenko``,
#: ``docs/shift.md``) it cost clean LOPO 0.002 PCC(ACG) and raised the strongest rendering from -0.003 to 0.026.
DEFAULT_STAIN_NORM: Final = "macenko"
#: Longest side (px) of the thumbnail a slide's stain statistics are taken from (``stain_norm``); smaller
#: than the readers' in-memory copy (:data:`stexp._layout.THUMBNAIL_PX`): colour statistics need no detail.
STAIN_THUMBNAIL_PX = 1024
#: At most this many patches of a slide re-estimate the encoder's BatchNorm statistics (``adapt_bn``).
ADAPT_BN_PATCHES: Final = 512
#: Patches per forward pass of that re-estimation: fixed, not ``embed_images``' ``batch_size``, because the
#: re-estimated statistics (a cumulative average of per-batch statistics) depend on it, and the features
#: must not depend on how they were computed (the CLI, predict and the cache key ignore ``batch_size``).
ADAPT_BN_BATCH: Final = 64


#: The highest ``jpeg_quality`` (PIL's advice: above 95 the file grows with little gain).
JPEG_MAX_QUALITY = 95


def check_options(
    mpp, stain_norm, tta, adapt_bn=False, jpeg_quality=None, deblock=False
) -> tuple[float | None, str | None, bool, bool, int | None, bool]:
    """Validated view options: ``mpp``, ``stain_norm``, ``tta``, ``adapt_bn``, ``jpeg_quality``, ``deblock``.

    ``mpp`` is None or a plausible µm/px (:func:`stexp._layout.check_um_per_px`); ``jpeg_quality`` None or an
    integer from 1 to 95.

    Raises
    ------
    TypeError
        If ``mpp`` is not a number (``True``, ``"0.5"``...).
    ValueError
        If ``mpp`` lies outside the plausible µm/px range, or ``stain_norm`` / ``tta`` / ``adapt_bn`` /
        ``jpeg_quality`` / ``deblock`` are not among their values.
    """
    if mpp is not None:
        from stexp._layout import check_um_per_px

        mpp = check_um_per_px(mpp, what="mpp")
    if stain_norm not in STAIN_NORMS:
        raise ValueError(f"stain_norm must be one of {STAIN_NORMS}, got {stain_norm!r}.")
    if not isinstance(tta, (bool, np.bool_)):
        raise ValueError(f"tta must be True or False, got {tta!r}.")
    if not isinstance(adapt_bn, (bool, np.bool_)):
        raise ValueError(f"adapt_bn must be True or False, got {adapt_bn!r}.")
    if not isinstance(deblock, (bool, np.bool_)):
        raise ValueError(f"deblock must be True or False, got {deblock!r}.")
    if jpeg_quality is not None:
        if isinstance(jpeg_quality, (bool, np.bool_)) or not isinstance(jpeg_quality, (int, np.integer)):
            raise ValueError(
                f"jpeg_quality must be None or an integer from 1 to {JPEG_MAX_QUALITY}, got {jpeg_quality!r}."
            )
        if not 1 <= int(jpeg_quality) <= JPEG_MAX_QUALITY:
            raise ValueError(f"jpeg_quality must be from 1 to {JPEG_MAX_QUALITY}, got {jpeg_quality}.")
        jpeg_quality = int(jpeg_quality)
    return mpp, stain_norm, bool(tta), bool(adapt_bn), jpeg_quality, bool(deblock)


def deblock_slide(image, deblock: bool, *, library_id: str | None = None):
    """The decoded slide ``image`` (PIL RGB) with heavy JPEG block artefacts removed (the ``deblock`` view option).

    Only a slide that :func:`stexp.images._quality.measure_compression` finds heavily compressed
    (:attr:`~stexp.images._quality.Compression.deblock`) is changed: re-application of JPEG at its estimated
    quality (:func:`~stexp.images._quality.deblock_jpeg`), logged. Any other slide is returned as it is.
    """
    if not deblock:
        return image
    from PIL import Image

    from stexp._settings import logger
    from stexp.images._quality import deblock_jpeg, measure_compression

    found = measure_compression(image)  # reads its central crop only
    if found.heavy and not found.deblock:
        logger.info(
            f"library {library_id!r}: blockiness {found.blockiness:.2f}, but last saved at about JPEG quality "
            f"{found.quality}: not deblocked (structure on the 8-px grid, not compression)."
        )
    if not found.deblock:
        return image
    assert found.quality is not None
    out = Image.fromarray(
        deblock_jpeg(np.asarray(image if image.mode == "RGB" else image.convert("RGB")), found.quality)
    )
    logger.info(
        f"library {library_id!r}: heavy JPEG block artefacts (blockiness {found.blockiness:.2f}, last saved at about "
        f"quality {found.quality}); deblocked before embedding (re-application of JPEG; deblock=False keeps the blocks)."
    )
    return out


def jpeg_slide(image, quality: int | None):
    """The decoded slide ``image`` (PIL) re-encoded as JPEG at ``quality`` and decoded again (``None``: as is).

    Seen this way, training slides look like another lab's compressed export of the same resolution: the
    ``jpeg_quality`` view option (``docs/shift.md``).
    """
    if quality is None:
        return image
    from stexp.images._quality import jpeg_roundtrip

    return jpeg_roundtrip(image, quality)


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
    return resized, rescale_plan(plan, image.size, size)


def rescale_plan(plan, size: tuple[int, int], new_size: tuple[int, int]):
    """``plan`` (of an image of ``size`` = (width, height) px) on the image resized to ``new_size``."""
    if tuple(size) == tuple(new_size):
        return plan
    fx, fy = new_size[0] / size[0], new_size[1] / size[1]
    centres = np.asarray(plan.centres, dtype=np.float64) * np.array([fx, fy])
    return dataclasses.replace(plan, centres=centres, side=float(plan.side) * fx)


def stain_normalizer(
    image, stain_norm: str | None, *, library_id: str | None = None
) -> Callable[[np.ndarray], np.ndarray] | None:
    """A transform of uint8 patches fitted on the slide's thumbnail, or ``None`` without ``stain_norm``.

    ``"reinhard"``: :class:`~stexp.images._stain.ReinhardNormalizer`; ``"macenko"``:
    :class:`~stexp.images._stain.MacenkoNormalizer`; ``"vahadane"``: :class:`~stexp.images._stain.VahadaneNormalizer`;
    ``"haematoxylin"``: :class:`~stexp.images._stain.HaematoxylinNormalizer` (Macenko's, eosin left out). All
    but Reinhard raise a ``ValueError`` naming ``library_id`` when the thumbnail shows no tissue.
    """
    if stain_norm is None:
        return None
    from ._stain import HaematoxylinNormalizer, MacenkoNormalizer, ReinhardNormalizer, VahadaneNormalizer

    fits: dict[str, Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]]]
    fits = {
        "reinhard": ReinhardNormalizer.fit,
        "macenko": MacenkoNormalizer.fit,
        "vahadane": VahadaneNormalizer.fit,
        "haematoxylin": HaematoxylinNormalizer.fit,
    }
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


def batchnorm_layers(module) -> list:
    """The BatchNorm layers of ``module`` that keep running statistics (what ``adapt_bn`` re-estimates).

    Every subclass of torch's ``_BatchNorm`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, timm's
    ``BatchNormAct2d``...) with ``track_running_stats``; frozen BatchNorm (a fixed affine map) and the other
    normalisations (LayerNorm, GroupNorm...) have no statistics to re-estimate.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    modules = module.modules() if hasattr(module, "modules") else ()
    return [m for m in modules if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None]


def check_adapt_bn(module, name: str) -> None:
    """Raise a ValueError naming the encoder when ``adapt_bn`` has no BatchNorm statistics to re-estimate in it."""
    if not batchnorm_layers(module):
        raise ValueError(
            f"adapt_bn=True needs BatchNorm layers with running statistics in the encoder, but encoder {name!r} has "
            "none (e.g. a ViT with LayerNorm: UNI, H-optimus-0...); embed it with adapt_bn=False."
        )


def adapt_sample(inside: np.ndarray, n: int = ADAPT_BN_PATCHES) -> np.ndarray:
    """Positions (in plan order) of at most ``n`` spots inside the image, evenly spaced over the plan's spots.

    Deterministic: no random generator is used (nor the global ones drawn from).
    """
    rows = np.flatnonzero(np.asarray(inside, dtype=bool))
    if len(rows) > n:
        rows = rows[np.round(np.linspace(0, len(rows) - 1, n)).astype(np.int64)]
    return rows


def _interleaved(n: int, batch_size: int = ADAPT_BN_BATCH) -> list[np.ndarray]:
    """``range(n)`` cut into ``k = ceil(n / batch_size)`` batches of nearly equal size, batch b taking b, b + k...

    Interleaved rather than consecutive, so that each batch covers the whole slide rather than one region of it
    (the plan's spots run across the slide): BatchNorm's cumulative average of per-batch variances then misses
    little of the between-region variance.
    """
    k = max(1, math.ceil(n / max(int(batch_size), 2)))  # BatchNorm in train mode needs two values per channel
    return [np.arange(b, n, k) for b in range(k) if b < n]


@contextlib.contextmanager
def adapted_batchnorm(
    module, patches: np.ndarray, to_input: Callable[[np.ndarray], Any], *, name: str, batch_size: int = ADAPT_BN_BATCH,
    library_id: str | None = None, autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> Iterator[None]:  # fmt: skip
    """``module`` with every BatchNorm layer's statistics re-estimated on ``patches`` (AdaBN), restored on exit.

    Li et al. 2016, "Revisiting batch normalization for practical domain adaptation": each BatchNorm
    layer's running mean and variance are reset, then re-estimated as a cumulative average (momentum
    ``None``) over forward passes of ``patches`` (uint8 ``(n, H, W, 3)``, turned into the encoder's input
    by ``to_input``) in interleaved batches of about ``batch_size`` (:data:`ADAPT_BN_BATCH`;
    :func:`_interleaved`) under ``torch.no_grad``, with only the BatchNorm layers in train mode (``autocast``:
    the context the embedding's forward passes run in). Inside the block the BatchNorm layers are in eval mode
    and use these statistics. On exit, also on an error, every BatchNorm layer's buffers, momentum and
    train/eval flag are those it had before; nothing else of ``module`` is changed.

    Raises
    ------
    ValueError
        If ``module`` has no BatchNorm layer with running statistics (the message names the encoder
        ``name``), or the forward passes fail in train mode (e.g. a BatchNorm layer that sees one value per
        channel; the message names ``library_id``).
    """
    import torch

    layers = batchnorm_layers(module)
    if not layers:
        check_adapt_bn(module, name)
    saved = [
        (m, m.training, m.momentum, {k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None})
        for m in layers
    ]
    try:
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the forward passes
            m.train()
        try:
            with torch.no_grad():
                for sel in _interleaved(len(patches), batch_size):
                    x = to_input(patches[sel])
                    with autocast():
                        module(x)
        except ValueError as err:  # e.g. a BatchNorm layer that sees one value per channel
            slide = "" if library_id is None else f"library {library_id!r}: "
            raise ValueError(
                f"{slide}adapt_bn could not re-estimate the BatchNorm statistics of encoder {name!r} from "
                f"{len(patches)} patches: {err}"
            ) from err
        for m in layers:
            m.eval()
        yield
    finally:
        with torch.no_grad():
            for m, training, momentum, buffers in saved:
                for k, value in buffers.items():
                    getattr(m, k).copy_(value)
                m.momentum = momentum
                m.train(training)
