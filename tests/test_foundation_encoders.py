"""Foundation-model style encoders: local timm/HF folders, encoder_kwargs, encoder_id caching, offline hub errors.

A small randomly initialised timm ViT saved the way timm and the Hugging Face hub keep models (config.json +
weights) stands in for UNI / H-optimus-0 / Virchow2, whose weights cannot be downloaded here.
"""

from __future__ import annotations

import functools
import json

import anndata
import numpy as np
import pytest
import torch

import stexp
from stexp.images import build_encoder
from stexp.images._encoders import encoder_kwargs_from_json, encoder_kwargs_to_json
from stexp.images._spec import EncoderSpec

timm = pytest.importorskip("timm")

ARCH = "vit_tiny_patch16_224"
MEAN, STD = (0.1, 0.2, 0.3), (0.6, 0.5, 0.4)


def _save_folder(path, *, weights: str = "safetensors", **model_kwargs):
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(
        ARCH,
        pretrained=False,
        num_classes=0,
        img_size=32,
        pretrained_cfg_overlay={"mean": MEAN, "std": STD},
        **model_kwargs,
    )
    save_for_hf(model, path, model_args={"img_size": 32}, safe_serialization=weights == "safetensors")
    return model.eval()


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-vit"
    model = _save_folder(path)
    return path, model


@pytest.fixture(scope="module")
def small(_synthetic_cached):
    return stexp.datasets.synthetic(n_slides=2, n_spots=24, n_genes=10, seed=3)


def test_local_folder_loads_weights_normalisation_and_input_size(vit_dir):
    path, model = vit_dir
    enc = build_encoder(path)
    assert enc.name == f"local-dir:{path.resolve()}"
    assert enc.input_px == 32 and enc.mean == pytest.approx(MEAN) and enc.std == pytest.approx(STD)
    assert enc.out_dim == 192 and enc.weights_id.startswith("sha256:") and enc.weights_arg == "imagenet"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.module(x), model(x))
    # the string path and the explicit timm prefix name the same encoder; random init of the same architecture
    assert build_encoder(str(path)).weights_id == enc.weights_id
    assert build_encoder(f"local-dir:{path}").name == enc.name
    rand = build_encoder(path, weights=None)
    assert rand.weights_id == "random"
    with torch.no_grad():
        assert not torch.allclose(rand.module(x), model(x))


def test_local_folder_with_pytorch_bin_and_errors(tmp_path):
    model = _save_folder(tmp_path / "bin-vit", weights="bin")
    assert (tmp_path / "bin-vit" / "pytorch_model.bin").is_file()
    enc = build_encoder(tmp_path / "bin-vit")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.module(x), model(x))
    with pytest.raises(ValueError, match="no such model folder"):
        build_encoder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        build_encoder(str(tmp_path / "empty"))
    # kwargs that change the architecture do not fit the saved weights: a clear error
    with pytest.raises(ValueError, match="must describe the architecture"):
        build_encoder(tmp_path / "bin-vit", init_values=1e-5)


def test_timm_name_with_local_weights_file_and_kwargs(tmp_path):
    """encoder='timm:<arch>', weights=<file>, kwargs as UNI needs them (layer scale, dynamic image size)."""
    torch.manual_seed(1)
    kwargs = {"img_size": 32, "init_values": 1e-5, "dynamic_img_size": True}
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **kwargs).eval()
    torch.save(model.state_dict(), tmp_path / "w.bin")
    enc = build_encoder(f"timm:{ARCH}", weights=tmp_path / "w.bin", **kwargs)
    assert enc.input_px == 32 and enc.kwargs_json == encoder_kwargs_to_json(kwargs)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc.module(x), model(x))
    # without the kwargs the file does not fit: the error names the offending keys
    with pytest.raises(ValueError, match="does not fit architecture"):
        build_encoder(f"timm:{ARCH}", weights=tmp_path / "w.bin", img_size=32)
    with pytest.raises(ValueError, match="not a timm model"):
        build_encoder("efficientnet_lite0", init_values=1e-5)


def test_kwargs_json_round_trip_with_classes():
    kwargs = {
        "init_values": 1e-5,
        "img_size": (32, 32),
        "act_layer": torch.nn.SiLU,
        "mlp_layer": timm.layers.SwiGLUPacked,
    }
    text = encoder_kwargs_to_json(kwargs)
    assert json.loads(text)["act_layer"] == {"__import__": "torch.nn.modules.activation.SiLU"}
    back = encoder_kwargs_from_json(text)
    assert back["act_layer"] is torch.nn.SiLU
    packed = timm.layers.SwiGLUPacked
    if isinstance(packed, functools.partial):
        assert back["mlp_layer"].func is packed.func and back["mlp_layer"].keywords == packed.keywords
    else:
        assert back["mlp_layer"] is packed
    assert back["img_size"] == [32, 32] and encoder_kwargs_to_json(back) == text
    assert encoder_kwargs_to_json({}) is None and encoder_kwargs_from_json(None) == {}
    with pytest.raises(ValueError, match="cannot be recorded"):
        encoder_kwargs_to_json({"f": lambda x: x})


def test_spec_tolerates_records_without_kwargs():
    old = {"encoder": "timm:x", "weights": "random", "patch_um": 100.0, "patch_px": 32, "normalization": "imagenet"}
    spec = EncoderSpec.from_mapping(old)
    assert spec.encoder_kwargs is None and "encoder_kwargs" not in spec.to_uns()
    assert not spec.diff(old)
    new = EncoderSpec.from_mapping({**old, "encoder_kwargs": {"b": 1, "a": True}})
    assert new.encoder_kwargs == '{"a":true,"b":1}'
    assert any(d.startswith("encoder_kwargs") for d in spec.diff(new))


def test_embed_kwargs_change_the_spec_and_the_cache(vit_dir, small, tmp_path, caplog):
    path, _ = vit_dir
    kw = {"dynamic_img_size": True}
    adata = small.copy()
    stexp.pp.embed_images(adata, encoder=path, device="cpu")
    key = "X_stexp_tiny-vit"
    rec = adata.uns["stexp"]["features"][key]
    assert "encoder_kwargs" not in rec and rec["patch_px"] == 32
    assert rec["normalization"].startswith("custom:0.1,0.2,0.3")
    with pytest.raises(ValueError, match="encoder_kwargs"):  # other kwargs: not the stored features
        stexp.pp.embed_images(adata, encoder=path, encoder_kwargs=kw, device="cpu")
    stexp.pp.embed_images(adata, encoder=path, encoder_kwargs=kw, key_added="X_kw", device="cpu")
    rec = adata.uns["stexp"]["features"]["X_kw"]
    assert json.loads(rec["encoder_kwargs"]) == kw
    # dynamic_img_size does not change the computation at the native size: same features, separate identity
    np.testing.assert_allclose(adata.obsm["X_kw"], adata.obsm[key], atol=1e-5)
    # the record writes to h5ad and reads back as the same spec
    adata.write_h5ad(tmp_path / "a.h5ad")
    back = anndata.read_h5ad(tmp_path / "a.h5ad")
    assert not EncoderSpec.from_mapping(back.uns["stexp"]["features"]["X_kw"]).diff(rec)
    # the second call with the same kwargs is up to date; a fresh AnnData loads from the disk cache
    stexp.pp.embed_images(adata, encoder=path, encoder_kwargs=kw, key_added="X_kw", device="cpu")
    fresh = small.copy()
    import logging

    with caplog.at_level(logging.INFO, logger="stexp"):
        stexp.pp.embed_images(fresh, encoder=path, encoder_kwargs=kw, key_added="X_kw", device="cpu")
    assert f"{small.n_obs} spots loaded from the disk cache" in caplog.text
    np.testing.assert_array_equal(fresh.obsm["X_kw"], adata.obsm["X_kw"])


def test_callable_with_encoder_id_is_cached(small, caplog):
    import logging

    calls = []

    def pool(x):
        calls.append(x.shape[0])
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    a = small.copy()
    stexp.pp.embed_images(a, encoder=pool, encoder_id="my-pool-v1", device="cpu")
    key = "X_stexp_callable_my-pool-v1"
    assert a.uns["stexp"]["features"][key]["weights"] == "id:my-pool-v1"
    n = sum(calls)
    assert n >= small.n_obs
    stexp.pp.embed_images(a, encoder=pool, encoder_id="my-pool-v1", device="cpu")  # up to date: only the probe
    b = small.copy()
    with caplog.at_level(logging.INFO, logger="stexp"):
        stexp.pp.embed_images(b, encoder=pool, encoder_id="my-pool-v1", device="cpu")
    assert sum(calls) - n <= 4  # two probe batches of 2, no patch
    assert "loaded from the disk cache" in caplog.text
    np.testing.assert_array_equal(a.obsm[key], b.obsm[key])
    # sharding through the cache: libraries embedded separately, then the whole AnnData loads them all
    c = small.copy()
    for lib in c.obs["library_id"].unique():
        part = c[c.obs["library_id"] == lib].copy()
        stexp.pp.embed_images(part, encoder=pool, encoder_id="my-pool-v2", device="cpu")
    before = sum(calls)
    stexp.pp.embed_images(c, encoder=pool, encoder_id="my-pool-v2", device="cpu")
    assert sum(calls) - before <= 2
    with pytest.raises(ValueError, match="encoder_id"):
        build_encoder("efficientnet_lite0", encoder_id="x")


def test_hub_download_failure_names_the_local_alternative(monkeypatch):
    import time

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    t0 = time.perf_counter()
    for weights in ("imagenet", None):
        with pytest.raises(RuntimeError, match="nonexistent-org-xyz/nope") as exc:
            build_encoder("hf-hub:nonexistent-org-xyz/nope", weights=weights)
        msg = str(exc.value)
        assert "Hugging Face hub" in msg and "encoder=<folder>" in msg and "config.json" in msg
    assert time.perf_counter() - t0 < 10  # no network wait


@pytest.mark.slow
def test_finetune_rebuilds_the_encoder_with_its_kwargs():
    """finetune_encoder=True rebuilds the timm encoder from the spec, recorded kwargs included (max pooling here)."""
    adata = stexp.datasets.synthetic(n_slides=2, n_spots=32, n_genes=10, seed=1)
    stexp.pp.embed_images(
        adata,
        encoder="timm:test_resnet",
        weights=None,
        encoder_kwargs={"global_pool": "max"},
        device="cpu",
        cache=False,
    )
    key = "X_stexp_timm_test_resnet"
    assert json.loads(adata.uns["stexp"]["features"][key]["encoder_kwargs"]) == {"global_pool": "max"}
    est = stexp.tl.fit(
        adata,
        model="mclstexp",
        features_key=key,
        finetune_encoder=True,
        max_epochs=1,
        batch_size=32,
        device="cpu",
        projection_dim=16,
        n_heads=2,
        head_dim=8,
        top_k=5,
    )
    assert est.encoder.kwargs_json == '{"global_pool":"max"}'
    assert est.encoder.module.global_pool.pool_type == "max"
    assert not est.encoder_spec.diff(adata.uns["stexp"]["features"][key])
