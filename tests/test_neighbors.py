import numpy as np
import pytest

from stexp.models._neighbors import knn_hypergraph, neighborhoods, spatial_neighbors


def _hex_grid(n_rows: int, n_cols: int, pitch: float = 100.0) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    x = (2 * cols + rows % 2) * pitch / 2
    y = rows * pitch * np.sqrt(3) / 2
    return np.column_stack([x.ravel(), y.ravel()]).astype(float)


def _brute_force_distances(coords, library, k):
    """Sorted distances to the k nearest other spots of the same slide (inf where fewer exist)."""
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    d[library[:, None] != library[None]] = np.inf
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :k]


def test_matches_brute_force_on_jittered_slides():
    rng = np.random.default_rng(0)
    coords = np.concatenate([rng.uniform(0, 1000, (60, 2)), rng.uniform(0, 1000, (45, 2))])
    library = np.array(["a"] * 60 + ["b"] * 45, dtype=object)
    idx, mask = spatial_neighbors(coords, library, k=8)
    assert idx.shape == (105, 8) and mask.all()
    got = np.linalg.norm(coords[idx] - coords[:, None], axis=-1)
    np.testing.assert_allclose(got, _brute_force_distances(coords, library, 8))
    assert (np.diff(got, axis=1) >= 0).all()  # nearest first
    # with random coordinates there are no ties: the indices themselves match
    d = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    d[library[:, None] != library[None]] = np.inf
    np.fill_diagonal(d, np.inf)
    np.testing.assert_array_equal(idx, np.argsort(d, axis=1)[:, :8])


def test_no_self_and_no_neighbours_across_slides():
    coords = np.concatenate([_hex_grid(5, 5), _hex_grid(5, 5)])  # identical positions on two slides
    library = np.array(["s0"] * 25 + ["s1"] * 25)
    idx, mask = spatial_neighbors(coords, library, k=8)
    assert mask.all()
    assert (library[idx] == library[:, None]).all()
    assert (idx != np.arange(50)[:, None]).all()
    assert all(len(set(row)) == 8 for row in idx)


def test_hex_grid_interior_and_border():
    coords = _hex_grid(7, 7)
    library = np.zeros(len(coords), dtype=int)
    idx, mask = spatial_neighbors(coords, library, k=6)
    dist = np.linalg.norm(coords[idx] - coords[:, None], axis=-1)
    centre = 3 * 7 + 3
    np.testing.assert_allclose(dist[centre], 100.0)  # interior: the six hexagonal neighbours
    corner = 0
    assert mask[corner].all()  # a corner spot still gets 6 neighbours: its nearest ones, farther away
    assert dist[corner].max() > 100.0
    np.testing.assert_allclose(dist, _brute_force_distances(coords, library, 6))


def test_small_slides_are_padded_and_masked():
    coords = np.array([[0, 0], [100, 0], [0, 100], [500, 500], [900, 900.0]])
    library = np.array(["big", "big", "big", "single", "big"])
    idx, mask = spatial_neighbors(coords, library, k=8)
    assert idx.shape == (5, 8)
    # 'big' has 4 spots: each gets the 3 others, then padding holding its own index
    for i in (0, 1, 2, 4):
        assert mask[i].sum() == 3
        assert set(idx[i, mask[i]]) == {0, 1, 2, 4} - {i}
        assert (idx[i, ~mask[i]] == i).all()
    # a one-spot slide: only itself
    assert not mask[3].any() and (idx[3] == 3).all()
    nodes, node_mask = neighborhoods(coords, library, k=8)
    assert nodes.shape == (5, 9) and (nodes[:, 0] == np.arange(5)).all() and node_mask[:, 0].all()
    assert node_mask[3].sum() == 1


def test_duplicate_centres_never_give_the_spot_itself():
    coords = np.zeros((5, 2))  # five spots at one centre (e.g. duplicated barcodes)
    idx, mask = spatial_neighbors(coords, np.zeros(5), k=2)
    assert mask.all()
    assert (idx != np.arange(5)[:, None]).all()


def test_k_zero_and_bad_input():
    coords = _hex_grid(3, 3)
    idx, mask = spatial_neighbors(coords, np.zeros(9), k=0)
    assert idx.shape == (9, 0) and mask.shape == (9, 0)
    with pytest.raises(ValueError, match="shape"):
        spatial_neighbors(coords[:, :1], np.zeros(9))
    with pytest.raises(ValueError, match="library"):
        spatial_neighbors(coords, np.zeros(8))
    bad = coords.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        spatial_neighbors(bad, np.zeros(9))
    with pytest.raises(ValueError, match="non-negative"):
        spatial_neighbors(coords, np.zeros(9), k=-1)


def test_knn_hypergraph():
    coords = np.array([[0, 0], [100, 0], [0, 100], [1000, 1000], [100, 100.0]])
    library = np.array(["a", "a", "a", "b", "a"])
    nodes, node_mask = neighborhoods(coords, library, k=4)  # 'a' has 4 spots -> one padding node
    H = knn_hypergraph(coords, nodes, node_mask, k=2)
    assert H.shape == (5, 5, 5)
    s = 0
    real = node_mask[s]
    assert real.sum() == 4
    # each real node centres a hyperedge of itself + its 2 nearest real nodes
    np.testing.assert_array_equal(H[s][:, real].sum(axis=0), 3)
    assert np.diag(H[s])[real].all()
    # padding belongs to no hyperedge and spans an empty one
    assert H[s][~real].sum() == 0 and H[s][:, ~real].sum() == 0
    # members are the nearest ones: in spot 0's neighbourhood, the hyperedge of spot 0 holds spots 1 and 2
    members = nodes[s][H[s][:, 0] > 0]
    assert set(members) == {0, 1, 2}
    # the one-spot slide: a single hyperedge holding only itself
    assert H[3].sum() == 1 and H[3][0, 0] == 1
