import numpy as np
import pytest
from PIL import Image

import stexp


def _slide(h=300, w=400, seed=0):
    """Glass (near white) with a pink tissue rectangle over x in [100, 300), y in [50, 250)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 245, dtype=np.uint8)
    img[50:250, 100:300] = (215, 140, 190)
    return np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)


def test_grid_spots_cover_tissue_only():
    adata = stexp.io.grid_spots(_slide(), um_per_px=2.0, spacing_um=40.0, spot_diameter_um=20.0, genes=["A", "B"])
    xy = adata.obsm["spatial"]
    assert adata.n_obs > 50
    assert (xy[:, 0] > 90).all() and (xy[:, 0] < 310).all() and (xy[:, 1] > 40).all() and (xy[:, 1] < 260).all()
    # hexagonal pitch: nearest neighbours 40 µm = 20 px apart
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    np.testing.assert_allclose(np.median(d[:, 1]), 20.0, rtol=1e-6)
    assert list(adata.var_names) == ["A", "B"] and adata.X.nnz == 0 and adata.X.format == "csr"
    assert adata.uns["stexp"]["unmeasured"] is True
    assert (adata.obs["in_tissue"] == 1).all() and (adata.obs["tissue_fraction"] >= 0.5).all()
    assert stexp._layout.um_per_px(adata, "slide") == 2.0
    table = stexp.io.validate(adata)
    assert table.loc["slide", "n_outside_image"] == 0 and table.loc["slide", "spot_diameter_um"] == 20.0


def test_grid_spots_from_path_and_threshold(tmp_path):
    path = tmp_path / "he.png"
    Image.fromarray(_slide()).save(path)
    from_file = stexp.io.grid_spots(path, um_per_px=2.0, spacing_um=40.0, spot_diameter_um=20.0)
    from_array = stexp.io.grid_spots(_slide(), um_per_px=2.0, spacing_um=40.0, spot_diameter_um=20.0)
    assert from_file.n_obs == from_array.n_obs
    assert from_file.uns["spatial"]["slide"]["metadata"]["source_image_path"] == str(path.resolve())
    with pytest.raises(ValueError, match="no grid spot"):
        stexp.io.grid_spots(path, um_per_px=2.0, tissue_threshold=0.99)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        stexp.io.grid_spots(tmp_path / "missing.png", um_per_px=2.0)
    with pytest.raises(ValueError, match="plausible range"):
        stexp.io.grid_spots(path, um_per_px=2000.0)


def test_pale_tissue_beside_dark_tissue_is_kept():
    """On a field without glass Otsu alone splits dark from pale tissue; the capped threshold keeps the stroma."""
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    img = np.full((300, 400, 3), (90, 50, 140), dtype=np.uint8)  # a field that is all tissue: dark, saturated
    img[100:200, 280:380] = (230, 170, 200)  # and pale pink stroma, saturation ~0.26
    sat = rgb2hsv(img)[..., 1]
    assert threshold_otsu(sat) >= sat[150, 330]  # the uncapped threshold (tissue: sat > t) would drop the stroma
    adata = stexp.io.grid_spots(img, um_per_px=2.0, spacing_um=40.0, spot_diameter_um=20.0)
    x = adata.obsm["spatial"][:, 0]
    assert (x > 280).sum() >= 8  # spots on the stroma
    assert adata.uns["stexp"]["grid_spots"]["tissue_threshold"] == pytest.approx(0.2)
