"""A synthetic, Visium-like multi-slide dataset whose expression can be learnt from its images."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from stexp._layout import PLATFORMS

if TYPE_CHECKING:
    from anndata import AnnData

#: H&E-like appearance of each tissue domain: (stroma RGB, nuclei RGB, nuclei density, nucleus radius px, fibre strength)
_DOMAIN_STYLES = [
    ((238, 170, 200), (70, 30, 120), 0.004, 2.0, 0.0),  # sparse stroma: pink, few small nuclei
    ((215, 140, 190), (60, 20, 110), 0.030, 2.5, 0.0),  # dense tumour: purple, many nuclei
    ((245, 205, 215), (90, 50, 140), 0.010, 1.5, 0.6),  # fibrous connective tissue: pale, striated
    ((200, 120, 170), (40, 10, 90), 0.060, 1.2, 0.0),  # immune infiltrate: many small dark nuclei
    ((250, 230, 235), (120, 80, 160), 0.002, 3.0, 0.3),  # adipose-like: very pale, large sparse nuclei
    ((225, 150, 175), (80, 40, 100), 0.018, 3.5, 0.2),  # glandular: large nuclei
]
_DOMAIN_NAMES = ["stroma", "tumour", "connective", "immune", "adipose", "gland"]


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """A zero-mean, unit-variance random field, smooth on the scale ``sigma`` (pixels).

    Drawn on a grid ``sigma / 4`` coarser than ``shape`` and interpolated up, which keeps large
    ``sigma`` cheap.
    """
    from scipy import ndimage

    step = max(1, int(sigma // 4))
    coarse_shape = (shape[0] // step + 2, shape[1] // step + 2)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), sigma=sigma / step, mode="reflect")
    field = ndimage.zoom(coarse, step, order=1)[: shape[0], : shape[1]]
    return (field - field.mean()) / (field.std() + 1e-12)


def _hex_grid(n_spots: int) -> tuple[np.ndarray, np.ndarray]:
    """Visium-style array coordinates (row, col) of ``n_spots`` spots on a hexagonal grid."""
    n_rows = int(np.ceil(np.sqrt(n_spots)))
    n_cols = int(np.ceil(n_spots / n_rows))
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rows.ravel()[:n_spots], cols.ravel()[:n_spots]
    return rows, 2 * cols + (rows % 2)


def _render_slide(
    rng: np.random.Generator,
    shape: tuple[int, int],
    domain_map: np.ndarray,
    gradient: np.ndarray,
    tissue: np.ndarray,
    stain_shift: np.ndarray,
) -> np.ndarray:
    """Render an H&E-like RGB image: per-domain stroma colour, nuclei and fibres; glass outside tissue."""
    from scipy import ndimage

    h, w = shape
    img = np.empty((h, w, 3), dtype=np.float32)
    nuclei = np.zeros((h, w), dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for d in np.unique(domain_map):
        stroma_rgb, nucleus_rgb, density, radius, fibre = _DOMAIN_STYLES[d]
        mask = domain_map == d
        img[mask] = stroma_rgb
        # Nuclear density follows the smooth gradient, so the gradient is visible in the image too.
        local_density = density * np.exp(0.6 * gradient)
        seeds = (rng.random((h, w)) < local_density) & mask
        blobs = ndimage.gaussian_filter(seeds.astype(np.float32), sigma=radius) * (2 * np.pi * radius**2)
        nuclei = np.where(mask, np.clip(blobs, 0, 1), nuclei)
        if fibre > 0:
            stripes = 0.5 + 0.5 * np.sin((xx + 0.6 * yy) / 3.0 + 2 * rng.random())
            img[mask] = img[mask] * (1 - 0.15 * fibre * stripes[mask, None])
        img[mask] = img[mask] * (1 - nuclei[mask, None]) + np.asarray(nucleus_rgb) * nuclei[mask, None]
    img += stain_shift
    img += rng.normal(0, 6, size=img.shape)
    img[~tissue] = (245, 245, 245)
    img[~tissue] += rng.normal(0, 2, size=((~tissue).sum(), 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic(
    n_slides: int = 3,
    n_spots: int = 256,
    n_genes: int = 100,
    *,
    n_domains: int = 4,
    um_per_px: float = 2.0,
    n_patients: int | None = None,
    seed: int = 0,
) -> AnnData:
    """A small multi-slide, Visium-like dataset with H&E-like images and learnable expression.

    Each slide is a hexagonal grid of 55 µm spots at 100 µm pitch over a tissue whose domains
    (``obs["domain"]``) differ in colour and texture (nuclear density and size, fibres). Expression
    follows the same domains plus a smooth spatial gradient that also modulates nuclear density,
    so a model that sees the image patch can predict expression. Domain programs, appearance and
    gradient loadings are shared across slides; domain layouts, library sizes and a small stain
    shift differ per slide.

    Parameters
    ----------
    n_slides
        Number of slides (libraries).
    n_spots
        Spots per slide.
    n_genes
        Number of genes.
    n_domains
        Number of tissue domains (at most 6).
    um_per_px
        Pixel size of the generated images in µm (coarse by default to keep the data small).
    n_patients
        Number of patients the slides are spread over (``obs["patient"]``); default: one per slide.
    seed
        Random seed; the data are deterministic for a seed.

    Returns
    -------
    AnnData with raw counts in ``X`` (sparse), ``obs[["library_id", "patient", "domain",
    "array_row", "array_col"]]``, ``obsm["spatial"]`` (full-resolution px) and the images with
    their scale factors in ``uns["spatial"]``.
    """
    import anndata as ad
    from scipy import sparse

    if not 1 <= n_domains <= len(_DOMAIN_STYLES):
        raise ValueError(f"n_domains must be between 1 and {len(_DOMAIN_STYLES)}, got {n_domains}.")
    if n_slides < 1 or n_spots < 1 or n_genes < 1:
        raise ValueError(f"n_slides, n_spots and n_genes must be positive, got {n_slides}, {n_spots}, {n_genes}.")
    n_patients = n_slides if n_patients is None else n_patients
    if not 1 <= n_patients <= n_slides:
        raise ValueError(f"n_patients must be between 1 and n_slides={n_slides}, got {n_patients}.")

    rng = np.random.default_rng(seed)
    geometry = PLATFORMS["visium"]
    pitch_px = geometry["pitch_um"] / um_per_px
    diameter_px = geometry["spot_diameter_um"] / um_per_px
    margin_px = int(round(150 / um_per_px))

    # Shared biology: per-domain expression programs and a smooth-gradient loading per gene.
    base = rng.normal(0.0, 1.0, n_genes) - 1.0
    programs = rng.normal(0.0, 1.2, (n_domains, n_genes)) * (rng.random((n_domains, n_genes)) < 0.4)
    gradient_loading = rng.normal(0.0, 0.5, n_genes) * (rng.random(n_genes) < 0.5)
    genes = [f"gene_{i:03d}" for i in range(n_genes)]

    adatas = []
    for s in range(n_slides):
        lib = f"slide_{s}"
        array_row, array_col = _hex_grid(n_spots)
        x = margin_px + array_col * pitch_px / 2
        y = margin_px + array_row * pitch_px * np.sqrt(3) / 2
        h = int(np.ceil(y.max() + margin_px))
        w = int(np.ceil(x.max() + margin_px))

        # Domains: argmax over smooth random fields (blob-shaped regions ~ several spots wide).
        fields = np.stack([_smooth_field(rng, (h, w), sigma=2.5 * pitch_px) for _ in range(n_domains)])
        domain_map = fields.argmax(axis=0)
        gradient = _smooth_field(rng, (h, w), sigma=4 * pitch_px)
        yy, xx = np.mgrid[0:h, 0:w]
        tissue = (
            (xx > x.min() - 0.6 * margin_px)
            & (xx < x.max() + 0.6 * margin_px)
            & (yy > y.min() - 0.6 * margin_px)
            & (yy < y.max() + 0.6 * margin_px)
        )
        stain_shift = rng.normal(0, 5, size=3)
        image = _render_slide(rng, (h, w), domain_map, gradient, tissue, stain_shift)

        iy, ix = np.round(y).astype(int), np.round(x).astype(int)
        spot_domain = domain_map[iy, ix]
        spot_gradient = gradient[iy, ix]
        log_mu = base + programs[spot_domain] + gradient_loading * spot_gradient[:, None]
        library_size = rng.lognormal(np.log(3000), 0.3, n_spots)
        rate = np.exp(log_mu)
        rate = rate / rate.sum(axis=1, keepdims=True) * library_size[:, None] * (n_genes / 1000 + 0.9)
        counts = rng.poisson(rng.gamma(shape=10.0, scale=rate / 10.0))  # negative binomial

        obs = pd.DataFrame(
            {
                "library_id": lib,
                "patient": f"patient_{s % n_patients}",
                "domain": pd.Categorical.from_codes(spot_domain, categories=_DOMAIN_NAMES[:n_domains]),
                "array_row": array_row.astype(np.int64),
                "array_col": array_col.astype(np.int64),
                "in_tissue": 1,
            },
            index=[f"{lib}_{r}x{c}" for r, c in zip(array_row, array_col, strict=True)],
        )
        lowres_scalef = 0.25
        lowres = image[:: int(1 / lowres_scalef), :: int(1 / lowres_scalef)].copy()
        spatial = {
            lib: {
                "images": {"hires": image, "lowres": lowres},
                "scalefactors": {
                    "tissue_hires_scalef": 1.0,
                    "tissue_lowres_scalef": lowres_scalef,
                    "spot_diameter_fullres": float(diameter_px),
                    "microns_per_pixel": float(um_per_px),
                    "spot_diameter_um": geometry["spot_diameter_um"],
                },
                "metadata": {"source": "stexp.datasets.synthetic", "seed": seed},
            }
        }
        a = ad.AnnData(
            X=sparse.csr_matrix(counts.astype(np.float32)),
            obs=obs,
            var=pd.DataFrame(index=genes),
            obsm={"spatial": np.column_stack([x, y]).astype(np.float64)},
            uns={"spatial": spatial},
        )
        adatas.append(a)

    adata = ad.concat(adatas, uns_merge="unique", merge="same")
    for col in ("library_id", "patient"):
        adata.obs[col] = pd.Categorical(adata.obs[col])
    adata.obs["domain"] = pd.Categorical(adata.obs["domain"], categories=_DOMAIN_NAMES[:n_domains])
    adata.uns["stexp_synthetic"] = {
        "seed": seed,
        "n_domains": n_domains,
        "um_per_px": um_per_px,
        "description": "Synthetic Visium-like data: domains in obs['domain'], learnable from the images.",
    }
    return adata
