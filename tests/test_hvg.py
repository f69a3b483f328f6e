"""select_hvg on bad input: duplicated genes and non-finite counts are refused, named; nothing is half-written."""

import numpy as np
import pytest
from scipy import sparse

import stexp


def _dup_genes(adata):
    names = list(adata.var_names)
    names[11] = names[4]
    adata.var_names = names
    return names[4]


def test_fixed_panel_and_protocol(synth):
    genes = list(synth.var_names[:6])
    stexp.pp.select_hvg(synth, genes=genes)
    assert list(synth.var_names[synth.var["stexp_panel"]]) == genes
    stexp.pp.select_hvg(synth, n_top_genes=20, key_added="hvg")
    assert 0 < synth.var["hvg"].sum() <= synth.n_vars


@pytest.mark.parametrize("fixed", [True, False])
def test_duplicated_var_names_refused(synth, fixed):
    gene = _dup_genes(synth)
    genes = list(synth.var_names[:6]) if fixed else None
    before = list(synth.var.columns)
    with pytest.raises(ValueError, match=rf"1 duplicated gene name\(s\), e.g. \['{gene}'\]"):
        stexp.pp.select_hvg(synth, genes=genes, n_top_genes=20)
    assert list(synth.var.columns) == before  # nothing written


def test_panel_naming_a_gene_twice(synth):
    g = synth.var_names[3]
    with pytest.raises(ValueError, match=rf"more than once: \['{g}'\]"):
        stexp.pp.select_hvg(synth, genes=[g, synth.var_names[0], g])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("fixed", [True, False])
def test_non_finite_counts_refused(synth, bad, fixed):
    X = synth.X.toarray()
    X[2, 5] = bad
    synth.layers["counts"] = sparse.csr_matrix(X)
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\] contains 1 NaN or infinite"):
        stexp.pp.select_hvg(synth, layer="counts", genes=list(synth.var_names[:4]) if fixed else None)
    assert "stexp_panel" not in synth.var


def test_missing_panel_gene(synth):
    with pytest.raises(KeyError, match="'nope'"):
        stexp.pp.select_hvg(synth, genes=["nope", synth.var_names[0]])
