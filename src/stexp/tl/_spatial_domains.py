"""The spatial part of ``stexp.tl.domains(spatial=λ)``: expression joined by its neighbourhood average (BANKSY-style)."""

from __future__ import annotations

import numpy as np

from stexp._layout import library_labels, library_mask, spot_coords, um_per_px


def spot_coords_um(adata, library_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Spot centres in µm and the library of every spot.

    Raises
    ------
    ValueError
        If some spot centres (``adata.obsm["spatial"]``) are NaN or infinite: their number and names.
    """
    libs = library_labels(adata, library_key)
    xy = np.asarray(spot_coords(adata), dtype=np.float64)
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        names = adata.obs_names[bad][:5].tolist()
        raise ValueError(
            f"adata.obsm['spatial'] holds NaN or infinite centres for {int(bad.sum())} of {adata.n_obs} spots, e.g. "
            f"{names}; spatial=0 ignores coordinates, else drop those spots (adata[np.isfinite("
            "adata.obsm['spatial']).all(axis=1)]) or fix their centres."
        )
    out = np.empty_like(xy)
    for lib in dict.fromkeys(libs):
        m = library_mask(adata, lib, library_key)
        out[m] = xy[m] * um_per_px(adata, lib)
    return out, libs


def with_neighbourhood(Z: np.ndarray, lam: float, coords: np.ndarray, libs: np.ndarray) -> np.ndarray:
    """``[sqrt(1 - λ) Z, sqrt(λ) W Z]`` with ``W`` the Gaussian average over same-slide spots, σ = the spot pitch.

    ``coords`` (µm) and ``libs`` as :func:`spot_coords_um` gives them.
    """
    from stexp.models._neighbors import spot_pitch
    from stexp.models._smoothing import smooth

    pitch = spot_pitch(coords, libs)
    if not np.isfinite(pitch):  # no pair of spots on any slide: nothing to average
        return Z
    neighbourhood = smooth(np.asarray(Z, dtype=np.float64), coords, libs, pitch)
    return np.hstack([np.sqrt(1.0 - lam) * Z, np.sqrt(lam) * neighbourhood])
