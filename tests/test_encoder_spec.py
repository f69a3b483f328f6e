"""``EncoderSpec.rebuildable`` / ``embed_kwargs()``: a features spec turns back into the ``embed_images`` call that
made the features, so ``stexp.tl.predict`` and ``stexp predict`` embed a new slide alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_wsi import _he, write_pyramid

import stexp
from stexp.images._spec import EncoderSpec

POOL = "test_spec_pool"
#: ``stexp predict`` / ``read_wsi`` grid of the small test slides (µm), as in test_wsi.py
GRID = {"spacing_um": 60.0, "spot_diameter_um": 40.0}


@pytest.fixture(scope="module", autouse=True)
def pool_encoder():
    """A parameter-free registry encoder that sees orientation: the 2x2 mean colour of the patch (12-d)."""
    from stexp.images._encoders import _REGISTRY, register_encoder

    @register_encoder(POOL, out_dim=12, input_px=16)
    def _build(pretrained: bool):
        import torch

        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())

    yield POOL
    _REGISTRY.pop(POOL, None)


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory):
    """A weights file of timm's small test_resnet, so a rebuilt encoder computes the same features."""
    pytest.importorskip("timm")
    from stexp.images import build_encoder

    path = tmp_path_factory.mktemp("weights") / "test_resnet.pt"
    import torch

    torch.save(build_encoder("timm:test_resnet", weights=None).module.state_dict(), path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# rebuildable / embed_kwargs


@pytest.mark.parametrize(
    ("spec", "rebuildable", "why"),
    [
        ({}, False, "no encoder is recorded"),
        ({"encoder": "callable:my_fn", "weights": "sha256:0123456789abcdef"}, False, "'callable:my_fn'"),
        ({"encoder": "callable:my-uni-v1", "weights": "id:my-uni-v1"}, False, "'callable:my-uni-v1'"),
        ({"encoder": "no_such_encoder", "weights": "imagenet", "weights_arg": "imagenet"}, False, "not a registered"),
        ({"encoder": "efficientnet_lite0", "weights": "imagenet"}, False, "weights_arg is missing"),
        ({"encoder": "efficientnet_lite0", "weights": "imagenet", "weights_arg": "imagenet"}, True, None),
        ({"encoder": "efficientnet_lite0", "weights": "random"}, True, None),
        ({"encoder": POOL, "weights": "random"}, True, None),
        ({"encoder": "timm:test_resnet", "weights": "sha256:0123", "weights_arg": "/models/w.pt"}, True, None),
        ({"encoder": "hf-hub:org/model", "weights": "timm:org/model", "weights_arg": "imagenet"}, True, None),
        ({"encoder": "local-dir:/models/uni", "weights": "sha256:0123", "weights_arg": "imagenet"}, True, None),
    ],
)
def test_rebuildable(spec, rebuildable, why):
    spec = EncoderSpec.from_mapping(spec)
    assert spec.rebuildable is rebuildable
    if rebuildable:
        kwargs = spec.embed_kwargs()
        assert kwargs["encoder"] == spec.encoder and kwargs["weights"] == spec.weights_arg
    else:
        with pytest.raises(ValueError, match="cannot be rebuilt from its spec") as err:
            spec.embed_kwargs()
        assert why in str(err.value)


def test_embed_kwargs_fields():
    spec = EncoderSpec.from_mapping(
        {
            "encoder": "timm:test_resnet",
            "weights": "random",
            "patch_um": {"a": 60, "b": 80},
            "encoder_kwargs": json.dumps({"global_pool": "max", "act_layer": {"__import__": "torch.nn.SiLU"}}),
            "mpp": 1,
            "stain_norm": "reinhard",
            "tta": True,
            "adapt_bn": True,
            "jpeg_quality": 30,
            "library_key": "sample",
        }
    )
    import torch

    kwargs = spec.embed_kwargs()
    assert kwargs == {
        "encoder": "timm:test_resnet",
        "weights": None,
        "encoder_kwargs": {"global_pool": "max", "act_layer": torch.nn.SiLU},
        "patch_um": {"a": 60.0, "b": 80.0},  # a per-library mapping is kept (it recreates those libraries)
        "mpp": 1.0,
        "stain_norm": "reinhard",
        "tta": True,
        "adapt_bn": True,
        "jpeg_quality": 30,
        "deblock": False,  # a record older than the option: nothing was deblocked
    }
    kwargs["patch_um"]["a"] = 1.0  # a copy: the frozen spec is not changed through it
    assert spec.patch_um == {"a": 60.0, "b": 80.0}
    plain = EncoderSpec(encoder=POOL, weights="random").embed_kwargs()
    assert plain == {
        "encoder": POOL,
        "weights": None,
        "encoder_kwargs": None,
        "patch_um": None,
        "mpp": None,
        "stain_norm": None,
        "tta": False,
        "adapt_bn": False,
        "jpeg_quality": None,
        "deblock": False,
    }


def _spec(adata, key):
    return EncoderSpec.from_mapping(adata.uns["stexp"]["features"][key])


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"encoder": POOL, "weights": None, "patch_um": {"slide_0": 50.0, "slide_1": 70.0}}, id="patch_um"),
        pytest.param({"encoder": POOL, "weights": None, "tta": True, "mpp": 3.0}, id="tta+mpp"),
        pytest.param({"encoder": POOL, "weights": None, "stain_norm": "reinhard", "patch_um": 60.0}, id="stain_norm"),
        pytest.param({"encoder": POOL, "weights": None, "stain_norm": "macenko", "patch_um": 60.0}, id="macenko"),
        pytest.param({"encoder": "timm:test_resnet", "encoder_kwargs": {"global_pool": "max"}}, id="encoder_kwargs"),
    ],
)
def test_embed_kwargs_round_trip(options, request):
    """embed with options -> spec -> embed_kwargs() -> embed_images: the same features and an equal spec."""
    if options["encoder"].startswith("timm:"):
        options = {**options, "weights": request.getfixturevalue("timm_weights")}
    adata = stexp.datasets.synthetic(n_slides=2, n_spots=16, n_genes=5, seed=3)
    first = stexp.pp.embed_images(adata, **options, key_added="X", device="cpu", cache=False, copy=True)
    spec = _spec(first, "X")
    assert spec.rebuildable
    kwargs = spec.embed_kwargs()
    again = stexp.pp.embed_images(adata, **kwargs, key_added="X", device="cpu", cache=False, copy=True)
    np.testing.assert_array_equal(again.obsm["X"], first.obsm["X"])
    assert _spec(again, "X") == spec
    assert not spec.diff(_spec(again, "X"), tuple(spec.to_dict()))


def test_finetune_encoder_uses_the_spec(timm_weights):
    from stexp.models._finetune import finetune_encoder

    spec = EncoderSpec(
        encoder="timm:test_resnet", weights="x", weights_arg=timm_weights, encoder_kwargs='{"global_pool":"max"}'
    )
    enc = finetune_encoder(spec)
    assert enc.module.global_pool.pool_type == "max" and enc.weights_arg == timm_weights
    with pytest.raises(ValueError, match="finetune_encoder=True rebuilds.*'callable:f' is a user-given module"):
        finetune_encoder(EncoderSpec(encoder="callable:f", weights="id:f"))


# ---------------------------------------------------------------------------------------------------------------
# stexp predict (CLI) predicts every model stexp.tl.predict predicts


def _slide(path, image, kind: str):
    """A pyramidal OME-TIFF (read region by region) or a PNG (decoded whole: needs --mpp 2)."""
    if kind == "png":
        from PIL import Image

        Image.fromarray(image).save(path.with_suffix(".png"))
        return path.with_suffix(".png"), ["--mpp", "2"]
    return write_pyramid(path.with_suffix(".ome.tif"), image, kind="ome"), []


def _fit_model(tmp_path, kind: str, options: dict):
    """A ridge model on features embedded with ``options`` of pseudo-spots with made-up counts, saved."""
    import scipy.sparse as sp

    path, mpp = _slide(tmp_path / "train", _he(240, 320, seed=1), kind)
    adata = stexp.io.read_wsi(path, mpp=2.0 if mpp else None, genes=["G1", "G2", "G3"], **GRID)
    stexp.pp.embed_images(adata, **options, device="cpu", cache=False, key_added="X_img")
    f = adata.obsm["X_img"].astype(np.float64)
    z = (f - f.mean(0)) / (f.std(0) + 1e-6)
    rng = np.random.default_rng(0)
    mean = np.exp(2 + np.tanh(z @ rng.normal(size=(f.shape[1], 3)) / np.sqrt(f.shape[1])))
    adata.X = sp.csr_matrix(rng.poisson(mean * 5).astype(np.float32))
    adata.uns["stexp"].pop("unmeasured", None)
    model = stexp.tl.fit(adata, model="ridge", features_key="X_img")
    return model.save(tmp_path / "model"), mpp


CLI_CASES = [
    pytest.param("ome", {"encoder": POOL, "weights": None, "patch_um": 40.0, "tta": True}, id="tta"),
    pytest.param("png", {"encoder": POOL, "weights": None, "patch_um": 40.0, "mpp": 4.0}, id="mpp"),
    pytest.param("ome", {"encoder": POOL, "weights": None, "patch_um": 40.0, "stain_norm": "reinhard"}, id="stain"),
    pytest.param("ome", {"encoder": POOL, "weights": None, "patch_um": 40.0, "stain_norm": "macenko"}, id="macenko"),
    pytest.param(
        "ome",
        {"encoder": "timm:test_resnet", "encoder_kwargs": {"global_pool": "max"}, "patch_um": 40.0},
        id="kwargs",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize(("kind", "options"), CLI_CASES)
def test_cli_predicts_what_tl_predict_predicts(tmp_path, kind, options, request, capsys):
    import anndata as ad

    from stexp.cli import main
    from stexp.tl._storage import read_prediction

    if options["encoder"].startswith("timm:"):
        options = {**options, "weights": request.getfixturevalue("timm_weights")}
    model_dir, mpp = _fit_model(tmp_path, kind, options)
    slide, _ = _slide(tmp_path / "slide", _he(240, 320, seed=2), kind)
    out = tmp_path / "pred.h5ad"
    argv = ["predict", str(slide), "--model", str(model_dir), "--out", str(out), "--device", "cpu", "--quiet",
            "--spacing-um", "60", "--spot-diameter-um", "40", "--batch-size", "7", *mpp]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err

    model = stexp.models.load(model_dir, device="cpu")
    adata = stexp.io.read_wsi(slide, mpp=2.0 if mpp else None, genes=list(model.genes), **GRID)
    stexp.tl.predict(adata, model, device="cpu")
    cli = ad.read_h5ad(out)
    assert list(cli.obs_names) == list(adata.obs_names)
    genes, expected = read_prediction(adata, "stexp_pred")
    cli_genes, got = read_prediction(cli, "stexp_pred")
    assert list(cli_genes) == list(genes) and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # the slide's features were made as the model's were (the view options included)
    feats = EncoderSpec.from_mapping(cli.uns["stexp"]["features"][model.features_key])
    assert not model.encoder_spec.diff(feats)
    assert feats.tta == options.get("tta", False) and feats.mpp == options.get("mpp")


def test_cli_and_predict_refuse_a_callable_encoder_alike(tmp_path, capsys):
    import torch

    from stexp.cli import main

    def mean_colour(x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)

    model_dir, _ = _fit_model(tmp_path, "ome", {"encoder": mean_colour, "patch_um": 40.0})
    slide, _ = _slide(tmp_path / "slide", _he(240, 320, seed=2), "ome")
    argv = ["predict", str(slide), "--model", str(model_dir), "--out", str(tmp_path / "p.h5ad"), "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "callable:" in err and "cannot be rebuilt" in err and "stexp.pp.embed_images" in err
    model = stexp.models.load(model_dir, device="cpu")
    adata = stexp.io.read_wsi(slide, genes=list(model.genes), **GRID)
    with pytest.raises(KeyError, match="'callable:.*mean_colour' is a user-given module"):
        stexp.tl.predict(adata, model)


def test_predict_with_per_library_patch_sizes():
    """A model on features cut at different sizes per library re-embeds its own libraries; a new one is refused."""
    adata = stexp.datasets.synthetic(n_slides=2, n_spots=32, n_genes=5, seed=3)
    stexp.pp.embed_images(
        adata, encoder=POOL, weights=None, patch_um={"slide_0": 50.0, "slide_1": 70.0}, device="cpu", cache=False
    )
    key = f"X_stexp_{POOL}"
    model = stexp.tl.fit(adata, model="ridge", features_key=key)
    fresh = adata.copy()
    del fresh.obsm[key]
    stexp.tl.predict(fresh, model)
    np.testing.assert_array_equal(fresh.obsm[key], adata.obsm[key])
    new = fresh[fresh.obs["library_id"] == "slide_0"].copy()
    del new.obsm[key]
    new.obs["library_id"] = new.obs["library_id"].cat.rename_categories({"slide_0": "other"})
    new.uns["spatial"] = {"other": new.uns["spatial"]["slide_0"]}
    with pytest.raises(ValueError, match=r"different patch size per library .* \['other'\] is unknown"):
        stexp.tl.predict(new, model)
