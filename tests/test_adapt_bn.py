"""embed_images(adapt_bn=True): test-time BatchNorm re-estimation per slide (AdaBN).

The encoder's BatchNorm statistics are re-estimated on each slide's own patches before it is embedded and
restored afterwards; the option is recorded, checked, part of the cache key, reused by predict and the CLI.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_embed import TinyEncoder

import stexp
from stexp._layout import spatial_entry
from stexp.images._spec import EncoderSpec, check_encoder_spec

BN = "test_adapt_bn_cnn"
KEY = f"X_stexp_{BN}"


def _bn_module():
    """Two 3x3 convolutions, each followed by BatchNorm (non-default 'pretrained' statistics) and ReLU; 2x2 pool: 32-d.

    Deterministic weights from a local generator (the global torch RNG is left alone).
    """
    import torch

    g = torch.Generator().manual_seed(0)
    layers = []
    for c_in in (3, 8):
        conv = torch.nn.Conv2d(c_in, 8, 3, padding=1)
        bn = torch.nn.BatchNorm2d(8)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (3.0 * c_in) ** 0.5)
            conv.bias.copy_(0.1 * torch.randn(8, generator=g))
            bn.running_mean.copy_(0.2 * torch.randn(8, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(8, generator=g))
            bn.num_batches_tracked.fill_(1000)
            bn.weight.copy_(1.0 + 0.1 * torch.randn(8, generator=g))
            bn.bias.copy_(0.1 * torch.randn(8, generator=g))
        layers += [conv, bn, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()).eval()


def _pool_module():
    """The 2x2 mean colour (12-d): no BatchNorm."""
    import torch

    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())


@pytest.fixture(scope="module", autouse=True)
def bn_encoder():
    """A small registry CNN with BatchNorm layers (16 px input, 32-d); rebuildable, so predict can re-embed."""
    from stexp.images._encoders import _REGISTRY, register_encoder

    register_encoder(BN, out_dim=32, input_px=16)(lambda pretrained: _bn_module())
    yield BN
    _REGISTRY.pop(BN, None)


def _encoder():
    return stexp.images.build_encoder(BN, None)


def _one_slide(synth, i: int = 0):
    lib = f"slide_{i}"
    a = synth[synth.obs["library_id"] == lib].copy()
    a.uns["spatial"] = {lib: a.uns["spatial"][lib]}
    return a, lib


def _feats(adata, encoder=None, **kw):
    out = stexp.pp.embed_images(
        adata, encoder=encoder or _encoder(), device="cpu", cache=False, stain_norm=None, copy=True, **kw
    )
    return out.obsm[KEY], out.uns["stexp"]["features"][KEY]


def _bn_state(module) -> dict:
    """Every BatchNorm layer's buffers, momentum and train flag."""
    from stexp.images._views import batchnorm_layers

    return {
        i: ({k: b.clone() for k, b in m.named_buffers()}, m.momentum, m.training)
        for i, m in enumerate(batchnorm_layers(module))
    }


def _assert_same_state(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys() and len(a) == 2
    for i in a:
        (buf_a, mom_a, train_a), (buf_b, mom_b, train_b) = a[i], b[i]
        assert mom_a == mom_b and train_a == train_b
        assert buf_a.keys() == buf_b.keys() == {"running_mean", "running_var", "num_batches_tracked"}
        for k in buf_a:
            torch.testing.assert_close(buf_a[k], buf_b[k], rtol=0, atol=0)


def _moved(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-spot distance between two feature matrices, relative to the mean norm of ``a``'s rows."""
    return float(np.linalg.norm(a - b, axis=1).mean() / np.linalg.norm(a, axis=1).mean())


def test_adapt_bn_changes_and_records_the_features(synth, caplog):
    a, _ = _one_slide(synth)
    plain, plain_spec = _feats(a)
    with caplog.at_level(logging.INFO, logger="stexp"):
        adapted, spec = _feats(a, adapt_bn=True)
    assert np.isfinite(adapted).all() and adapted.shape == plain.shape
    assert not np.allclose(adapted, plain, atol=1e-3)
    assert spec["adapt_bn"] and not plain_spec["adapt_bn"]
    assert EncoderSpec.from_mapping(spec).adapt_bn is True
    assert "BatchNorm statistics re-estimated per slide (AdaBN)" in caplog.text
    # a model of adapted features refuses plain ones and the reverse; old records read as adapt_bn=False
    for model_spec, data_spec in ((spec, plain_spec), (plain_spec, spec)):
        with pytest.raises(ValueError, match="adapt_bn: model (True vs data False|False vs data True)"):
            check_encoder_spec(model_spec, data_spec)
    old = {k: v for k, v in plain_spec.items() if k != "adapt_bn"}
    assert EncoderSpec.from_mapping(old) == EncoderSpec.from_mapping(plain_spec)
    assert EncoderSpec.from_mapping(spec).embed_kwargs()["adapt_bn"] is True
    # checked like the other view options
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="adapt_bn must be True or False"):
            _feats(a, adapt_bn=bad)


def test_encoder_is_left_as_it_was(synth):
    import torch

    from stexp.images._views import adapt_sample, adapted_batchnorm

    a, _ = _one_slide(synth)
    enc = _encoder()
    before = _bn_state(enc.module)
    _feats(a, encoder=enc, adapt_bn=True)
    _assert_same_state(before, _bn_state(enc.module))
    assert not enc.module.training
    # also when embedding fails inside the adapted block; and no global RNG is drawn from
    rng_torch, rng_np = torch.random.get_rng_state(), np.random.get_state()
    patches = np.random.default_rng(1).integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(RuntimeError, match="boom"):
        with adapted_batchnorm(enc.module, patches, enc.preprocess, name=BN, batch_size=16):
            changed = _bn_state(enc.module)
            assert all(not train and mom is None for _, mom, train in changed.values())
            assert not torch.equal(changed[0][0]["running_mean"], before[0][0]["running_mean"])
            raise RuntimeError("boom")
    _assert_same_state(before, _bn_state(enc.module))
    assert (adapt_sample(np.ones(2000, bool)) == np.round(np.linspace(0, 1999, 512)).astype(int)).all()
    assert list(adapt_sample(np.array([False, True, True, False]))) == [1, 2]
    assert torch.equal(torch.random.get_rng_state(), rng_torch)
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), rng_np, strict=True))


def test_adapt_bn_brings_a_shifted_slide_back(synth):
    """A brightness / contrast shift of the whole slide: the adapted features move much less than the plain ones.

    Measured as the mean per-spot distance between the clean and the shifted slide's features, relative to the
    features' mean norm (the per-spot cosine is above 0.999 either way: the features share a large positive
    component, so it hardly tells them apart). A shift ``0.8 x + 20`` is affine per channel before the first
    BatchNorm, which the slide's own statistics undo; clipping, zero padding and white borders keep a rest.
    """
    a, lib = _one_slide(synth)
    shifted = a.copy()
    img = spatial_entry(a, lib)["images"]["hires"].astype(np.float32)
    shifted.uns["spatial"][lib]["images"] = {"hires": np.clip(img * 0.8 + 20, 0, 255).astype(np.uint8)}
    plain, plain_shifted = _feats(a)[0], _feats(shifted)[0]
    adapted, adapted_shifted = _feats(a, adapt_bn=True)[0], _feats(shifted, adapt_bn=True)[0]
    moved_plain, moved_adapted = _moved(plain, plain_shifted), _moved(adapted, adapted_shifted)
    assert moved_plain > 0.1  # the shift does move the plain features (0.20)
    assert moved_adapted < 0.25 * moved_plain, (moved_adapted, moved_plain)  # 0.013


def test_adapt_bn_needs_batchnorm(synth):
    a, _ = _one_slide(synth)
    a = a[:8].copy()
    with pytest.raises(ValueError, match="adapt_bn=True needs BatchNorm layers.*encoder 'tiny' has none"):
        stexp.pp.embed_images(a, encoder=TinyEncoder(), device="cpu", adapt_bn=True, stain_norm=None)
    assert "X_stexp_tiny" not in a.obsm


def test_adapt_bn_is_part_of_the_cache_key(synth):
    from stexp.images._cache import cache_dir

    a, _ = _one_slide(synth)
    stexp.pp.embed_images(a, encoder=_encoder(), device="cpu", stain_norm=None, key_added="plain")
    assert len(list(cache_dir().glob("*.npy"))) == 1
    calls = []
    enc = _encoder()
    enc.module.register_forward_hook(lambda *args: calls.append(1))
    stexp.pp.embed_images(a, encoder=enc, device="cpu", stain_norm=None, key_added="adapted", adapt_bn=True)
    assert calls  # computed, not loaded from the plain features' cache
    assert len(list(cache_dir().glob("*.npy"))) == 2
    assert not np.allclose(a.obsm["adapted"], a.obsm["plain"], atol=1e-3)
    # the same options again: loaded from the cache, no forward pass (not even the adaptation's)
    calls.clear()
    stexp.pp.embed_images(a, encoder=enc, device="cpu", stain_norm=None, key_added="again", adapt_bn=True)
    assert not calls
    np.testing.assert_array_equal(a.obsm["again"], a.obsm["adapted"])
    # features stored under a key are not replaced by the other option without overwrite=True
    with pytest.raises(ValueError, match="adapt_bn"):
        stexp.pp.embed_images(a, encoder=_encoder(), device="cpu", stain_norm=None, key_added="plain", adapt_bn=True)


def test_shards_are_adapted_on_the_whole_library(synth):
    """A shard of a library (one process of devices=N) is embedded with the whole library's statistics."""
    from stexp.images._patches import plan_patches
    from stexp.pp._embed import _embed_plan

    a, lib = _one_slide(synth)
    enc = _encoder()
    plan = plan_patches(a, lib, np.arange(a.n_obs), patch_um=75.0)
    kw = {"batch_size": 32, "device": "cpu", "pbar": None, "adapt_bn": True}
    whole = _embed_plan(enc, plan, **kw)
    rows = np.arange(50, 90)
    shard = _embed_plan(enc, plan.subset(rows), adapt_plan=plan, **kw)
    np.testing.assert_allclose(shard, whole[rows], rtol=1e-5, atol=1e-6)
    # the statistics do not depend on the batch size of the embedding (the CLI's default differs)
    np.testing.assert_allclose(_embed_plan(enc, plan, **(kw | {"batch_size": 7})), whole, rtol=1e-5, atol=1e-6)
    alone = _embed_plan(enc, plan.subset(rows), **kw)  # adapted on the shard's own 40 patches: differs
    assert not np.allclose(alone, whole[rows], atol=1e-4)


def test_two_processes_match_one(monkeypatch):
    """devices=2 (forked CPU processes, as in Jupyter): every process adapts on the whole library's sample."""
    from test_distributed import LAUNCHER_VARS

    from stexp.models import _engine

    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_engine, "is_interactive", lambda: True)
    adata = stexp.datasets.synthetic(n_slides=2, n_spots=45, n_genes=5, seed=1)
    kw = {"encoder": BN, "weights": None, "device": "cpu", "cache": False, "stain_norm": None, "adapt_bn": True}
    one = stexp.pp.embed_images(adata, copy=True, **kw)
    two = stexp.pp.embed_images(adata, copy=True, devices=2, **kw)
    np.testing.assert_allclose(two.obsm[KEY], one.obsm[KEY], rtol=0, atol=1e-6)
    assert two.uns["stexp"]["features"][KEY]["adapt_bn"]


def _textbook_adabn(x):
    """The test CNN adapted as in Li et al. 2016 on the input batch ``x`` (one forward pass), in eval mode."""
    import torch

    ref = _bn_module()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    with torch.no_grad():
        ref(x)
    return ref.eval()


@pytest.mark.parametrize("view", ["plain", "tta", "mpp"])
def test_matches_textbook_adabn(synth, view):
    """With at most ADAPT_BN_BATCH spots (one adaptation batch), the features are those of a plain AdaBN.

    With ``tta`` the statistics come from the un-augmented patches; with ``mpp`` from patches of the resampled
    slide, as the embedded ones.
    """
    import torch

    from stexp.images._patches import plan_patches
    from stexp.images._slide import image_um_per_px
    from stexp.images._views import ADAPT_BN_BATCH, encode, resample_slide
    from stexp.pp._embed import _embed_plan

    a, lib = _one_slide(synth)
    a = a[: min(32, ADAPT_BN_BATCH)].copy()
    enc = _encoder()
    plan = plan_patches(a, lib, np.arange(a.n_obs), patch_um=75.0)
    assert plan.inside.all()
    own = image_um_per_px(a, plan.view)
    views = {"tta": view == "tta", "mpp": 1.7 * own if view == "mpp" else None}
    got = _embed_plan(enc, plan, batch_size=16, device="cpu", pbar=None, adapt_bn=True, image_um_per_px=own, **views)
    image, cut = resample_slide(plan.view.decode(), plan, image_um_per_px=own, mpp=views["mpp"])
    x = enc.preprocess(cut.cut(image, enc.input_px))
    with torch.no_grad():
        want = encode(_textbook_adabn(x), x, tta=views["tta"]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    plain = _embed_plan(enc, plan, batch_size=16, device="cpu", pbar=None, image_um_per_px=own, **views)
    assert not np.allclose(got, plain, atol=1e-3)


def test_whole_slide_file_is_adapted_like_the_decoded_image(tmp_path):
    from test_wsi import _he, _lazy_and_memory

    lazy, mem = _lazy_and_memory(tmp_path, _he())
    for x in (lazy, mem):
        stexp.pp.embed_images(x, encoder=BN, weights=None, patch_um=40, cache=False, adapt_bn=True, stain_norm=None)
    np.testing.assert_allclose(lazy.obsm[KEY], mem.obsm[KEY], atol=0.05)
    assert lazy.uns["stexp"]["features"][KEY]["adapt_bn"]


def test_predict_embeds_a_new_slide_with_adapt_bn(synth):
    """A model trained on adapted features embeds a query slide with adapt_bn=True (from its spec)."""
    train = synth[synth.obs["library_id"] != "slide_2"].copy()
    train.uns["spatial"] = {k: v for k, v in train.uns["spatial"].items() if k != "slide_2"}
    stexp.pp.embed_images(train, encoder=BN, weights=None, device="cpu", stain_norm=None, adapt_bn=True)
    model = stexp.tl.fit(train, model="ridge", features_key=KEY, calibrate=False)
    assert model.encoder_spec.adapt_bn
    test, _ = _one_slide(synth, 2)
    test.obsm.pop(KEY, None)
    stexp.tl.predict(test, model, device="cpu")
    rec = test.uns["stexp"]["features"][KEY]
    assert rec["adapt_bn"] and not model.encoder_spec.diff(rec)
    np.testing.assert_allclose(test.obsm[KEY], _feats(_one_slide(synth, 2)[0], adapt_bn=True)[0], rtol=1e-5)


def test_cli_embed_adapt_bn(tmp_path, synth, capsys):
    import anndata as ad

    from stexp.cli import main

    a, _ = _one_slide(synth)
    a.write_h5ad(tmp_path / "slide.h5ad")
    argv = ["embed", str(tmp_path / "slide.h5ad"), "--encoder", BN, "--weights", "none", "--device", "cpu",
            "--quiet", "--stain-norm", "none"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "adapted.h5ad"), "--adapt-bn"]) == 0, capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "plain.h5ad")]) == 0
    adapted, plain = ad.read_h5ad(tmp_path / "adapted.h5ad"), ad.read_h5ad(tmp_path / "plain.h5ad")
    assert adapted.uns["stexp"]["features"][KEY]["adapt_bn"]
    assert not plain.uns["stexp"]["features"][KEY]["adapt_bn"]
    np.testing.assert_allclose(adapted.obsm[KEY], _feats(a, adapt_bn=True)[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(adapted.obsm[KEY], plain.obsm[KEY], atol=1e-3)
    # an encoder without BatchNorm: the slide fails with a message naming the encoder, exit status 1
    from stexp.images._encoders import _REGISTRY, register_encoder

    pool = "test_adapt_bn_pool"
    register_encoder(pool, out_dim=12, input_px=16)(lambda pretrained: _pool_module())
    try:
        capsys.readouterr()
        argv[argv.index(BN)] = pool
        assert main([*argv, "--out", str(tmp_path / "pool.h5ad"), "--adapt-bn"]) == 1
        err = capsys.readouterr().err
        assert f"encoder {pool!r} has none" in err and "adapt_bn" in err
    finally:
        _REGISTRY.pop(pool, None)
