"""embed_images(mpp=, stain_norm=, tta=): invariance to rotation, resolution and stain; spec and cache records."""

from __future__ import annotations

import dataclasses
import json

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


@pytest.mark.parametrize("stain_norm", ["reinhard", "macenko", "vahadane", "haematoxylin"])
def test_stain_norm_removes_much_of_a_stain_shift(synth, stain_norm):
    from stexp.images._stain import hed_shift

    a, lib = _one_slide(synth)
    shifted = a.copy()
    shifted.uns["spatial"][lib]["images"] = {"hires": hed_shift(spatial_entry(a, lib)["images"]["hires"])}
    without = _rel(_feats(a, stain_norm=None), _feats(shifted, stain_norm=None))
    normalised = _rel(_feats(a, stain_norm=stain_norm), _feats(shifted, stain_norm=stain_norm))
    assert normalised < 0.75 * without


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


#: A known H&E stain matrix (haematoxylin, eosin; OD unit vectors), each vector at cosine < 0.98 to
#: MACENKO_TARGET's, so a fit that returned the target (or swapped the stains) fails the recovery test.
TRUE_STAINS = np.stack([_unit((0.75, 0.62, 0.23)), _unit((0.35, 0.85, 0.39))])
GLASS_COLS = 24  # the left columns of the synthetic H&E image are glass


def _concentrations(seed: int, n: int = 96) -> np.ndarray:
    """Seeded H and E concentrations ``(n, n, 2)``; zero (glass) in the left :data:`GLASS_COLS` columns."""
    rng = np.random.default_rng(seed)
    conc = np.stack([rng.gamma(2.0, 0.35, (n, n)), rng.gamma(2.0, 0.25, (n, n))], axis=-1)
    conc[:, :GLASS_COLS] = 0.0
    return conc


def _render(stains: np.ndarray, conc: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint8 RGB of ``conc`` stained with ``stains`` (Beer-Lambert, as the normaliser's OD); glass 252-255."""
    rgb = 256.0 * np.exp(-(conc @ stains)) - 1.0
    img = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    glass = np.random.default_rng(seed).integers(0, 4, img[:, :GLASS_COLS].shape)
    img[:, :GLASS_COLS] = (255 - glass).astype(np.uint8)
    return img


def _at_target_range(conc: np.ndarray) -> np.ndarray:
    """``conc`` scaled so that its tissue's 99th percentiles are MACENKO_TARGET's concentration range."""
    from stexp.images._stain import MACENKO_TARGET

    tissue = conc[:, GLASS_COLS:].reshape(-1, 2)
    return conc / np.percentile(tissue, 99, axis=0) * np.asarray(MACENKO_TARGET["max_conc"])


def _tissue_error(image: np.ndarray, reference: np.ndarray) -> float:
    """Mean absolute RGB difference over the tissue columns (right of the glass)."""
    return float(np.abs(image[:, GLASS_COLS:].astype(np.int16) - reference[:, GLASS_COLS:].astype(np.int16)).mean())


def _normalise_a_shifted_stain(normalizer, conc: np.ndarray):
    """``(shifted, out, error before, error after)``: ``conc`` rendered with another stain (stronger haematoxylin),
    normalised, and both compared with its rendering by MACENKO_TARGET."""
    from stexp.images._stain import MACENKO_TARGET

    conc = _at_target_range(conc)
    reference = _render(np.asarray(MACENKO_TARGET["stain_matrix"]), conc)
    shifted = _render(TRUE_STAINS, conc * np.array([1.5, 1.0]))
    out = normalizer.fit(shifted)(shifted)
    assert out.dtype == np.uint8 and out.shape == shifted.shape
    return shifted, out, _tissue_error(shifted, reference), _tissue_error(out, reference)


def test_macenko_fit_recovers_the_stain_vectors_in_order():
    from stexp.images._stain import MACENKO_TARGET, MacenkoNormalizer

    target = np.asarray(MACENKO_TARGET["stain_matrix"])
    assert (np.diag(TRUE_STAINS @ target.T) < 0.98).all()  # the test could not pass by returning the target
    norm = MacenkoNormalizer.fit(_render(TRUE_STAINS, _concentrations(0)))
    fitted = np.asarray(norm.stain_matrix)
    np.testing.assert_allclose(np.linalg.norm(fitted, axis=1), 1.0, atol=1e-9)
    cos = fitted @ TRUE_STAINS.T  # rows: fitted H, E; columns: true H, E
    assert cos[0, 0] > 0.98 and cos[1, 1] > 0.98, cos
    assert cos[0, 0] > cos[0, 1] and cos[1, 1] > cos[1, 0]  # haematoxylin first
    assert all(c > 0 for c in norm.max_conc)
    # hashable and serialisable like the Reinhard normaliser (plain floats in tuples)
    record = json.loads(json.dumps(dataclasses.asdict(norm)))
    again = MacenkoNormalizer(tuple(tuple(v) for v in record["stain_matrix"]), tuple(record["max_conc"]))
    assert again == norm and hash(again) == hash(norm)


def test_macenko_fit_ignores_a_dark_background():
    from stexp.images._stain import MacenkoNormalizer

    img = _render(TRUE_STAINS, _concentrations(0))
    dark = img.copy()
    dark[:, :GLASS_COLS] = (28, 26, 30)  # the glass painted dark, as a 2000-px rendering on black gives it
    clean, painted = MacenkoNormalizer.fit(img), MacenkoNormalizer.fit(dark)
    cos = np.asarray(painted.stain_matrix) @ np.asarray(clean.stain_matrix).T
    assert cos[0, 0] > 0.999 and cos[1, 1] > 0.999, cos
    np.testing.assert_allclose(painted.max_conc, clean.max_conc, rtol=0.02)


def test_macenko_maps_another_stain_onto_the_target():
    from stexp.images._stain import MacenkoNormalizer

    shifted, out, before, after = _normalise_a_shifted_stain(MacenkoNormalizer, _concentrations(1))
    assert after < 0.5 * before, (before, after)
    # white stays (near) white: the glass columns (252-255 in the input)
    assert out[:, :GLASS_COLS].min() >= 250
    pure = (shifted == 255).all(axis=-1)
    assert pure[:, :GLASS_COLS].any() and (out[pure] == 255).all()  # pure white is kept exactly


def test_haematoxylin_renders_the_haematoxylin_alone():
    """Haematoxylin-channel view: Macenko's separation with the eosin left out (eosin-only tissue turns white)."""
    from stexp.images._stain import MACENKO_TARGET, HaematoxylinNormalizer, MacenkoNormalizer

    conc = _concentrations(1)
    conc = _at_target_range(conc)
    image = _render(TRUE_STAINS, conc)
    haem = HaematoxylinNormalizer.fit(image)
    both = MacenkoNormalizer.fit(image)
    assert haem.stain_matrix == both.stain_matrix and haem.max_conc == both.max_conc  # the same fit
    reference = _render(np.asarray(MACENKO_TARGET["stain_matrix"]), conc * np.array([1.0, 0.0])).astype(np.int16)
    out = haem(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    error_h, error_he = _tissue_error(out, reference), _tissue_error(both(image), reference)
    assert error_h < 0.5 * error_he, (error_h, error_he)  # it is the H-only rendering, not the H&E one
    # a pixel of eosin alone comes out (near) white
    eosin = _render(TRUE_STAINS, np.tile([0.0, 0.8], (4, 4, 1)))
    assert haem(eosin).min() >= 235, haem(eosin).min()


def test_macenko_applies_to_batches_in_chunks_and_checks_its_input():
    from stexp.images._stain import MacenkoNormalizer

    img = _render(TRUE_STAINS, _concentrations(2))
    norm = MacenkoNormalizer.fit(img)
    patches = np.stack([img[:32, :32], img[32:64, 40:72], img[-32:, -32:]])  # (3, 32, 32, 3)
    whole = norm(patches)
    assert whole.shape == patches.shape and whole.dtype == np.uint8
    np.testing.assert_array_equal(whole, norm(patches, chunk_pixels=1000))  # chunk edges change nothing
    np.testing.assert_array_equal(whole[1], norm(patches[1]))
    assert not np.array_equal(whole[2], patches[2])
    for bad in (patches.astype(np.float32), patches[..., :2], np.zeros((4, 3), np.uint8)):
        with pytest.raises(ValueError, match="uint8"):
            norm(bad)
    with pytest.raises(ValueError, match="uint8"):
        MacenkoNormalizer.fit(img.astype(np.float64))


@pytest.mark.parametrize("name", ["MacenkoNormalizer", "VahadaneNormalizer", "HaematoxylinNormalizer"])
def test_stain_matrix_normalizers_refuse_an_image_without_tissue_and_check_their_input(name):
    from stexp.images import _stain

    normalizer = getattr(_stain, name)
    for blank in (np.full((64, 64, 3), 255, np.uint8), np.full((64, 64, 3), 235, np.uint8)):
        with pytest.raises(ValueError, match=f"{name}: the thumbnail has no tissue"):
            normalizer.fit(blank)
    almost = np.full((64, 64, 3), 255, np.uint8)
    almost[:5, :5] = _render(TRUE_STAINS, _concentrations(3))[:5, GLASS_COLS : GLASS_COLS + 5]  # 25 tissue px
    with pytest.raises(ValueError, match="no tissue.*at least 100"):
        normalizer.fit(almost)
    with pytest.raises(ValueError, match=f"{name}.fit expects uint8"):
        normalizer.fit(almost.astype(np.float64))
    norm = normalizer.fit(_render(TRUE_STAINS, _concentrations(3)))
    with pytest.raises(ValueError, match=f"{name} expects uint8"):
        norm(almost[..., :2])


def test_vahadane_fit_recovers_the_stain_vectors_in_order():
    from stexp.images._stain import MACENKO_TARGET, MacenkoNormalizer, VahadaneNormalizer

    target = np.asarray(MACENKO_TARGET["stain_matrix"])
    target = target / np.linalg.norm(target, axis=1, keepdims=True)
    assert (np.diag(TRUE_STAINS @ target.T) < 0.98).all()  # the test could not pass by returning the target
    img = _render(TRUE_STAINS, _concentrations(0))
    norm = VahadaneNormalizer.fit(img)
    fitted = np.asarray(norm.stain_matrix)
    np.testing.assert_allclose(np.linalg.norm(fitted, axis=1), 1.0, atol=1e-9)
    assert (fitted >= 0).all()  # non-negative factorisation
    cos = fitted @ TRUE_STAINS.T  # rows: fitted H, E; columns: true H, E
    assert cos[0, 0] > 0.98 and cos[1, 1] > 0.98, cos
    assert cos[0, 0] > cos[0, 1] and cos[1, 1] > cos[1, 0]  # haematoxylin first
    assert all(c > 0 for c in norm.max_conc)
    # its own estimate, not Macenko's; a distinct class of equal fields is not equal
    macenko = MacenkoNormalizer.fit(img)
    assert norm.stain_matrix != macenko.stain_matrix
    assert VahadaneNormalizer(macenko.stain_matrix, macenko.max_conc) != macenko
    record = json.loads(json.dumps(dataclasses.asdict(norm)))
    again = VahadaneNormalizer(tuple(tuple(v) for v in record["stain_matrix"]), tuple(record["max_conc"]))
    assert again == norm and hash(again) == hash(norm)


# Macenko's test image mixes both stains in every pixel, the worst case for Vahadane's sparse prior: its
# objective there prefers an eosin vector tilted towards haematoxylin (lower than at the true vectors), and
# it removes about a third of the error (Macenko: four fifths). On tissue-like concentrations (each pixel
# mostly one stain: nuclei, stroma) it removes about half.
@pytest.mark.parametrize(("sparse", "bound"), [(False, 0.75), (True, 0.6)], ids=["mixed", "sparse"])
def test_vahadane_maps_another_stain_onto_the_target(sparse, bound):
    from stexp.images._stain import VahadaneNormalizer

    conc = _concentrations(1)
    if sparse:
        nuclei = np.random.default_rng(101).random(conc.shape[:2]) < 0.4
        conc[..., 1][nuclei] *= 0.1
        conc[..., 0][~nuclei] *= 0.1
    shifted, out, before, after = _normalise_a_shifted_stain(VahadaneNormalizer, conc)
    assert after < bound * before, (before, after)
    assert out[:, :GLASS_COLS].min() >= 250  # white stays (near) white
    pure = (shifted == 255).all(axis=-1)
    assert pure[:, :GLASS_COLS].any() and (out[pure] == 255).all()


def test_vahadane_is_deterministic_on_a_sample_and_leaves_the_global_rng_alone(monkeypatch):
    from stexp.images import _stain

    monkeypatch.setattr(_stain, "VAHADANE_FIT_PIXELS", 2000)  # the sampled path, on a small image
    img = _render(TRUE_STAINS, _concentrations(2))
    np.random.seed(123)
    state = np.random.get_state()
    first, second = _stain.VahadaneNormalizer.fit(img), _stain.VahadaneNormalizer.fit(img)
    after = np.random.get_state()
    assert after[0] == state[0] and np.array_equal(after[1], state[1]) and after[2:] == state[2:]
    assert first == second
    np.testing.assert_array_equal(first(img), second(img))
    cos = np.asarray(first.stain_matrix) @ TRUE_STAINS.T
    assert cos[0, 0] > 0.98 and cos[1, 1] > 0.98, cos  # a 2,000-pixel sample is enough


def test_stain_norm_options_and_normalizers():
    from PIL import Image

    from stexp.images._stain import HaematoxylinNormalizer, MacenkoNormalizer, ReinhardNormalizer, VahadaneNormalizer
    from stexp.images._views import check_options, stain_normalizer

    for value in (None, "reinhard", "macenko", "vahadane", "haematoxylin"):
        assert check_options(None, value, False) == (None, value, False, False, None, False)
    for bad in ("macenko?", "Macenko", "Vahadane", "staintools", ""):
        with pytest.raises(ValueError, match="stain_norm"):
            check_options(None, bad, False)
    image = Image.fromarray(_render(TRUE_STAINS, _concentrations(4)))
    assert stain_normalizer(image, None) is None
    assert isinstance(stain_normalizer(image, "reinhard"), ReinhardNormalizer)
    assert isinstance(stain_normalizer(image, "macenko"), MacenkoNormalizer)
    assert isinstance(stain_normalizer(image, "vahadane"), VahadaneNormalizer)
    assert isinstance(stain_normalizer(image, "haematoxylin"), HaematoxylinNormalizer)
    for norm in ("macenko", "vahadane", "haematoxylin"):
        with pytest.raises(ValueError, match=f"slide 'S1'.*{norm}.*no tissue"):
            stain_normalizer(Image.new("RGB", (50, 40), (255, 255, 255)), norm, library_id="S1")


def test_embed_images_macenko_names_a_slide_without_tissue(synth):
    a, lib = _one_slide(synth)
    a = a[:8].copy()
    blank = np.full_like(spatial_entry(a, lib)["images"]["hires"], 255)
    a.uns["spatial"][lib]["images"] = {"hires": blank}
    _feats(a, stain_norm="reinhard")  # Reinhard falls back to every pixel
    with pytest.raises(ValueError, match=f"slide '{lib}'.*no tissue"):
        _feats(a, stain_norm="macenko")


def test_embed_images_vahadane_is_recorded_and_names_a_slide_without_tissue(synth):
    a, lib = _one_slide(synth)
    a = a[:8].copy()
    out = stexp.pp.embed_images(a, encoder=TinyEncoder(), device="cpu", cache=False, copy=True, stain_norm="vahadane")
    assert out.uns["stexp"]["features"]["X_stexp_tiny"]["stain_norm"] == "vahadane"
    assert not np.allclose(out.obsm["X_stexp_tiny"], _feats(a, stain_norm="macenko"))
    a.uns["spatial"][lib]["images"] = {"hires": np.full_like(spatial_entry(a, lib)["images"]["hires"], 255)}
    with pytest.raises(ValueError, match=f"slide '{lib}'.*vahadane.*no tissue"):
        _feats(a, stain_norm="vahadane")


def test_jpeg_quality_makes_a_compressed_export_look_alike_and_is_recorded(synth):
    import io

    from PIL import Image

    a, lib = _one_slide(synth)
    img = np.asarray(spatial_entry(a, lib)["images"]["hires"])
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="JPEG", quality=8)
    export = a.copy()
    export.uns["spatial"][lib]["images"] = {"hires": np.asarray(Image.open(io.BytesIO(buffer.getvalue())))}
    enc = DetailEncoder()
    without = _rel(_feats(export, enc, stain_norm=None), _feats(a, enc, stain_norm=None))
    matched = _rel(_feats(export, enc, stain_norm=None), _feats(a, enc, stain_norm=None, jpeg_quality=8))
    assert matched < 0.5 * without  # the sharp slide seen as the export is close to the export
    # recorded, part of the identity, and applied by predict to new slides
    stexp.pp.embed_images(a, encoder=enc, device="cpu", stain_norm=None, jpeg_quality=8, key_added="q8", cache=False)
    record = EncoderSpec.from_mapping(a.uns["stexp"]["features"]["q8"])
    assert record.jpeg_quality == 8
    with pytest.raises(ValueError, match="jpeg_quality"):
        check_encoder_spec(record, {**record.to_uns(), "jpeg_quality": None})
    for bad in (0, 96, 8.5, True, "8"):
        with pytest.raises(ValueError, match="jpeg_quality"):
            stexp.pp.embed_images(a, encoder=enc, device="cpu", key_added="bad", jpeg_quality=bad)


def test_view_options_are_recorded_checked_and_cached_apart(synth):
    a, _ = _one_slide(synth)
    stexp.pp.embed_images(a, encoder=TinyEncoder(), device="cpu", stain_norm=None)
    plain = a.obsm["X_stexp_tiny"].copy()
    spec = a.uns["stexp"]["features"]["X_stexp_tiny"]
    assert spec.get("stain_norm") is None
    assert spec["tta"] is False or spec["tta"] == 0
    with pytest.raises(ValueError, match="tta"):
        stexp.pp.embed_images(a, encoder=TinyEncoder(), device="cpu", tta=True, stain_norm=None)
    stexp.pp.embed_images(a, encoder=TinyEncoder(), device="cpu", tta=True, key_added="tta", stain_norm=None)
    assert a.uns["stexp"]["features"]["tta"]["tta"]
    assert not np.allclose(a.obsm["tta"], plain)  # a cache hit of the plain features would be equal
    # a record written before the options existed reads as the defaults and matches plain features
    old = {k: v for k, v in spec.items() if k not in ("mpp", "stain_norm", "tta")}
    assert EncoderSpec.from_mapping(old) == EncoderSpec.from_mapping(spec)
    check_encoder_spec(old, spec)
    with pytest.raises(ValueError, match="tta"):
        check_encoder_spec(old, a.uns["stexp"]["features"]["tta"])
    # the default (Macenko) differs from the plain features: no cache hit across it, and it is recorded
    stexp.pp.embed_images(a, encoder=TinyEncoder(), device="cpu", key_added="default")
    assert a.uns["stexp"]["features"]["default"]["stain_norm"] == stexp.images.DEFAULT_STAIN_NORM == "macenko"
    assert not np.allclose(a.obsm["default"], plain)
    with pytest.raises(ValueError, match="stain_norm"):  # a model of normalised features refuses plain ones
        check_encoder_spec(spec, a.uns["stexp"]["features"]["default"])
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


def test_fit_without_features_key_uses_the_features_the_user_embedded():
    """Features embedded with stain_norm=None under the default key are used by tl.fit, not refused."""
    a = stexp.datasets.synthetic(n_slides=2, n_spots=48, n_genes=24)
    stexp.pp.embed_images(a, stain_norm=None, device="cpu", cache=False)
    model = stexp.tl.fit(a, model="ridge", calibrate=False)
    assert model.encoder_spec.stain_norm is None
    assert a.uns["stexp"]["features"][model.features_key].get("stain_norm") is None
