"""Features and counts that live on disk: a backed AnnData (counts read by chunks) with memory-mapped features."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import stexp
from stexp.tl import _inputs


@pytest.fixture
def on_disk(synth, tmp_path, monkeypatch):
    from _features import stat_features

    key = stat_features(synth)
    synth.write_h5ad(tmp_path / "a.h5ad")
    np.save(tmp_path / "f.npy", np.asarray(synth.obsm[key], dtype=np.float32))
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    backed.obsm[key] = np.load(tmp_path / "f.npy", mmap_mode="r")
    monkeypatch.setattr(_inputs, "CHUNK_ROWS", 100)  # several chunks on 432 spots
    return synth, backed, key


def test_spot_data_reads_counts_by_chunks_and_keeps_features_on_disk(on_disk):
    memory, backed, key = on_disk
    assert backed.isbacked
    genes = memory.var_names[:30].tolist()
    a = _inputs.spot_data(memory, features_key=key, library_key="library_id", genes=genes)
    b = _inputs.spot_data(backed, features_key=key, library_key="library_id", genes=genes)
    np.testing.assert_array_equal(a.target, b.target)
    np.testing.assert_array_equal(a.depth, b.depth)
    assert isinstance(b.features, np.memmap)  # not copied into memory
    assert np.shares_memory(b.subset(np.ones(b.n_spots, dtype=bool)).features, b.features)


def test_fit_predict_cross_validate_on_a_backed_anndata(on_disk):
    memory, backed, key = on_disk
    genes = memory.var_names[:30].tolist()
    m_mem = stexp.tl.fit(memory, features_key=key, genes=genes, model="knn", k=20)
    m_disk = stexp.tl.fit(backed, features_key=key, genes=genes, model="knn", k=20)
    np.testing.assert_array_equal(m_mem.bank_target_, m_disk.bank_target_)
    query = memory.copy()
    stexp.tl.predict(query, m_mem)
    stexp.tl.predict(backed, m_disk)  # the prediction of a backed AnnData is written in memory beside it
    np.testing.assert_array_equal(
        stexp.tl.get_prediction(query, genes=genes), stexp.tl.get_prediction(backed, genes=genes)
    )
    cv_mem = stexp.tl.cross_validate(memory, features_key=key, genes=genes, model="knn", k=20)
    cv_disk = stexp.tl.cross_validate(backed, features_key=key, genes=genes, model="knn", k=20)
    np.testing.assert_allclose(cv_mem.per_fold["pcc_acg"], cv_disk.per_fold["pcc_acg"])


def test_bad_counts_on_disk_are_named(synth, tmp_path, monkeypatch):
    from _features import stat_features

    key = stat_features(synth)
    synth.X = synth.X.toarray().astype(np.float32)
    synth.X[300, 2] = np.nan
    synth.write_h5ad(tmp_path / "bad.h5ad")
    backed = ad.read_h5ad(tmp_path / "bad.h5ad", backed="r")
    monkeypatch.setattr(_inputs, "CHUNK_ROWS", 100)
    with pytest.raises(ValueError, match="NaN or infinite"):
        _inputs.spot_data(backed, features_key=key, library_key="library_id", genes=synth.var_names[:5].tolist())
