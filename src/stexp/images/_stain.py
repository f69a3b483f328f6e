"""H&E stain: a fixed perturbation in HED space (a stand-in for another lab's staining) and Reinhard normalisation.

:func:`hed_shift` scales and offsets the haematoxylin, eosin and DAB optical densities of an RGB image
(:func:`skimage.color.rgb2hed` / :func:`~skimage.color.hed2rgb`): a stand-in for another lab's staining
(the benchmark's stain-shift protocol applies it to the held-out slides; ``stexp.images.hed_shift``). :class:`ReinhardNormalizer` maps the CIELAB
statistics of a slide's tissue pixels onto a fixed target (Reinhard et al., IEEE CG&A 21(5), 2001), so
slides stained or scanned differently give comparable patches; ``stexp.pp.embed_images(...,
stain_norm="reinhard")`` uses it (statistics from each slide's own thumbnail, then applied per patch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The default shift of :func:`hed_shift`: stronger haematoxylin, weaker eosin, a small eosin offset.
DEFAULT_HED_SHIFT = {"scale": (1.3, 0.75, 1.0), "offset": (0.0, 0.02, 0.0)}
#: Reinhard target: mean and std of L*, a*, b* over tissue pixels (a typical H&E; fixed, not fitted to any slide).
REINHARD_TARGET = {"mean": (65.0, 25.0, -12.0), "std": (15.0, 8.0, 6.0)}
#: Pixels with all RGB channels above this are background (glass), excluded from the statistics.
WHITE = 215


def hed_shift(
    image: np.ndarray,
    *,
    scale: tuple[float, float, float] = DEFAULT_HED_SHIFT["scale"],
    offset: tuple[float, float, float] = DEFAULT_HED_SHIFT["offset"],
    chunk_rows: int = 512,
) -> np.ndarray:
    """``image`` (uint8 ``(H, W, 3)`` RGB) with its H, E, DAB densities multiplied by ``scale`` and shifted by ``offset``.

    Processed in bands of ``chunk_rows`` rows, so whole slides fit in memory.
    """
    from skimage.color import hed2rgb, rgb2hed

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"hed_shift expects a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}.")
    s = np.asarray(scale, dtype=np.float64)
    o = np.asarray(offset, dtype=np.float64)
    out = np.empty_like(image)
    for r in range(0, image.shape[0], int(chunk_rows)):
        hed = rgb2hed(image[r : r + chunk_rows]) * s + o
        rgb = hed2rgb(np.maximum(hed, 0.0))
        out[r : r + chunk_rows] = np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)
    return out


def _tissue_lab(image: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    pixels = np.asarray(image).reshape(-1, 3)
    tissue = pixels[~(pixels > WHITE).all(axis=1)]
    if len(tissue) < 100:  # (almost) no tissue: use every pixel
        tissue = pixels
    return rgb2lab(tissue[None, :, :].astype(np.uint8))[0]


@dataclass(frozen=True)
class ReinhardNormalizer:
    """Per-slide Reinhard normalisation: ``lab' = (lab - mean) / std * target_std + target_mean`` on every pixel."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def fit(cls, image: np.ndarray) -> ReinhardNormalizer:
        """Statistics of the tissue (non-white) pixels of a slide image (a thumbnail is enough)."""
        lab = _tissue_lab(image)
        mean, std = lab.mean(axis=0), np.maximum(lab.std(axis=0), 1e-3)
        return cls((float(mean[0]), float(mean[1]), float(mean[2])), (float(std[0]), float(std[1]), float(std[2])))

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """uint8 RGB ``(..., H, W, 3)`` patches normalised to :data:`REINHARD_TARGET`; white stays white."""
        from skimage.color import lab2rgb, rgb2lab

        patches = np.asarray(patches)
        shape = patches.shape
        flat = patches.reshape(-1, shape[-2], shape[-1]) if patches.ndim > 3 else patches
        lab = rgb2lab(flat)
        tm, ts = np.asarray(REINHARD_TARGET["mean"]), np.asarray(REINHARD_TARGET["std"])
        lab = (lab - np.asarray(self.mean)) / np.asarray(self.std) * ts + tm
        rgb = np.clip(np.rint(lab2rgb(lab) * 255.0), 0, 255).astype(np.uint8)
        white = (flat > WHITE).all(axis=-1)
        rgb[white] = flat[white]
        return rgb.reshape(shape)
