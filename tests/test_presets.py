"""Foundation-model presets (``encoder="uni"``, ...): architecture, checkpoint layout, loading, pooling, offline errors.

The real models are 0.3-1.1 B parameters: here every preset is built on the ``meta`` device (no memory, no weights)
to check its parameter count, the key names and shapes of its published checkpoint and its output width; the full
save -> load -> embed round trip runs on small stand-ins that share each preset's layout and pooling rule.
``benchmarks/encoder_presets.py`` runs the round trip of every real preset.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import stexp
from stexp.images import build_encoder, list_encoders
from stexp.images._presets import (
    PRESETS,
    Preset,
    build_architecture,
    checkpoint_state,
    register_preset,
)

timm = pytest.importorskip("timm")

REAL = [name for name, p in PRESETS.items() if p.layout != "conch"]


@pytest.mark.parametrize("name", REAL)
def test_each_preset_matches_its_card_on_the_meta_device(name):
    preset = PRESETS[name]
    vit = build_architecture(preset, device="meta")
    n_params = sum(p.numel() for p in vit.parameters()) / 1e6
    assert n_params == pytest.approx(preset.params_m, rel=0.01), f"{name}: {n_params:.1f} M parameters"
    state = checkpoint_state(preset, vit)
    for key, shape in preset.shapes.items():
        assert key in state, f"{name}: the published checkpoint has {key!r}"
        assert tuple(state[key].shape) == tuple(shape), key
    from stexp.images._presets import _pooled_module

    with torch.no_grad():
        out = _pooled_module(preset, vit)(torch.empty(2, 3, preset.input_px, preset.input_px, device="meta"))
    assert tuple(out.shape) == (2, preset.out_dim)
    assert name in list_encoders()


def _tiny(base: str, name: str) -> Preset:
    """A small stand-in of ``base``: same layout, pooling, register tokens and MLP kind, 2 blocks of width 48."""
    preset = PRESETS[base]
    kwargs = {**preset.kwargs, "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
    width = 48 * (2 if preset.pool == "cls+mean" else 1)
    return dataclasses.replace(preset, name=name, kwargs=kwargs, input_px=32, out_dim=width, params_m=None, shapes={})


@pytest.fixture
def tiny_presets():
    names = {}
    for base in ("uni", "virchow2", "phikon_v2"):
        tiny = _tiny(base, f"tiny_{base}")
        register_preset(tiny, overwrite=True)
        names[base] = tiny.name
    yield names
    for name in names.values():
        PRESETS.pop(name, None)


@pytest.mark.parametrize("base", ["uni", "virchow2", "phikon_v2"])  # class token; +patch mean, registers; HF keys
def test_round_trip_through_the_published_layout(base, tiny_presets, tmp_path):
    """Random weights saved as the published checkpoint (key names and shapes) load through the preset and embed."""
    from safetensors.torch import save_file

    preset = PRESETS[tiny_presets[base]]
    torch.manual_seed(0)
    vit = build_architecture(preset).eval()
    state = checkpoint_state(preset, vit)
    if preset.layout == "hf-dinov2":  # transformers' names, not timm's
        assert "embeddings.cls_token" in state and "encoder.layer.0.attention.attention.query.weight" in state
        assert not any(k.startswith("blocks.") for k in state)
    folder = tmp_path / base
    folder.mkdir()
    if preset.files[0].endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / preset.files[0]))
    else:
        torch.save(state, folder / preset.files[0])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit.forward_features(x)
    expected = tokens[:, 0] if preset.pool == "cls" else torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], 1)
    for weights in (folder, folder / preset.files[0]):  # a folder (hub snapshot) or the file itself
        enc = build_encoder(preset.name, weights=weights)
        assert enc.out_dim == preset.out_dim and enc.input_px == 32 and enc.weights_id.startswith("sha256:")
        assert enc.mean == pytest.approx(preset.mean) and enc.std == pytest.approx(preset.std)
        with torch.no_grad():
            torch.testing.assert_close(enc.module(x), expected)
    if base != "uni":  # the weights arguments below do not depend on the layout
        return
    # the default weights: the preset's folder in the cache
    cache = preset.cache_dir()
    cache.mkdir(parents=True)
    (cache / preset.files[0]).write_bytes((folder / preset.files[0]).read_bytes())
    enc = build_encoder(preset.name)
    assert enc.weights_arg == "imagenet"
    with torch.no_grad():
        torch.testing.assert_close(enc.module(x), expected)
    random = build_encoder(preset.name, weights=None)
    with torch.no_grad():
        assert not torch.allclose(random.module(x), expected)


def test_register_tokens_are_skipped_by_cls_mean(tiny_presets):
    preset = PRESETS[tiny_presets["virchow2"]]
    vit = build_architecture(preset).eval()
    assert vit.num_prefix_tokens == preset.n_prefix_tokens == 5  # class token and 4 registers


def test_a_checkpoint_of_another_model_is_refused(tiny_presets, tmp_path):
    uni = PRESETS[tiny_presets["uni"]]
    other = build_architecture(PRESETS[tiny_presets["virchow2"]])
    torch.save(other.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="is not the 'tiny_uni' checkpoint") as exc:
        build_encoder(uni.name, weights=tmp_path / "pytorch_model.bin")
    assert "missing keys" in str(exc.value) or "shape mismatches" in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds none of"):
        build_encoder(uni.name, weights=tmp_path / "empty")
    with pytest.raises(ValueError, match="architecture is fixed"):
        build_encoder("uni", weights=None, init_values=1.0)


def test_missing_weights_say_what_to_download_and_where(monkeypatch):
    import time

    import huggingface_hub.constants

    with pytest.raises(RuntimeError) as exc:
        build_encoder("virchow2")  # nothing in the cache folder: before any network or model building
    msg = str(exc.value)
    assert "https://huggingface.co/paige-ai/Virchow2" in msg and str(PRESETS["virchow2"].cache_dir()) in msg
    assert "pytorch_model.bin" in msg and "weights=" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="could not download its weights") as exc:
        build_encoder("uni", weights="hub")
    assert "MahmoodLab/UNI" in str(exc.value) and time.perf_counter() - t0 < 10
    with pytest.raises((ImportError, ValueError), match="conch"):
        build_encoder("conch", weights=None)


def test_embed_images_with_a_preset(tiny_presets, tmp_path):
    """A preset is an encoder like any other: embed_images records it, and the spec rebuilds it."""
    preset = PRESETS[tiny_presets["virchow2"]]
    vit = build_architecture(preset)
    torch.save(checkpoint_state(preset, vit), tmp_path / "pytorch_model.bin")
    adata = stexp.datasets.synthetic(n_slides=1, n_spots=12, n_genes=5, seed=0)
    stexp.pp.embed_images(adata, encoder=preset.name, weights=tmp_path / "pytorch_model.bin", device="cpu", cache=False)
    key = f"X_stexp_{preset.name}"
    assert adata.obsm[key].shape == (12, preset.out_dim) and np.isfinite(adata.obsm[key]).all()
    spec = stexp.images.EncoderSpec.from_mapping(adata.uns["stexp"]["features"][key])
    assert spec.rebuildable and spec.embed_kwargs()["weights"] == str((tmp_path / "pytorch_model.bin").resolve())
