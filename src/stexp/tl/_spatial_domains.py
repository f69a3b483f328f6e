"""The spatial part of ``stexp.tl.domains(spatial=λ)``: expression joined by its neighbourhood average (BANKSY-style)."""

from __future__ import annotations

import numpy as np

from stexp._layout import library_labels, library_mask, spot_coords, um_per_px


def spot_coords_um(adata, library_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Spot centres in µm and the library of every spot."""
    libs = library_labels(adata, library_key)
    xy = np.asarray(spot_coords(adata), dtype=np.float64)
    out = np.empty_like(xy)
    for lib in dict.fromkeys(libs):
        m = library_mask(adata, lib, library_key)
        out[m] = xy[m] * um_per_px(adata, lib)
    return out, libs


def with_neighbourhood(adata, Z: np.ndarray, lam: float, *, library_key: str) -> np.ndarray:
    """``[sqrt(1 - λ) Z, sqrt(λ) W Z]`` with ``W`` the Gaussian average over same-slide spots, σ = the spot pitch."""
    from stexp.models._neighbors import spot_pitch
    from stexp.models._smoothing import smooth

    coords, libs = spot_coords_um(adata, library_key)
    pitch = spot_pitch(coords, libs)
    if not np.isfinite(pitch):  # no pair of spots on any slide: nothing to average
        return Z
    neighbourhood = smooth(np.asarray(Z, dtype=np.float64), coords, libs, pitch)
    return np.hstack([np.sqrt(1.0 - lam) * Z, np.sqrt(lam) * neighbourhood])
