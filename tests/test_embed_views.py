"""embed_images(mpp=, stain_norm=, tta=): invariance to rotation, resolution and stain; spec and cache records."""

from __future__ import annotations

import numpy as np
import pytest
from test_embed import TinyEncoder

import stexp
from stexp._layout import scalefactors, spatial_entry
from stexp.images._spec import EncoderSpec, check_encoder_spec


def _one_slide(synth):
    lib = synth.obs["library_id"].cat.categories[0] if hasattr(synth.obs["library_id"], "cat") else "slide_0"
    a = synth[synth.obs["library_id"] == lib].copy()
    a.uns["spatial"] = {lib: a.uns["spatial"][lib]}
    return a, lib


class DetailEncoder(TinyEncoder):
    """64 px input; features: 4x4 pooled colour and the mean absolute pixel difference (fine detail) per channel."""

    def __post_init__(self):
        import torch

        self.input_px, self.out_dim = 64, 54

        class Detail(torch.nn.Module):
            def forward(self, x):
                pooled = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
                dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(2, 3))
                dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(2, 3))
                return torch.cat([pooled, dx, dy], dim=1)

        self.module = Detail().eval()


def _feats(adata, encoder=None, **kw):
    enc = encoder or TinyEncoder()
    out = stexp.pp.embed_images(adata, encoder=enc, device="cpu", cache=False, copy=True, **kw)
    return out.obsm[f"X_stexp_{enc.name}"]


def _rel(a, b):
    return float(np.abs(a - b).mean() / np.abs(a).mean())


def test_tta_features_are_rotation_invariant(synth):
    a, lib = _one_slide(synth)
    a = a[:48].copy()
    entry = spatial_entry(a, lib)
    img = entry["images"]["hires"]
    s = float(scalefactors(a, lib)["tissue_hires_scalef"])
    rotated = a.copy()
    rotated.uns["spatial"][lib]["images"] = {"hires": np.ascontiguousarray(np.rot90(img, k=1))}
    x, y = np.asarray(a.obsm["spatial"], dtype=np.float64).T
    # np.rot90 (counter-clockwise): image point (x, y) goes to (y, W - x), W the image width
    rotated.obsm["spatial"] = np.column_stack([y, img.shape[1] / s - x])
    plain, plain_rot = _feats(a), _feats(rotated)
    tta, tta_rot = _feats(a, tta=True), _feats(rotated, tta=True)
    assert _rel(plain, plain_rot) > 0.05  # the encoder alone is not rotation invariant
    assert _rel(tta, tta_rot) < 0.01
    assert _rel(plain, tta) > 0.01


def test_encode_tta_is_invariant_on_a_patch():
    import torch

    from stexp.images._views import encode

    enc = TinyEncoder()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for view in (torch.rot90(x, 1, dims=(2, 3)), torch.flip(x, dims=(2,)), torch.rot90(x, 3, dims=(2, 3))):
        torch.testing.assert_close(encode(enc.module, view, tta=True), encode(enc.module, x, tta=True))


def test_mpp_makes_a_coarser_scan_look_alike(synth):
    from PIL import Image

    a, lib = _one_slide(synth)
    img = spatial_entry(a, lib)["images"]["hires"]
    coarse = a.copy()
    h, w = img.shape[:2]
    small = np.asarray(Image.fromarray(img).resize((w // 3, h // 3), Image.LANCZOS))
    coarse.uns["spatial"][lib]["images"] = {"hires": small}
    sf = coarse.uns["spatial"][lib]["scalefactors"]
    sf["tissue_hires_scalef"] = float(sf["tissue_hires_scalef"]) * (w // 3) / w
    from stexp.images._slide import image_um_per_px, slide_view

    upp = image_um_per_px(coarse, slide_view(coarse, lib))
    enc = DetailEncoder()
    without = _rel(_feats(a, enc)[:, -6:], _feats(coarse, enc)[:, -6:])
    with_mpp = _rel(_feats(a, enc, mpp=upp)[:, -6:], _feats(coarse, enc, mpp=upp)[:, -6:])
    assert with_mpp < 0.5 * without


def test_reinhard_removes_much_of_a_stain_shift(synth):
    from stexp.images._stain import hed_shift

    a, lib = _one_slide(synth)
    shifted = a.copy()
    shifted.uns["spatial"][lib]["images"] = {"hires": hed_shift(spatial_entry(a, lib)["images"]["hires"])}
    without = _rel(_feats(a), _feats(shifted))
    normalised = _rel(_feats(a, stain_norm="reinhard"), _feats(shifted, stain_norm="reinhard"))
    assert normalised < 0.75 * without


def test_view_options_are_recorded_checked_and_cached_apart(synth):
    a, _ = _one_slide(synth)
    stexp.pp.embed_images(a, encoder=TinyEncoder(), device="cpu")
    plain = a.obsm["X_stexp_tiny"].copy()
    spec = a.uns["stexp"]["features"]["X_stexp_tiny"]
    assert spec["tta"] is False or spec["tta"] == 0
    with pytest.raises(ValueError, match="tta"):
        stexp.pp.embed_images(a, encoder=TinyEncoder(), device="cpu", tta=True)
    stexp.pp.embed_images(a, encoder=TinyEncoder(), device="cpu", tta=True, key_added="tta")
    assert a.uns["stexp"]["features"]["tta"]["tta"]
    assert not np.allclose(a.obsm["tta"], plain)  # a cache hit of the plain features would be equal
    # a record written before the options existed reads as the defaults and matches plain features
    old = {k: v for k, v in spec.items() if k not in ("mpp", "stain_norm", "tta")}
    assert EncoderSpec.from_mapping(old) == EncoderSpec.from_mapping(spec)
    check_encoder_spec(old, spec)
    with pytest.raises(ValueError, match="tta"):
        check_encoder_spec(old, a.uns["stexp"]["features"]["tta"])
    for bad in ({"mpp": 0}, {"mpp": 1e9}, {"mpp": "1"}, {"stain_norm": "macenko?"}, {"tta": "yes"}):
        with pytest.raises((ValueError, TypeError)):  # TypeError: mpp that is not a number
            stexp.pp.embed_images(a, encoder=TinyEncoder(), device="cpu", key_added="bad", **bad)


def test_multilevel_encoder_ends_with_the_plain_features():
    import torch

    from stexp.images import build_encoder

    ml, plain = build_encoder("efficientnet_lite0_ml", "imagenet"), build_encoder("efficientnet_lite0", "imagenet")
    assert ml.out_dim == 1704 and ml.input_px == plain.input_px
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, y0 = ml.module(x), plain.module(x)
    assert y.shape == (2, 1704)
    torch.testing.assert_close(y[:, -1280:], y0)
