"""stexp.pp.embed_images: features, spec records, in-memory and disk caches, bad input."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pytest

import stexp
from stexp._layout import library_mask
from stexp.images._cache import cache_dir


@dataclass(eq=False)
class TinyEncoder:
    """A stand-in :class:`stexp.images.Encoder`: 4x4 average-pooled RGB (48-d), counting forward calls."""

    name: str = "tiny"
    input_px: int = 16
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.25, 0.25, 0.25)
    normalization: str = "custom"
    out_dim: int = 48
    weights_id: str = "random"
    weights_arg: str | None = None
    calls: list = field(default_factory=list)

    def __post_init__(self):
        import torch

        calls = self.calls

        class Pool(torch.nn.Module):
            def forward(self, x):
                calls.append(x.shape[0])
                return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

        self.module = Pool().eval()

    def preprocess(self, patches_uint8, device=None):
        import torch

        x = torch.from_numpy(np.asarray(patches_uint8)).permute(0, 3, 1, 2).float() / 255.0
        m = torch.tensor(self.mean).view(1, 3, 1, 1)
        s = torch.tensor(self.std).view(1, 3, 1, 1)
        return ((x - m) / s).to(device or "cpu")


def _embed(adata, enc, **kw):
    stexp.pp.embed_images(adata, encoder=enc, device="cpu", **kw)


def test_features_and_spec(synth, caplog):
    enc = TinyEncoder()
    with caplog.at_level(logging.INFO, logger="stexp"):
        _embed(synth, enc, batch_size=50)
    assert "macenko stain normalisation" in caplog.text  # the log says how the patches were prepared
    f = synth.obsm["X_stexp_tiny"]
    assert f.shape == (synth.n_obs, 48) and f.dtype == np.float32 and np.isfinite(f).all()
    assert f.std(axis=0).mean() > 0.01  # spots differ
    spec = synth.uns["stexp"]["features"]["X_stexp_tiny"]
    for k in stexp.images._spec.FEATURE_FIELDS:
        assert k in spec or k in stexp.images._spec.OPTIONAL_FIELDS
    assert spec["patch_um"] == pytest.approx(82.5) and spec["patch_px"] == 16 and spec["out_dim"] == 48
    assert spec["weights"] == "random" and "versions" in spec
    assert spec["stain_norm"] == "macenko"  # the default
    # without stain normalisation each spot's feature is the pooled patch the reader cuts: check one spot
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stexp"):
        _embed(synth, enc, batch_size=50, stain_norm=None, key_added="X_plain")
    assert "added adata.obsm['X_plain']" in caplog.text and "stain normalisation" not in caplog.text
    f = synth.obsm["X_plain"]
    i = 7
    lib = synth.obs["library_id"].iloc[i]
    p = stexp.images.read_patches(synth, lib, [i], out_px=16)
    expected = enc.module(enc.preprocess(p)).numpy()[0]
    np.testing.assert_allclose(f[i], expected, atol=1e-5)


def test_second_call_does_no_work_and_batch_sizes_agree(synth, caplog):
    enc = TinyEncoder()
    _embed(synth, enc, batch_size=64, cache=False)
    n_first = sum(enc.calls)
    assert n_first == synth.n_obs
    first = synth.obsm["X_stexp_tiny"].copy()
    with caplog.at_level(logging.INFO, logger="stexp"):
        _embed(synth, enc, batch_size=64, cache=False)
    assert sum(enc.calls) == n_first  # no forward at all
    assert "up to date" in caplog.text
    # another batch size on another key: same features (float tolerance)
    n_batches = len(enc.calls)
    assert max(enc.calls) == 64
    _embed(synth, enc, batch_size=7, cache=False, key_added="X_b7")
    np.testing.assert_allclose(synth.obsm["X_b7"], first, atol=1e-5)
    assert max(enc.calls[n_batches:]) == 7


def test_changed_image_is_not_taken_as_up_to_date(synth):
    from stexp.images._slide import slide_view

    enc = TinyEncoder()
    _embed(synth, enc, cache=False)
    first = synth.obsm["X_stexp_tiny"].copy()
    view = slide_view(synth, "slide_1")
    entry = synth.uns["spatial"]["slide_1"]["images"]
    res = next(r for r, img in entry.items() if np.shape(img) == np.shape(view.array))
    entry[res] = (255 - np.asarray(entry[res])).astype(np.asarray(entry[res]).dtype)  # another image
    with pytest.raises(ValueError, match=r"other images .*\['slide_1'\].*overwrite=True"):
        _embed(synth, enc, cache=False)
    np.testing.assert_array_equal(synth.obsm["X_stexp_tiny"], first)  # the user's features untouched
    _embed(synth, enc, cache=False, overwrite=True)
    on_1 = library_mask(synth, "slide_1")
    assert not np.allclose(synth.obsm["X_stexp_tiny"][on_1], first[on_1])
    np.testing.assert_allclose(synth.obsm["X_stexp_tiny"][~on_1], first[~on_1], atol=1e-6)
    _embed(synth, enc, cache=False)  # now up to date again


def test_disk_cache_in_a_new_session(synth):
    enc = TinyEncoder()
    _embed(synth, enc)
    first = synth.obsm["X_stexp_tiny"].copy()
    files = sorted(cache_dir().glob("*.npy"))
    assert len(files) == 3  # one per library
    # "new session": nothing in the AnnData any more
    del synth.obsm["X_stexp_tiny"]
    del synth.uns["stexp"]
    enc2 = TinyEncoder()
    _embed(synth, enc2)
    assert enc2.calls == []
    np.testing.assert_array_equal(synth.obsm["X_stexp_tiny"], first)
    # moving one spot of one library invalidates that library only
    del synth.obsm["X_stexp_tiny"]
    i = np.flatnonzero(library_mask(synth, "slide_1"))[0]
    synth.obsm["spatial"][i] += 3.0
    _embed(synth, enc2)
    assert sum(enc2.calls) == int(library_mask(synth, "slide_1").sum())


def test_spec_change_needs_overwrite_and_recomputes(synth):
    enc = TinyEncoder()
    _embed(synth, enc, cache=False)
    first = synth.obsm["X_stexp_tiny"].copy()
    with pytest.raises(ValueError, match="patch_um: stored 82.5 vs requested 120.0.*overwrite=True"):
        _embed(synth, enc, cache=False, patch_um=120)
    np.testing.assert_array_equal(synth.obsm["X_stexp_tiny"], first)  # untouched
    n = sum(enc.calls)
    _embed(synth, enc, cache=False, patch_um=120, overwrite=True)
    assert sum(enc.calls) == n + synth.n_obs
    assert synth.uns["stexp"]["features"]["X_stexp_tiny"]["patch_um"] == pytest.approx(120.0)
    assert not np.allclose(synth.obsm["X_stexp_tiny"], first)
    # a key written by someone else is never replaced silently
    synth.obsm["X_mine"] = np.zeros((synth.n_obs, 3), np.float32)
    with pytest.raises(ValueError, match="not written by embed_images"):
        _embed(synth, enc, key_added="X_mine")


def test_copy_leaves_the_input_alone(synth):
    out = stexp.pp.embed_images(synth, encoder=TinyEncoder(), device="cpu", copy=True, cache=False)
    assert "X_stexp_tiny" in out.obsm and "X_stexp_tiny" not in synth.obsm
    assert "stexp" not in synth.uns or "features" not in synth.uns["stexp"]


def test_spots_outside_raise_or_get_nan(synth):
    i = np.flatnonzero(library_mask(synth, "slide_2"))[5]
    synth.obsm["spatial"][i] = (5000.0, 10.0)
    with pytest.raises(ValueError, match="slide_2.*outside"):
        _embed(synth, TinyEncoder(), cache=False)
    _embed(synth, TinyEncoder(), cache=False, on_outside="drop")
    f = synth.obsm["X_stexp_tiny"]
    assert synth.n_obs == 432
    assert np.isnan(f[i]).all() and np.isfinite(np.delete(f, i, axis=0)).all()
    assert synth.uns["stexp"]["features"]["X_stexp_tiny"]["n_outside"]["slide_2"] == 1


def test_bad_input(synth):
    with pytest.raises(ValueError, match="batch_size"):
        _embed(synth, TinyEncoder(), batch_size=0)
    with pytest.raises(ValueError, match="smaller than one pixel"):
        _embed(synth, TinyEncoder(), patch_um=0.5, cache=False)
    with pytest.raises(KeyError, match="slide_1"):
        _embed(synth, TinyEncoder(), patch_um={"slide_0": 80.0}, cache=False)
    synth.uns["spatial"]["slide_1"]["images"] = {}
    with pytest.raises(ValueError, match="slide_1.*no image"):
        _embed(synth, TinyEncoder(), cache=False)


def test_callable_encoder_path(synth):
    pytest.importorskip("stexp.images._encoders")
    import torch

    calls = []

    def pooled(x):
        calls.append(x.shape[0])
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    enc = stexp.images.build_encoder(pooled, None, input_px=16, normalization="none")
    small = synth[synth.obs["library_id"] == "slide_0"].copy()
    stexp.pp.embed_images(small, encoder=enc, device="cpu")
    key = next(k for k in small.obsm if k.startswith("X_stexp_callable"))
    assert small.obsm[key].shape == (small.n_obs, 12)
    assert not list(cache_dir().glob("*.npy"))  # callables are never cached on disk
    spec = small.uns["stexp"]["features"][key]
    assert spec["encoder"].startswith("callable:") and "weights_arg" not in spec


def test_real_efficientnet_lite0(synth):
    """The default encoder of fit/predict (features_key=None) end to end on one small library."""
    enc_mod = pytest.importorskip("stexp.images._encoders")
    small = synth[synth.obs["library_id"] == "slide_0"][:24].copy()
    stexp.pp.embed_images(small, encoder="efficientnet_lite0", batch_size=16, device="cpu")
    f = small.obsm["X_stexp_efficientnet_lite0"]
    assert f.shape == (24, 1280) and np.isfinite(f).all()
    spec = small.uns["stexp"]["features"]["X_stexp_efficientnet_lite0"]
    assert spec["weights"] == "imagenet" and spec["weights_arg"] == "imagenet" and spec["patch_px"] == 224
    # second call: recognised before the encoder is even built
    enc_mod_build = enc_mod.build_encoder
    try:
        enc_mod.build_encoder = None  # would fail if called
        stexp.pp.embed_images(small, encoder="efficientnet_lite0", device="cpu")
    finally:
        enc_mod.build_encoder = enc_mod_build
