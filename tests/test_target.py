"""The prediction target: identical to the dense reference formula, bad counts and duplicated genes refused."""

import numpy as np
import pytest
from scipy import sparse

import stexp
from stexp.pp._target import expression_target, log1p_cp10k, raw_counts


def _reference(X: np.ndarray) -> np.ndarray:
    """The formula as first written: dense, all genes, float64 then float32."""
    X = X.astype(np.float32)
    totals = X.sum(axis=1).astype(np.float64).reshape(-1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(totals > 0, X / totals * 1e4, 0.0)
    return np.log1p(scaled).astype(np.float32)


@pytest.fixture
def counts():
    rng = np.random.default_rng(0)
    X = rng.poisson(0.3, (300, 120)).astype(np.float32) * rng.integers(1, 50, (1, 120))
    X[7] = 0  # a spot without counts
    return X


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
def test_identical_to_dense_reference(synth, counts, fmt):
    import anndata as ad

    X = counts if fmt == "dense" else getattr(sparse, f"{fmt}_matrix")(counts)
    adata = ad.AnnData(X=X)
    adata.var_names = [f"G{i}" for i in range(counts.shape[1])]
    ref = _reference(counts)
    np.testing.assert_array_equal(expression_target(adata), ref)
    panel = ["G5", "G0", "G119", "G42"]
    np.testing.assert_array_equal(expression_target(adata, panel), ref[:, [5, 0, 119, 42]])
    assert expression_target(adata, panel).dtype == np.float32
    np.testing.assert_array_equal(log1p_cp10k(X), ref)
    assert (expression_target(adata)[7] == 0).all()


def test_input_not_modified(synth):
    before = synth.X.copy()
    expression_target(synth, list(synth.var_names[:5]))
    stexp.pp.normalize_target(synth)
    assert (synth.X != before).nnz == 0 and synth.X.dtype == before.dtype


def test_normalize_target_keeps_sparsity(synth):
    stexp.pp.normalize_target(synth)
    layer = synth.layers["log1p_cp10k"]
    assert sparse.issparse(layer) and layer.nnz == synth.X.nnz
    np.testing.assert_array_equal(layer.toarray(), _reference(synth.X.toarray()))
    dense = synth.copy()
    dense.X = dense.X.toarray()
    stexp.pp.normalize_target(dense)
    np.testing.assert_array_equal(dense.layers["log1p_cp10k"], layer.toarray())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_non_finite_counts_named(synth, bad, fmt):
    X = synth.X.toarray()
    X[3, 9] = bad
    X[4, 9] = bad
    synth.layers["counts"] = X if fmt == "dense" else sparse.csr_matrix(X)
    spot, gene = synth.obs_names[3], synth.var_names[9]
    with pytest.raises(
        ValueError,
        match=rf"adata.layers\['counts'\] contains 2 NaN or infinite values \(e.g. spot '{spot}', gene '{gene}'\)",
    ):
        expression_target(synth, list(synth.var_names[:3]), layer="counts")


def test_negative_counts_named(synth):
    X = synth.X.toarray()
    X[0, 1] = -4
    synth.X = sparse.csr_matrix(X)
    with pytest.raises(
        ValueError,
        match=rf"1 negative values \(min -4, e.g. spot '{synth.obs_names[0]}', gene '{synth.var_names[1]}'\)",
    ):
        raw_counts(synth)


def test_non_numeric_counts(synth):
    synth.layers["text"] = synth.X.toarray().astype(str)
    with pytest.raises(ValueError, match=r"adata.layers\['text'\] must hold numeric raw counts"):
        raw_counts(synth, "text")


def test_duplicated_genes_in_panel_lookup(synth):
    names = list(synth.var_names)
    names[10] = names[2]
    synth.var_names = names
    with pytest.raises(
        ValueError, match=rf"1 requested gene\(s\) appear more than once in adata.var_names: \['{names[2]}'\]"
    ):
        expression_target(synth, [names[0], names[2]])
    # genes that are not duplicated are still found, at their position
    X = synth.X.toarray()
    np.testing.assert_array_equal(expression_target(synth, [names[5], names[0]]), _reference(X)[:, [5, 0]])
    with pytest.raises(KeyError, match="'nope'"):
        expression_target(synth, [names[5], "nope"])
