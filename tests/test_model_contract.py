"""One contract for every registered model: fit -> predict -> save -> load -> the same predictions.

Also: a model refuses data of another gene panel or another image encoder, ``device`` is never saved,
and fitting on a view leaves its parent untouched.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from _features import stat_features

import stexp

#: Small settings so that every model trains in a second or two on the synthetic slides.
FAST = {
    "knn": {"k": 5},
    "mlp": {"max_epochs": 3},
    "mclstexp": {
        "max_epochs": 2,
        "top_k": 5,
        "batch_size": 32,
        "projection_dim": 16,
        "n_layers": 1,
        "n_heads": 2,
        "head_dim": 8,
    },
    "nh2st": {"max_epochs": 2, "dim": 16, "n_heads": 2, "batch_size": 32},
}
FAST["mclstexp_plus"] = FAST["mclstexp"]
BUILTIN = ["mean", "ridge", "knn", "mlp", "mclstexp", "mclstexp_plus", "nh2st"]


@pytest.fixture(scope="module")
def data():
    adata = stexp.datasets.synthetic(n_slides=3, n_spots=64, n_genes=24, seed=4)
    key = stat_features(adata)
    stexp.settings.verbosity = 1
    return adata, key


def _snapshot(adata):
    return (
        adata.X.toarray().copy(),
        adata.obs.copy(),
        {k: np.asarray(v).copy() for k, v in adata.obsm.items()},
        sorted(adata.uns),
        sorted(adata.uns.get("stexp", {})),
        list(adata.layers),
    )


def _same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1].equals(b[1])
    assert a[2].keys() == b[2].keys() and all(np.array_equal(a[2][k], b[2][k]) for k in a[2])
    assert a[3:] == b[3:]


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_model_is_registered(name):
    assert name in SHIPPED
    assert stexp.models.get_model_class(name).name == name


#: Every model stexp registers (test modules register spies of their own; they are not models to ship).
SHIPPED = [
    n for n in stexp.models.available_models() if stexp.models.get_model_class(n).__module__.startswith("stexp.")
]


@pytest.mark.parametrize("name", SHIPPED)
def test_contract(name, data, tmp_path):
    adata, key = data
    parent = adata.copy()
    before = _snapshot(parent)
    train = parent[parent.obs["library_id"] != "slide_2"]  # a view
    assert train.is_view
    model = stexp.tl.fit(train, model=name, features_key=key, device="cpu", **FAST.get(name, {}))
    _same(before, _snapshot(parent))  # fitting on a view changes neither the view nor its parent
    assert train.is_view
    assert "device" not in model.hparams and "num_workers" not in model.hparams

    test = adata[adata.obs["library_id"] == "slide_2"].copy()
    stexp.tl.predict(test, model, device="cpu")
    first = test.layers["stexp_pred"].copy()
    panel = test.var_names.get_indexer(model.genes)
    assert np.isfinite(first[:, panel]).all()

    path = model.save(tmp_path / name)
    config = json.loads((path / "model.json").read_text())
    assert "device" not in config["hparams"]
    loaded = stexp.models.load(path, device="cpu")
    assert type(loaded) is type(model) and loaded.genes == model.genes
    stexp.tl.predict(test, loaded, key_added="again")
    np.testing.assert_allclose(test.layers["again"], first, rtol=0, atol=1e-6, equal_nan=True)

    # another gene panel or another image encoder is refused, naming what differs
    with pytest.raises(ValueError, match="genes"):
        stexp.models.load(path, genes=model.genes[:-1])
    other = test.copy()
    other.uns["stexp"]["features"][key] = {**other.uns["stexp"]["features"][key], "patch_um": 999.0}
    with pytest.raises(ValueError, match="patch_um"):
        stexp.tl.predict(other, loaded)
    wide = test.copy()
    wide.obsm["wide"] = np.hstack([wide.obsm[key], wide.obsm[key]])
    with pytest.raises(ValueError, match="dimensional image features"):
        stexp.tl.predict(wide, loaded, features_key="wide")
