import numpy as np
import pytest


def test_synthetic_layout(synth):
    from stexp._layout import library_ids, spot_diameter_um, um_per_px

    assert synth.n_obs == 3 * 144
    assert library_ids(synth) == ["slide_0", "slide_1", "slide_2"]
    for lib in library_ids(synth):
        entry = synth.uns["spatial"][lib]
        img = entry["images"]["hires"]
        assert img.dtype == np.uint8 and img.ndim == 3
        xy = synth[synth.obs.library_id == lib].obsm["spatial"]
        h, w = img.shape[:2]
        assert (xy[:, 0] > 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
        assert spot_diameter_um(synth, lib) == pytest.approx(55.0)
        assert um_per_px(synth, lib) == pytest.approx(2.0)
    assert set(synth.obs["domain"].cat.categories) == {"stroma", "tumour", "connective", "immune"}
    assert synth.X.dtype == np.float32
    assert np.allclose(synth.X.data, np.round(synth.X.data))


def test_synthetic_is_deterministic():
    import stexp

    a = stexp.datasets.synthetic(n_slides=2, n_spots=30, n_genes=10, seed=3)
    b = stexp.datasets.synthetic(n_slides=2, n_spots=30, n_genes=10, seed=3)
    c = stexp.datasets.synthetic(n_slides=2, n_spots=30, n_genes=10, seed=4)
    assert (a.X != b.X).nnz == 0
    np.testing.assert_array_equal(
        a.uns["spatial"]["slide_1"]["images"]["hires"], b.uns["spatial"]["slide_1"]["images"]["hires"]
    )
    assert (a.X != c.X).nnz > 0


def test_synthetic_domains_differ_in_image_and_expression(synth):
    """Expression follows the domains, and the domains look different: the data are learnable."""
    from stexp.pp._target import expression_target

    target = expression_target(synth)
    domain = synth.obs["domain"].to_numpy()
    means = np.stack([target[domain == d].mean(0) for d in np.unique(domain)])
    assert np.abs(means[:, None] - means[None]).max() > 1.0  # some gene differs by > e-fold between domains

    entry = synth.uns["spatial"]["slide_0"]
    img = entry["images"]["hires"].astype(float)
    sub = synth[synth.obs.library_id == "slide_0"]
    xy = np.round(sub.obsm["spatial"]).astype(int)
    colour = np.stack([img[y - 5 : y + 5, x - 5 : x + 5].mean((0, 1)) for x, y in xy])
    dom = sub.obs["domain"].to_numpy()
    per_domain = np.stack([colour[dom == d].mean(0) for d in np.unique(dom)])
    assert np.ptp(per_domain, axis=0).max() > 15  # domains differ in mean colour


def test_synthetic_bad_arguments():
    import stexp

    with pytest.raises(ValueError, match="n_domains"):
        stexp.datasets.synthetic(n_domains=9)
    with pytest.raises(ValueError, match="n_patients"):
        stexp.datasets.synthetic(n_slides=2, n_patients=3)
