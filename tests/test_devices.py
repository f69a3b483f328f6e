"""Devices are checked once, where they enter: the accepted forms, a GPU this machine lacks, and every entry point."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import stexp
from stexp._devices import check_device

FEATURES = "X_random"
POOL = "test_devices_pool"


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine without CUDA, whatever this one has."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def small():
    adata = stexp.datasets.synthetic(n_slides=2, n_spots=32, n_genes=5, seed=1)
    adata.obsm[FEATURES] = np.random.default_rng(0).normal(size=(adata.n_obs, 4)).astype(np.float32)
    adata.uns.setdefault("stexp", {}).setdefault("features", {})[FEATURES] = {"encoder": "random"}
    return adata


@pytest.fixture
def pool_encoder():
    from stexp.images._encoders import _REGISTRY, register_encoder

    @register_encoder(POOL, out_dim=3, input_px=16)
    def _build(pretrained: bool):
        import torch

        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())

    yield POOL
    _REGISTRY.pop(POOL, None)


# -- the check itself ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_cpu_and_auto_accepted_anywhere(device, no_cuda):
    assert check_device(device) == device


def test_torch_device_taken_as_its_string():
    import torch

    assert check_device(torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_gpus_this_machine_has_accepted(device, two_gpus):
    assert check_device(device) == device


@pytest.mark.parametrize(
    ("device", "hint"),
    [
        ("gpu", "For a GPU pass 'cuda'."),
        ("GPU:1", "For a GPU pass 'cuda:1'."),
        ("CUDA", "Did you mean 'cuda'?"),
        (" cpu", "Did you mean 'cpu'?"),
        ("", ""),
        ("tpu", ""),
        ("cuda:x", ""),
        ("cuda:-1", ""),
        ("cpu,cuda", ""),
    ],
)
def test_unknown_forms_named_with_the_accepted_ones(device, hint, two_gpus):
    with pytest.raises(ValueError, match="is not a device stexp runs on") as err:
        check_device(device)
    message = str(err.value)
    assert f"device={device!r}" in message and "'cpu', 'cuda', 'cuda:N' (N: a GPU index) or 'mps'" in message
    assert message.endswith(hint)


@pytest.mark.parametrize("device", [None, 0, 1.5, ["cuda"]])
def test_non_strings_refused(device):
    with pytest.raises(
        ValueError, match=rf"device must be a string, .*; got {re.escape(repr(device))} \({type(device).__name__}\)"
    ):
        check_device(device)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_on_a_machine_without_cuda(device, no_cuda):
    with pytest.raises(ValueError, match="CUDA is not available on this machine") as err:
        check_device(device)
    assert f"device={device!r}" in str(err.value) and "pass device='cpu', or device='auto'" in str(err.value)


def test_cuda_index_beyond_the_visible_devices(two_gpus):
    with pytest.raises(
        ValueError, match=r"device='cuda:2', but this machine has 2 visible CUDA device\(s\) \(cuda:0 .. cuda:1\)"
    ):
        check_device("cuda:2")


def test_mps(monkeypatch):
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"MPS \(the Apple GPU\) is not available on this machine; pass device='cpu'"):
        check_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert check_device("mps") == "mps"


def test_auto_checks_the_settings_device(monkeypatch, no_cuda):
    monkeypatch.setattr(stexp.settings, "device", "gpu")
    with pytest.raises(ValueError, match=r"stexp.settings.device='gpu' is not a device"):
        check_device("auto")
    monkeypatch.setattr(stexp.settings, "device", "cuda")
    with pytest.raises(ValueError, match=r"stexp.settings.device='cuda', but CUDA is not available"):
        check_device("auto")
    assert check_device("cpu") == "cpu"  # an explicit device does not read the setting


def test_cpu_and_auto_do_not_import_torch():
    code = (
        "import sys, stexp; from stexp._devices import check_device; "
        "check_device('cpu'); check_device('auto'); print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# -- every entry point refuses before any work ----------------------------------------------------------


def test_fit_refuses_before_training(small, no_cuda, monkeypatch):
    from stexp.tl import _fit

    monkeypatch.setattr(_fit, "fit_recipe", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match="device='cuda', but CUDA is not available"):
        stexp.tl.fit(small, model="ridge", features_key=FEATURES, device="cuda")
    with pytest.raises(ValueError, match="device='gpu' is not a device"):
        stexp.tl.fit(small, model="ridge", features_key=FEATURES, device="gpu")


def test_cross_validate_refuses_before_any_fold(small, no_cuda):
    with pytest.raises(ValueError, match="device='cuda:0', but CUDA is not available"):
        stexp.tl.cross_validate(small, model="ridge", features_key=FEATURES, device="cuda:0")


def test_load_refuses_a_device_this_machine_lacks(small, tmp_path, no_cuda):
    """Before: load(device="cuda") was accepted and the next predict failed with torch's "Found no NVIDIA driver"."""
    path = stexp.tl.fit(small, model="ridge", features_key=FEATURES, calibrate=False).save(tmp_path / "m")
    with pytest.raises(ValueError, match="device='cuda', but CUDA is not available.*device='cpu'"):
        stexp.models.load(path, device="cuda")
    with pytest.raises(ValueError, match="device='gpu'"):  # checked before the folder is read
        stexp.models.load(tmp_path / "nowhere", device="gpu")
    assert stexp.models.load(path, device="cpu").device == "cpu"


def test_predict_refuses_and_leaves_adata_alone(small, no_cuda):
    model = stexp.tl.fit(small, model="ridge", features_key=FEATURES, calibrate=False)
    before = (set(small.layers), set(small.obsm), set(small.var.columns), set(small.uns["stexp"]))
    for device, match in (("cuda", "CUDA is not available"), ("gpu", "is not a device")):
        with pytest.raises(ValueError, match=match):
            stexp.tl.predict(small, model, device=device)
    assert (set(small.layers), set(small.obsm), set(small.var.columns), set(small.uns["stexp"])) == before
    stexp.tl.predict(small, model, device="cpu")
    assert "stexp_pred" in small.layers


def test_embed_refuses_even_when_the_features_are_up_to_date(small, pool_encoder, no_cuda):
    """Before: with the features in place (or cached) the device was never looked at, so a wrong one passed."""
    stexp.pp.embed_images(small, encoder=POOL, weights=None, patch_um=40, device="cpu", cache=False)
    with pytest.raises(ValueError, match="device='cuda', but CUDA is not available"):
        stexp.pp.embed_images(small, encoder=POOL, weights=None, patch_um=40, device="cuda", cache=False)


def test_predict_embeds_on_its_device(small, pool_encoder, monkeypatch):
    """tl.predict embeds missing features where it predicts: its device, else the model's."""
    stexp.pp.embed_images(small, encoder=POOL, weights=None, patch_um=40, device="cpu", cache=False)
    key = f"X_stexp_{POOL}"
    model = stexp.tl.fit(small, model="ridge", features_key=key, calibrate=False)
    del small.obsm[key]
    seen = []

    def embed_images(adata, **kwargs):
        seen.append(kwargs["device"])
        raise RuntimeError("stop")

    monkeypatch.setattr(stexp.pp, "embed_images", embed_images)
    for device, model_device in (("cpu", "auto"), (None, "cpu"), (None, "auto")):
        model.device = model_device
        with pytest.raises(RuntimeError, match="stop"):
            stexp.tl.predict(small, model, device=device)
    assert seen == ["cpu", "cpu", "auto"]
