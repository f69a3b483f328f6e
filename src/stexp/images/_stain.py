"""H&E stain: a fixed HED perturbation (another lab's staining) and Reinhard, Macenko and Vahadane normalisation.

:func:`hed_shift` scales and offsets the haematoxylin, eosin and DAB optical densities of an RGB image
(:func:`skimage.color.rgb2hed` / :func:`~skimage.color.hed2rgb`): a stand-in for another lab's staining
(the benchmark's stain-shift protocol applies it to the held-out slides; ``stexp.images.hed_shift``). :class:`ReinhardNormalizer` maps the CIELAB
statistics of a slide's tissue pixels onto a fixed target (Reinhard et al., IEEE CG&A 21(5), 2001), so
slides stained or scanned differently give comparable patches; ``stexp.pp.embed_images(...,
stain_norm="reinhard")`` uses it (statistics from each slide's own thumbnail, then applied per patch).
:class:`MacenkoNormalizer` estimates a slide's haematoxylin and eosin optical-density vectors and their
concentration range (Macenko et al., "A method for normalizing histology slides for quantitative
analysis", ISBI 2009) and re-renders every pixel's stain concentrations with :data:`MACENKO_TARGET`;
``stain_norm="macenko"`` uses it, fitted and applied as Reinhard's. :class:`VahadaneNormalizer` does the
same with stain vectors from a sparse non-negative factorisation of the optical density (Vahadane et al.,
IEEE TMI 35(8), 2016; ``stain_norm="vahadane"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Self

import numpy as np

#: The default shift of :func:`hed_shift`: stronger haematoxylin, weaker eosin, a small eosin offset.
DEFAULT_HED_SHIFT = {"scale": (1.3, 0.75, 1.0), "offset": (0.0, 0.02, 0.0)}
#: Reinhard target: mean and std of L*, a*, b* over tissue pixels (a typical H&E; fixed, not fitted to any slide).
REINHARD_TARGET = {"mean": (65.0, 25.0, -12.0), "std": (15.0, 8.0, 6.0)}
#: Pixels with all RGB channels above this are background (glass), excluded from the statistics.
WHITE = 215
#: Macenko target: the haematoxylin and eosin optical-density unit vectors (RGB order) and the 99th percentile
#: of each stain's concentration. These are the commonly used reference values of Macenko implementations
#: (e.g. the StainTools and torchstain packages), fitted once on a reference H&E slide; fixed, not fitted here.
MACENKO_TARGET = {
    "stain_matrix": ((0.5626, 0.7201, 0.4062), (0.2159, 0.8012, 0.5581)),
    "max_conc": (1.9705, 1.0308),
}
#: Macenko: pixels with an optical density below this in any channel are background (left out of the fit).
MACENKO_BETA = 0.15
#: Macenko: pixels with all RGB channels below this are dark glass (a slide rendered on a black background),
#: not tissue: their high optical density in every channel would pull the stain vectors towards grey.
DARK_GLASS = 45
#: Macenko: percentiles (``alpha``, ``100 - alpha``) of the angles in the stain plane that give the two stains.
MACENKO_ALPHA = 1.0
#: Fewest tissue pixels :meth:`MacenkoNormalizer.fit` accepts.
MACENKO_MIN_TISSUE = 100
#: :meth:`MacenkoNormalizer.fit` reads at most this many pixels (evenly spaced) of a larger image.
MACENKO_FIT_PIXELS = 1 << 22
#: Vahadane: the L1 penalty on the stain concentrations of the sparse factorisation (the paper's lambda).
VAHADANE_LAMBDA = 0.1
#: Vahadane: the factorisation reads at most this many tissue pixels, a seeded random sample of more.
VAHADANE_FIT_PIXELS = 20_000
#: Vahadane: the seed of that sample and of the starting vectors (``numpy.random.default_rng``).
VAHADANE_SEED = 0
#: Vahadane: at most this many alternating updates of the factorisation (50-100 converge on H&E-like images).
VAHADANE_ITERATIONS = 500
#: Vahadane: the updates stop once no stain vector component moves more than this.
VAHADANE_TOL = 1e-7


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


def _check_rgb(image: np.ndarray, what: str, shape: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim < 3 or image.shape[-1] != 3:
        raise ValueError(f"{what} expects uint8 {shape} RGB, got {image.dtype} {image.shape}.")
    return image


#: ``-log((I + 1) / 256)`` of every uint8 intensity ``I``: the optical density, looked up rather than computed.
_OD_TABLE = -np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)


def _optical_density(rgb: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    """``-log((I + 1) / 256)`` per channel of uint8 ``rgb`` (0 for white 255; never infinite)."""
    return _OD_TABLE.astype(dtype, copy=False)[rgb]


def _tissue_od(image: np.ndarray, name: str) -> np.ndarray:
    """Optical density ``(n, 3)`` of the tissue pixels of ``image`` (see :meth:`_StainMatrixNormalizer.fit`)."""
    image = _check_rgb(image, f"{name}.fit", "(H, W, 3)")
    pixels = image.reshape(-1, 3)
    if len(pixels) > MACENKO_FIT_PIXELS:  # a whole slide rather than a thumbnail: bounded memory
        pixels = pixels[:: -(-len(pixels) // MACENKO_FIT_PIXELS)]
    od = _optical_density(pixels)
    glass = (pixels > WHITE).all(axis=1) | (pixels < DARK_GLASS).all(axis=1)
    tissue = (od >= MACENKO_BETA).all(axis=1) & ~glass
    od = od[tissue]
    if len(od) < MACENKO_MIN_TISSUE:
        raise ValueError(
            f"{name}: the thumbnail has no tissue to fit stain vectors on ({len(od)} of "
            f"{len(pixels)} pixels have an optical density >= {MACENKO_BETA} in every channel; at least "
            f"{MACENKO_MIN_TISSUE} are needed). Is the image blank, or all glass?"
        )
    return od


@dataclass(frozen=True)
class _StainMatrixNormalizer:
    """A slide's two stain vectors and concentration range, re-rendered as :data:`MACENKO_TARGET`.

    Subclasses estimate the stain vectors (:meth:`_stain_vectors`); fitting the concentration range and
    re-rendering are shared.
    """

    stain_matrix: tuple[tuple[float, float, float], tuple[float, float, float]]
    max_conc: tuple[float, float]
    #: Weight of each stain (haematoxylin, eosin) in the re-rendering: 1 keeps it, 0 leaves it out.
    rendered: ClassVar[tuple[float, float]] = (1.0, 1.0)

    @classmethod
    def _stain_vectors(cls, od: np.ndarray) -> np.ndarray:
        """The two stains' OD unit vectors ``(2, 3)``, in either order, from tissue optical densities ``(n, 3)``."""
        raise NotImplementedError

    @classmethod
    def fit(cls, image: np.ndarray) -> Self:
        """Stain vectors and concentration range of a slide image (a thumbnail is enough), uint8 ``(H, W, 3)``.

        Tissue pixels (of at most :data:`MACENKO_FIT_PIXELS`, evenly spaced): optical density at least
        :data:`MACENKO_BETA` in every channel and not glass (all channels above :data:`WHITE`, or all below
        :data:`DARK_GLASS`: a dark background). Their stain vectors are estimated as the class says, the one
        with the larger red-channel OD being haematoxylin (it absorbs more red than eosin); ``max_conc`` is
        the 99th percentile of each stain's least-squares concentration over the tissue pixels.

        Raises
        ------
        ValueError
            If ``image`` is not uint8 RGB, or has fewer than :data:`MACENKO_MIN_TISSUE` tissue pixels.
        """
        od = _tissue_od(image, cls.__name__)
        stains = cls._stain_vectors(od)
        if stains[0, 0] < stains[1, 0]:  # haematoxylin first: it absorbs more red than eosin
            stains = stains[::-1]
        conc = od @ np.linalg.pinv(stains)  # least squares: od ~ conc @ stains
        max_conc = np.maximum(np.percentile(conc, 99, axis=0), 1e-3)
        (h0, h1, h2), (e0, e1, e2) = stains.tolist()
        return cls(((h0, h1, h2), (e0, e1, e2)), (float(max_conc[0]), float(max_conc[1])))

    def __call__(self, patches: np.ndarray, *, chunk_pixels: int = 1 << 16) -> np.ndarray:
        """uint8 RGB ``(..., H, W, 3)`` patches with their stains re-rendered as :data:`MACENKO_TARGET`.

        Every pixel's concentrations (least squares on the slide's ``stain_matrix``) are scaled by
        ``target max_conc / max_conc`` and rendered with the target's stain matrix; white (zero optical
        density) stays white. Processed ``chunk_pixels`` pixels at a time, so memory stays bounded.

        Raises
        ------
        ValueError
            If ``patches`` is not uint8 with RGB last.
        """
        patches = _check_rgb(patches, type(self).__name__, "(..., H, W, 3)")
        # float32 throughout (the output is uint8), in chunks small enough for the allocator to reuse
        unmix = np.linalg.pinv(np.asarray(self.stain_matrix, dtype=np.float64))  # (3, 2)
        scale = np.asarray(MACENKO_TARGET["max_conc"], dtype=np.float64) / np.asarray(self.max_conc, np.float64)
        scale = scale * np.asarray(self.rendered, dtype=np.float64)
        target = np.asarray(MACENKO_TARGET["stain_matrix"], dtype=np.float64)  # (2, 3)
        render = ((unmix * scale) @ target).astype(np.float32)  # (3, 3): OD in -> target OD out
        flat = patches.reshape(-1, 3)
        out = np.empty_like(flat)
        step = max(1, int(chunk_pixels))
        for start in range(0, len(flat), step):
            od = _optical_density(flat[start : start + step], np.float32) @ render  # the target's optical density
            np.negative(od, out=od)
            np.exp(od, out=od)
            od *= 256.0
            od -= 1.0
            np.rint(od, out=od)
            np.clip(od, 0, 255, out=od)
            out[start : start + step] = od
        return out.reshape(patches.shape)


@dataclass(frozen=True)
class MacenkoNormalizer(_StainMatrixNormalizer):
    """Per-slide Macenko normalisation: each pixel's H and E concentrations re-rendered with :data:`MACENKO_TARGET`.

    Optical density ``OD = -log((I + 1) / 256)`` (``I`` in 0-255; white is 0, black finite), inverted by
    ``I = 256 exp(-OD) - 1``. ``stain_matrix`` holds the slide's haematoxylin and eosin OD unit vectors (RGB
    order, haematoxylin first), ``max_conc`` the 99th percentile of each stain's concentration over the
    slide's tissue pixels. :meth:`fit` estimates the stain vectors as Macenko et al.: the plane of the two
    largest eigenvectors of the tissue pixels' OD covariance holds both stains; the :data:`MACENKO_ALPHA`
    and ``100 - alpha`` percentiles of the pixels' angles in that plane give the two stain vectors.
    """

    @classmethod
    def _stain_vectors(cls, od: np.ndarray) -> np.ndarray:
        _, vectors = np.linalg.eigh(np.cov(od, rowvar=False))  # eigenvalues ascending
        plane = vectors[:, [2, 1]]
        if plane[:, 0].sum() < 0:  # the main axis points into positive optical density, as the tissue does
            plane[:, 0] = -plane[:, 0]
        projected = od @ plane
        angles = np.arctan2(projected[:, 1], projected[:, 0])
        lo, hi = np.percentile(angles, [MACENKO_ALPHA, 100.0 - MACENKO_ALPHA])
        stains = np.stack([plane @ np.array([np.cos(a), np.sin(a)]) for a in (lo, hi)])
        stains /= np.linalg.norm(stains, axis=1, keepdims=True)
        return stains


@dataclass(frozen=True)
class HaematoxylinNormalizer(MacenkoNormalizer):
    """Macenko's separation, re-rendered with the haematoxylin alone (eosin left out): nuclei on white.

    Haematoxylin-channel features (``stain_norm="haematoxylin"``): the eosin, whose strength and hue vary most
    between labs, is not shown to the encoder; the nuclei (haematoxylin) are rendered with the target's
    haematoxylin vector and concentration range, as :class:`MacenkoNormalizer` renders them.
    """

    rendered: ClassVar[tuple[float, float]] = (1.0, 0.0)


def _sparse_codes(od: np.ndarray, stains: np.ndarray, lam: float) -> np.ndarray:
    """Per pixel, ``argmin_{c >= 0} ||od - c @ stains||^2 / 2 + lam * sum(c)``, exactly: ``(n, 2)``.

    Up to a constant the objective is ``c @ G @ c / 2 - c @ b`` (``G`` the stains' Gram matrix, ``b = od @
    stains.T - lam``). With two stains there are three candidate supports: each stain alone (``c_k =
    max(b_k, 0) / G_kk``, objective ``-c_k b_k / 2``) or both (``c = b G^-1``, objective ``-c @ b / 2``, when
    non-negative); the problem is convex, so the candidate of least objective is the minimum.
    """
    gram = stains @ stains.T
    b = od @ stains.T - lam
    alone = np.maximum(b, 0.0) / np.diag(gram)  # (n, 2): each stain alone
    objective = -0.5 * alone * b  # (n, 2)
    conc = np.where((objective[:, 0] <= objective[:, 1])[:, None], alone * [1.0, 0.0], alone * [0.0, 1.0])
    if np.linalg.det(gram) > 1e-12:  # two distinct stains
        both = b @ np.linalg.inv(gram)
        better = (both >= 0).all(axis=1) & (-0.5 * (both * b).sum(axis=1) < objective.min(axis=1))
        conc[better] = both[better]
    return conc


@dataclass(frozen=True)
class VahadaneNormalizer(_StainMatrixNormalizer):
    """Per-slide Vahadane normalisation: as :class:`MacenkoNormalizer`, with stain vectors from sparse NMF.

    Vahadane et al., "Structure-preserving color normalization and sparse stain separation for histological
    images", IEEE TMI 35(8), 2016. :meth:`fit` factorises the tissue pixels' optical density (a seeded sample
    of at most :data:`VAHADANE_FIT_PIXELS`) as ``OD ~ C @ W``: ``W`` the two stains' non-negative OD vectors
    (norm at most 1), ``C`` their non-negative concentrations with an L1 penalty :data:`VAHADANE_LAMBDA`
    (sparse: most pixels are mostly one stain). Alternating exact updates: every pixel's concentrations
    (:func:`_sparse_codes`), then each stain vector (non-negative least squares, projected on the unit ball),
    starting from two most dissimilar sample directions, until the vectors move less than :data:`VAHADANE_TOL`.
    Haematoxylin is the vector with the larger red-channel OD, as for Macenko (and StainTools' Vahadane). The
    concentration range and the re-rendering are :class:`MacenkoNormalizer`'s (least-squares concentrations
    against the fitted vectors, not the paper's sparse ones: one matrix product per pixel). Where most pixels
    mix both stains the sparse prior tilts the vectors (on synthetic independent H and E concentrations, eosin
    at cosine 0.98 to the truth, Macenko's 0.997); tissue, mostly nuclei or stroma, suits it better.
    """

    @classmethod
    def _stain_vectors(cls, od: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(VAHADANE_SEED)
        if len(od) > VAHADANE_FIT_PIXELS:
            od = od[np.sort(rng.choice(len(od), VAHADANE_FIT_PIXELS, replace=False))]
        directions = od / np.linalg.norm(od, axis=1, keepdims=True)
        first = directions[np.argmin(directions @ directions[rng.integers(len(od))])]
        stains = np.stack([first, directions[np.argmin(directions @ first)]])
        for _ in range(VAHADANE_ITERATIONS):
            conc = _sparse_codes(od, stains, VAHADANE_LAMBDA)
            cc, cx = conc.T @ conc, conc.T @ od  # (2, 2), (2, 3): all the stain update needs
            previous = stains.copy()
            for k in range(2):  # least squares of stain k given the other, projected on W >= 0, |W| <= 1
                vector = np.maximum(cx[k] - cc[k, 1 - k] * stains[1 - k], 0.0) / max(cc[k, k], 1e-12)
                norm = np.linalg.norm(vector)
                if cc[k, k] > 0 and norm > 0:  # a stain no pixel uses (or that would vanish) keeps its vector
                    stains[k] = vector / max(norm, 1.0)
            if np.abs(stains - previous).max() < VAHADANE_TOL:
                break
        return stains / np.linalg.norm(stains, axis=1, keepdims=True)
