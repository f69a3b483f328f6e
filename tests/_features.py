"""Cheap, deterministic image features for tests (no encoder): colour and texture statistics around each spot.

``clustered_unit_rows(n)`` gives synthetic feature rows for retrieval tests.

``stat_features(adata)`` writes ``adata.obsm[key]`` and a feature spec in
``adata.uns["stexp"]["features"][key]`` (``encoder="test_stats"``), as :func:`stexp.pp.embed_images` would.
"""

from __future__ import annotations

import numpy as np

from stexp._layout import library_ids, library_mask, scalefactors, spatial_entry, um_per_px

STATS_KEY = "X_test_stats"
STATS_ENCODER = "test_stats"


def stat_features(adata, *, key: str = STATS_KEY, patch_um: float = 50.0, library_key: str = "library_id") -> str:
    """Per-spot statistics of a square window of side ``patch_um`` in the hires image.

    Features (12): mean RGB, std RGB, 10th percentile RGB, fraction of dark pixels (grey < 0.5),
    grey std, and blue-minus-green (haematoxylin-ish) mean.

    Returns
    -------
    The ``obsm`` key written.
    """
    feats = np.zeros((adata.n_obs, 12), dtype=np.float32)
    for lib in library_ids(adata, library_key):
        m = library_mask(adata, lib, library_key)
        img = spatial_entry(adata, lib)["images"]["hires"].astype(np.float32) / 255
        scale = float(scalefactors(adata, lib)["tissue_hires_scalef"])
        half = max(1, int(round(patch_um / um_per_px(adata, lib) * scale / 2)))
        rows = []
        for x, y in np.round(np.asarray(adata.obsm["spatial"])[m] * scale).astype(int):
            p = img[max(0, y - half) : y + half, max(0, x - half) : x + half].reshape(-1, 3)
            grey = p.mean(1)
            extra = [(grey < 0.5).mean(), grey.std(), (p[:, 2] - p[:, 1]).mean()]
            rows.append(np.concatenate([p.mean(0), p.std(0), np.percentile(p, 10, axis=0), extra]))
        feats[m] = np.asarray(rows)
    adata.obsm[key] = feats
    adata.uns.setdefault("stexp", {}).setdefault("features", {})[key] = {
        "encoder": STATS_ENCODER,
        "weights": "none",
        "patch_um": float(patch_um),
        "patch_px": 0,
        "normalization": "none",
    }
    return key


def mean_pcc(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean per-gene Pearson r between predicted and true ``(spots, genes)``, over genes that vary in the truth."""
    keep = truth.std(0) > 0
    return float(np.mean([np.corrcoef(pred[:, g], truth[:, g])[0, 1] for g in np.flatnonzero(keep)]))


def clustered_unit_rows(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    """``n`` unit rows of ``d`` dimensions around 12 fixed centres (a bank or queries for retrieval tests)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 3, (12, d))
    x = centres[rng.integers(0, 12, n)] + rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
