"""A new neural model written as docs/extending.md shows (about 40 lines) trains, predicts, saves and loads."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from _features import mean_pcc, stat_features

import stexp

DOC = Path(__file__).parents[1] / "docs" / "extending.md"


@pytest.fixture(scope="module")
def linear_probe():
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    assert len(code.strip().splitlines()) <= 45  # "a new neural model in about 40 lines"
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    yield namespace["LinearProbe"]
    stexp.models._registry._REGISTRY.pop("linear_probe", None)


def test_the_documented_model_learns(linear_probe, tmp_path):
    adata = stexp.datasets.synthetic(n_slides=3, n_spots=100, n_genes=20, seed=2)
    key = stat_features(adata)
    train = adata[adata.obs["library_id"] != "slide_2"].copy()
    test = adata[adata.obs["library_id"] == "slide_2"].copy()
    model = stexp.tl.fit(train, model="linear_probe", features_key=key, validation="slide_1", device="cpu")
    assert isinstance(model, linear_probe)
    assert model.history["train_loss"][-1] < model.history["train_loss"][0]
    assert "val_loss" in model.history
    stexp.tl.predict(test, model)
    truth = stexp.pp._target.expression_target(test, model.genes)
    pred = stexp.tl.get_prediction(test, "stexp_pred", model.genes).to_numpy()
    assert mean_pcc(pred, truth) > 0.2  # the synthetic expression follows the image
    loaded = stexp.models.load(model.save(tmp_path / "probe"))
    stexp.tl.predict(test, loaded, key_added="again")
    np.testing.assert_allclose(stexp.tl.get_prediction(test, "again"), stexp.tl.get_prediction(test), atol=1e-6)
