"""End-to-end fine-tuning of the image encoder (finetune_encoder=True) on a CPU, for both contrastive models."""

import numpy as np
import pytest
import torch

import stexp
from stexp.images import build_encoder

pytest.importorskip("timm")

ENCODER = "timm:test_resnet"  # a 0.4M-parameter timm ResNet (160 px): fast enough to train on a CPU
KEY = "X_stexp_test_resnet"
SMALL = {
    "mclstexp": {"projection_dim": 32, "n_heads": 2, "head_dim": 16, "top_k": 10},
    "nh2st": {"dim": 32, "n_heads": 4, "n_neighbors": 4},
}


@pytest.fixture(scope="module")
def start_weights(tmp_path_factory):
    """A fixed starting point for the encoder (a local weights file), so the test can tell training moved it."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.pt"
    torch.save(build_encoder(ENCODER, weights=None).module.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def tiny(start_weights):
    adata = stexp.datasets.synthetic(n_slides=3, n_spots=48, n_genes=20, seed=1)
    stexp.pp.embed_images(adata, encoder=ENCODER, weights=start_weights, key_added=KEY, cache=False)
    return adata


def _split(adata):
    is_test = (adata.obs["library_id"] == "slide_2").to_numpy()
    return adata[~is_test].copy(), adata[is_test].copy()


def _fit(adata, model, **kwargs):
    params = {"max_epochs": 2, "batch_size": 32, "lr": 1e-3, "device": "cpu", "seed": 0, **SMALL[model], **kwargs}
    return stexp.tl.fit(adata, model=model, features_key=KEY, finetune_encoder=True, **params)


@pytest.mark.parametrize("model", ["mclstexp", "nh2st"])
def test_finetuned_encoder_trains_predicts_saves_and_loads(tiny, start_weights, model, tmp_path):
    train, test = _split(tiny)
    est = _fit(train, model)
    assert est.reads_patches
    assert len(est.history["train_loss"]) == 2 and np.isfinite(est.history["train_loss"]).all()

    # the encoder itself was trained: its weights left the starting point
    start = build_encoder(ENCODER, weights=start_weights).module.state_dict()
    tuned = est.encoder.module.state_dict()
    assert any(not torch.equal(start[k], tuned[k]) for k in start if start[k].is_floating_point())

    # prediction embeds the patches with the fine-tuned encoder; obsm features are not needed
    del test.obsm[KEY]
    stexp.tl.predict(test, est)
    pred = test.layers["stexp_pred"]
    assert pred.shape == test.shape and np.isfinite(pred).all()
    assert test.uns["stexp"]["stexp_pred"]["fine_tuned_encoder"] is True

    # the saved model holds the encoder's weights and predicts the same after loading
    est.save(tmp_path / "m")
    loaded = stexp.models.load(tmp_path / "m")
    assert loaded.reads_patches
    again = test.copy()
    stexp.tl.predict(again, loaded)
    np.testing.assert_allclose(again.layers["stexp_pred"], pred, rtol=1e-5, atol=1e-5)


def test_finetuned_differs_from_frozen(tiny):
    train, test = _split(tiny)
    frozen = stexp.tl.fit(
        train,
        model="mclstexp",
        features_key=KEY,
        max_epochs=2,
        batch_size=32,
        lr=1e-3,
        device="cpu",
        seed=0,
        **SMALL["mclstexp"],
    )
    tuned = _fit(train, "mclstexp")
    a, b = test.copy(), test.copy()
    stexp.tl.predict(a, frozen)
    stexp.tl.predict(b, tuned)
    assert not np.allclose(a.layers["stexp_pred"], b.layers["stexp_pred"])


def test_finetune_validation_slide(tiny):
    est = _fit(tiny, "nh2st", validation="slide_2", early_stopping_patience=1)
    assert len(est.history["val_loss"]) == len(est.history["train_loss"]) >= 1


def test_callable_features_cannot_be_finetuned(tiny):
    adata = tiny.copy()
    stexp.pp.embed_images(adata, encoder=lambda x: x.mean((2, 3)), key_added="X_mean", cache=False)
    with pytest.raises(ValueError, match="callable"):
        stexp.tl.fit(adata, model="nh2st", features_key="X_mean", finetune_encoder=True, max_epochs=1, **SMALL["nh2st"])


def test_hed_jitter_reaches_the_training_patches(tiny):
    train, _ = _split(tiny)
    plain = _fit(train, "mclstexp", max_epochs=1)
    jittered = _fit(train, "mclstexp", max_epochs=1, hed_jitter=0.2)
    assert jittered.hparams["hed_jitter"] == 0.2
    assert jittered.history["train_loss"] != plain.history["train_loss"]
    with pytest.raises(ValueError, match="hed_jitter"):
        _fit(train, "mclstexp", max_epochs=1, hed_jitter=1.5)
