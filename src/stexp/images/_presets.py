"""Pathology foundation-model encoders as presets: ``encoder="uni"``, ``"uni2"``, ``"h_optimus_0"``, ``"virchow2"``...

Each :class:`Preset` records what its model card publishes: the architecture (a timm model name and
keyword arguments), the input size, the normalisation, which output tokens are pooled into one vector,
the output width, the files its repository holds and the layout of their keys. :func:`build_preset`
builds the architecture, loads the weights from a local file or folder (or, when asked with
``weights="hub"``, from the Hugging Face hub) and returns an :class:`~stexp.images.Encoder`.

Where the weights come from (``weights=`` of :func:`stexp.images.build_encoder` / ``embed_images``)
    ``"imagenet"`` / ``"pretrained"`` (the default): the preset's folder under
    ``stexp.settings.cachedir / "encoders" / <name>``; missing, a RuntimeError says what to download
    from which page and where to put it.
    a path: the weights file, or a folder holding one of the preset's file names (a hub snapshot).
    ``"hub"``: download from the Hugging Face hub (network, licence accepted on the model page,
    ``huggingface-cli login``); offline, a RuntimeError with the same instructions.
    ``None``: random initialisation (tests).

``docs/encoders.md`` cites the model card of every fact and says which could not be verified.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ._encoders import Encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Pooling rules: ``"cls"`` the class token; ``"cls+mean"`` the class token concatenated with the mean of the
#: patch tokens (register tokens skipped).
POOLS = ("cls", "cls+mean")
#: Key layouts of published checkpoints: timm's own state dict, or transformers' ``Dinov2Model``.
LAYOUTS = ("timm", "hf-dinov2", "conch")
#: The sub-folder of ``stexp.settings.cachedir`` where preset weights are looked for.
CACHE_SUBDIR = "encoders"


@dataclass(frozen=True)
class Preset:
    """A published pathology encoder and how to run it.

    Attributes
    ----------
    name
        The preset's name (``encoder=`` of :func:`stexp.pp.embed_images`).
    repo
        Its Hugging Face repository (``<org>/<model>``); the model card is ``https://huggingface.co/<repo>``.
    architecture
        The timm model name the weights belong to.
    kwargs
        ``timm.create_model`` arguments; classes as import paths (``"timm.layers.SwiGLUPacked"``).
    input_px
        Input side in pixels.
    mean, std
        Normalisation of ``[0, 1]`` pixels.
    pool
        One of :data:`POOLS`.
    out_dim
        Width of the pooled feature.
    n_prefix_tokens
        Tokens before the patch tokens (class and register tokens), skipped by ``"cls+mean"``.
    files
        File names the repository's weights come under, in order of preference.
    layout
        One of :data:`LAYOUTS`: the key names of the published checkpoint.
    params_m
        Parameters in millions as published (``None`` when not published).
    licence
        The weights' licence as the model card states it.
    gated
        Whether the hub repository asks users to accept terms before downloading.
    um_per_px
        The resolution the model was trained at (µm per pixel), when published.
    shapes
        Some keys of the published checkpoint and their shapes (a check of the architecture arguments).
    """

    name: str
    repo: str
    architecture: str
    kwargs: Mapping[str, Any]
    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pool: str
    out_dim: int
    n_prefix_tokens: int = 1
    files: tuple[str, ...] = ("pytorch_model.bin", "model.safetensors")
    layout: str = "timm"
    params_m: float | None = None
    licence: str = ""
    gated: bool = True
    um_per_px: float | None = 0.5
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"preset {self.name!r}: pool must be one of {POOLS}, got {self.pool!r}.")
        if self.layout not in LAYOUTS:
            raise ValueError(f"preset {self.name!r}: layout must be one of {LAYOUTS}, got {self.layout!r}.")

    @property
    def url(self) -> str:
        """The model card."""
        return f"https://huggingface.co/{self.repo}"

    def timm_kwargs(self) -> dict[str, Any]:
        """:attr:`kwargs` with import paths resolved (``num_classes=0``: no classifier)."""
        import importlib

        kwargs = dict(self.kwargs)
        for key, value in self.kwargs.items():
            if key.endswith("_layer") and isinstance(value, str):  # "timm.layers.SwiGLUPacked" -> the object
                module, _, attr = value.rpartition(".")
                kwargs[key] = getattr(importlib.import_module(module), attr)
        kwargs.setdefault("num_classes", 0)
        return kwargs

    def cache_dir(self) -> Path:
        """Where ``weights="imagenet"`` looks for the weights: ``stexp.settings.cachedir / "encoders" / <name>``."""
        from stexp._settings import settings

        return Path(settings.cachedir) / CACHE_SUBDIR / self.name

    def how_to_get(self) -> str:
        """What to download and where to put it."""
        gate = "accept its terms on the model page and log in (huggingface-cli login), then " if self.gated else ""
        return (
            f"{gate}download {' or '.join(self.files)} from {self.url} (e.g. huggingface_hub.hf_hub_download"
            f"({self.repo!r}, {self.files[0]!r}) on a machine with network access) and either pass weights=<that file "
            f"or its folder>, or put it in {self.cache_dir()} (then the default weights find it); weights='hub' "
            "downloads it when this machine is online."
        )


_SWIGLU = "timm.layers.SwiGLUPacked"
_SILU = "torch.nn.SiLU"

#: The built-in presets by name. Facts and their sources: ``docs/encoders.md``.
PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset, *, overwrite: bool = False) -> Preset:
    """Add a preset (its name then works as ``encoder=``); a taken name raises unless ``overwrite``."""
    from ._encoders import _REGISTRY

    if not overwrite and (preset.name in PRESETS or preset.name in _REGISTRY):
        raise ValueError(f"encoder name {preset.name!r} is taken; pass overwrite=True to replace it.")
    PRESETS[preset.name] = preset
    return preset


for _preset in (
    Preset(
        "uni",
        repo="MahmoodLab/UNI",
        architecture="vit_large_patch16_224",
        kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pool="cls",
        out_dim=1024,
        params_m=303.0,
        licence="CC-BY-NC-ND-4.0",
        shapes={
            "pos_embed": (1, 197, 1024),
            "patch_embed.proj.weight": (1024, 3, 16, 16),
            "blocks.23.ls2.gamma": (1024,),
        },  # fmt: skip
    ),
    Preset(
        "uni2",
        repo="MahmoodLab/UNI2-h",
        architecture="vit_giant_patch14_224",
        kwargs={
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "mlp_layer": _SWIGLU,
            "act_layer": _SILU,
            "reg_tokens": 8,
            "dynamic_img_size": True,
        },
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pool="cls",
        out_dim=1536,
        n_prefix_tokens=9,
        params_m=681.0,
        licence="CC-BY-NC-ND-4.0",
        shapes={
            "pos_embed": (1, 256, 1536),
            "reg_token": (1, 8, 1536),
            "patch_embed.proj.weight": (1536, 3, 14, 14),
            "blocks.0.mlp.fc1.weight": (8192, 1536),
            "blocks.0.mlp.fc2.weight": (1536, 4096),
        },  # fmt: skip
    ),
    Preset(
        "h_optimus_0",
        repo="bioptimus/H-optimus-0",
        architecture="vit_giant_patch14_reg4_dinov2",
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        input_px=224,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        pool="cls",
        out_dim=1536,
        n_prefix_tokens=5,
        params_m=1130.0,
        licence="Apache-2.0",
        shapes={"pos_embed": (1, 256, 1536), "reg_token": (1, 4, 1536), "patch_embed.proj.weight": (1536, 3, 14, 14)},
    ),
    Preset(
        "virchow2",
        repo="paige-ai/Virchow2",
        architecture="vit_huge_patch14_224",
        kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": _SWIGLU,
            "act_layer": _SILU,
        },
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pool="cls+mean",
        out_dim=2560,
        n_prefix_tokens=5,
        params_m=632.0,
        licence="CC-BY-NC-ND-4.0",
        shapes={
            "pos_embed": (1, 261, 1280),
            "reg_token": (1, 4, 1280),
            "patch_embed.proj.weight": (1280, 3, 14, 14),
            "blocks.0.mlp.fc1.weight": (6832, 1280),
            "blocks.0.mlp.fc2.weight": (1280, 3416),
        },  # fmt: skip
    ),
    Preset(
        "phikon_v2",
        repo="owkin/phikon-v2",
        architecture="vit_large_patch16_224",
        kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5},
        input_px=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pool="cls",
        out_dim=1024,
        files=("model.safetensors", "pytorch_model.bin"),
        layout="hf-dinov2",
        params_m=303.0,
        licence="see the model card (not verified here)",
        gated=False,
        shapes={
            "embeddings.position_embeddings": (1, 197, 1024),
            "embeddings.cls_token": (1, 1, 1024),
            "embeddings.patch_embeddings.projection.weight": (1024, 3, 16, 16),
            "encoder.layer.23.layer_scale2.lambda1": (1024,),
        },  # fmt: skip
    ),
    Preset(
        "conch",
        repo="MahmoodLab/CONCH",
        architecture="conch_ViT-B-16",
        kwargs={},
        input_px=448,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        pool="cls",
        out_dim=512,
        files=("pytorch_model.bin",),
        layout="conch",
        params_m=None,
        licence="CC-BY-NC-ND-4.0",
    ),
):
    PRESETS[_preset.name] = _preset


def list_presets() -> list[str]:
    """Names of the foundation-model presets."""
    return list(PRESETS)


def preset_table():
    """The presets as a DataFrame: repository, architecture, input size, normalisation, pooling, width, licence."""
    import pandas as pd

    return pd.DataFrame(
        [
            {
                "name": p.name,
                "repo": p.repo,
                "architecture": p.architecture,
                "input_px": p.input_px,
                "mean": p.mean,
                "std": p.std,
                "pool": p.pool,
                "out_dim": p.out_dim,
                "params_m": p.params_m,
                "files": p.files,
                "layout": p.layout,
                "licence": p.licence,
            }
            for p in PRESETS.values()
        ]
    ).set_index("name")


# -- building -------------------------------------------------------------------------------------------------
def build_architecture(preset: Preset, *, device: Any = None):
    """The preset's network with random weights (``device="meta"``: shapes only, no memory)."""
    import torch

    if preset.layout == "conch":
        raise ValueError(
            "preset 'conch' is built by MahmoodLab's conch package (pip install git+https://github.com/mahmoodlab/CONCH), "
            "not by timm; it has no random-weight build here."
        )
    import timm

    ctx = torch.device(device) if device is not None else None
    if ctx is None:
        return timm.create_model(preset.architecture, pretrained=False, **preset.timm_kwargs())
    with ctx:
        return timm.create_model(preset.architecture, pretrained=False, **preset.timm_kwargs())


def checkpoint_state(preset: Preset, vit) -> dict:
    """``vit``'s weights in the layout of the preset's published checkpoint (the inverse of :func:`_to_timm`)."""
    sd = vit.state_dict()
    if preset.layout == "timm":
        return dict(sd)
    return _timm_to_dinov2(sd, depth=len(vit.blocks))


def preset_checkpoint(encoder: Encoder) -> dict:
    """The weights of an encoder built from a preset, as the preset's published checkpoint holds them.

    ``torch.save(preset_checkpoint(enc), "pytorch_model.bin")`` writes a file that ``build_encoder(enc.name,
    weights=...)`` loads (key names and shapes of the published file; transformers' names for Phikon-v2).

    Raises
    ------
    ValueError
        If ``encoder`` was not built from a timm-based preset.
    """
    preset = PRESETS.get(encoder.name)
    vit = getattr(encoder.module, "vit", None)
    if preset is None or vit is None:
        raise ValueError(f"encoder {encoder.name!r} was not built from a timm-based preset ({list_presets()}).")
    return checkpoint_state(preset, vit)


def _pooled_module(preset: Preset, vit):
    import torch

    class PooledViT(torch.nn.Module):
        """A ViT whose output tokens are pooled as the model card says (class token, or with the patch mean)."""

        def __init__(self, vit, pool: str, n_prefix: int):
            super().__init__()
            self.vit, self.pool, self.n_prefix = vit, pool, n_prefix

        def forward(self, x):
            tokens = self.vit.forward_features(x)  # (B, prefix + patches, D), final norm applied
            cls = tokens[:, 0]
            if self.pool == "cls":
                return cls
            return torch.cat([cls, tokens[:, self.n_prefix :].mean(dim=1)], dim=1)

    return PooledViT(vit, preset.pool, preset.n_prefix_tokens)


def _conch_module(preset: Preset, file: str | None):
    import torch

    try:
        from conch.open_clip_custom import create_model_from_pretrained
    except ImportError as e:
        raise ImportError(
            "encoder 'conch' needs MahmoodLab's conch package (pip install git+https://github.com/mahmoodlab/CONCH); "
            f"its weights: {preset.how_to_get()}"
        ) from e
    if file is None:
        raise ValueError("encoder 'conch' cannot be randomly initialised here; pass its weights file.")
    model, _ = create_model_from_pretrained(preset.architecture, checkpoint_path=file)

    class ConchImage(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model.encode_image(x, proj_contrast=False, normalize=False)

    return ConchImage(model)


def resolve_weights(preset: Preset, weights: Any) -> tuple[str | None, str | None]:
    """``(file, weights_arg)``: the weights file to load (``None``: random) and what rebuilds the encoder.

    Raises
    ------
    RuntimeError
        The default weights are not in the cache folder, or the hub download failed; the message says what to
        download from where and where to put it.
    ValueError
        A path that is neither a file nor a folder holding one of the preset's files.
    """
    if weights is None or (isinstance(weights, str) and weights.lower() in ("random", "none")):
        return None, None
    if isinstance(weights, str) and weights in ("imagenet", "pretrained"):
        found = _find_file(preset, preset.cache_dir())
        if found is None:
            raise RuntimeError(
                f"encoder {preset.name!r}: no weights in {preset.cache_dir()}. To get them, {preset.how_to_get()}"
            )
        return found, "imagenet"
    if isinstance(weights, str) and weights == "hub":
        file = _download(preset)
        return file, file
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights).expanduser()
        if path.is_dir():
            found = _find_file(preset, path)
            if found is None:
                raise ValueError(
                    f"weights={str(weights)!r}: the folder holds none of {list(preset.files)} (the files of {preset.repo})."
                )
            return found, found
        if path.is_file():
            return str(path.resolve()), str(path.resolve())
        raise ValueError(f"weights={str(weights)!r}: no such file or folder. To get them, {preset.how_to_get()}")
    raise ValueError(
        f"weights must be 'imagenet' (the cache folder), 'hub', None (random) or a path; got {type(weights).__name__}."
    )


def _find_file(preset: Preset, folder: Path) -> str | None:
    for name in preset.files:
        if (folder / name).is_file():
            return str((folder / name).resolve())
    return None


def _download(preset: Preset) -> str:
    try:
        from huggingface_hub import hf_hub_download

        last: Exception | None = None
        for name in preset.files:
            try:
                return str(hf_hub_download(preset.repo, name))
            except Exception as e:  # noqa: BLE001 - EntryNotFound for the other name; network, gating: raised below
                last = e
        raise last or RuntimeError("no file")
    except Exception as e:  # huggingface_hub's errors differ between versions
        raise RuntimeError(
            f"encoder {preset.name!r}: could not download its weights from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Offline, or the model is gated: {preset.how_to_get()}"
        ) from e


def load_checkpoint(preset: Preset, vit, file: str) -> None:
    """Load a checkpoint in the preset's published layout into ``vit`` (strict: missing or extra keys raise)."""
    from ._encoders import _read_state_dict

    sd = _read_state_dict(file)
    if preset.layout == "hf-dinov2":
        sd = _dinov2_to_timm(sd)  # the mask token of masked-image training is dropped: unused at inference
    own = vit.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not k.startswith("head.")]
    wrong = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{len(x)} {what} (first: {x[:4]})"
            for what, x in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong))
            if x
        ]
        raise ValueError(
            f"weights file {file!r} is not the {preset.name!r} checkpoint ({preset.repo}, {preset.architecture}): "
            + "; ".join(parts)
            + "."
        )
    vit.load_state_dict({k: sd[k] for k in own}, strict=True)


def build_preset(name: str, weights: Any = "imagenet") -> Encoder:
    """Build the preset ``name`` as an :class:`~stexp.images.Encoder` (see the module docstring for ``weights``)."""
    import torch

    from ._encoders import _file_id, _finish, _norm_name

    preset = PRESETS[name]
    file, weights_arg = resolve_weights(preset, weights)
    if preset.layout == "conch":
        module = _conch_module(preset, file)
    else:
        vit = build_architecture(preset)
        if file is not None:
            load_checkpoint(preset, vit, file)
        module = _pooled_module(preset, vit)
    module.eval()
    with torch.no_grad():
        out = module(torch.zeros(1, 3, preset.input_px, preset.input_px))
    if tuple(out.shape) != (1, preset.out_dim):
        raise ValueError(
            f"encoder {name!r} returned shape {tuple(out.shape)} on one {preset.input_px} px patch, its card says "
            f"(1, {preset.out_dim}); the weights or timm version do not match the preset."
        )
    return _finish(
        module,
        name=name,
        input_px=preset.input_px,
        mean=tuple(preset.mean),
        std=tuple(preset.std),
        normalization=_norm_name(preset.mean, preset.std),
        out_dim=preset.out_dim,
        weights_id="random" if file is None else _file_id(file),
        weights_arg=weights_arg,
    )


# -- transformers' Dinov2Model layout (Phikon-v2) <-> timm's VisionTransformer ------------------------------------
_DINO_BLOCK = {
    "norm1.weight": "layer.{i}.norm1.weight",
    "norm1.bias": "layer.{i}.norm1.bias",
    "attn.proj.weight": "layer.{i}.attention.output.dense.weight",
    "attn.proj.bias": "layer.{i}.attention.output.dense.bias",
    "ls1.gamma": "layer.{i}.layer_scale1.lambda1",
    "norm2.weight": "layer.{i}.norm2.weight",
    "norm2.bias": "layer.{i}.norm2.bias",
    "mlp.fc1.weight": "layer.{i}.mlp.fc1.weight",
    "mlp.fc1.bias": "layer.{i}.mlp.fc1.bias",
    "mlp.fc2.weight": "layer.{i}.mlp.fc2.weight",
    "mlp.fc2.bias": "layer.{i}.mlp.fc2.bias",
    "ls2.gamma": "layer.{i}.layer_scale2.lambda1",
}
_DINO_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}


def _dinov2_to_timm(sd: dict) -> dict:
    """A ``Dinov2Model`` state dict (keys optionally prefixed ``dinov2.``) as timm ViT keys (q, k, v fused)."""
    import torch

    sd = {k.removeprefix("dinov2."): v for k, v in sd.items()}
    out = {timm_key: sd[hf_key] for timm_key, hf_key in _DINO_TOP.items() if hf_key in sd}
    depth = 1 + max((int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")), default=-1)
    for i in range(depth):
        for timm_key, hf_key in _DINO_BLOCK.items():
            key = "encoder." + hf_key.format(i=i)
            if key in sd:
                out[f"blocks.{i}.{timm_key}"] = sd[key]
        qkv = [f"encoder.layer.{i}.attention.attention.{p}" for p in ("query", "key", "value")]
        for part in ("weight", "bias"):
            if all(f"{q}.{part}" in sd for q in qkv):
                out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([sd[f"{q}.{part}"] for q in qkv], dim=0)
    return out


def _timm_to_dinov2(sd: dict, *, depth: int) -> dict:
    """The timm ViT keys as ``Dinov2Model`` keys (the inverse of :func:`_dinov2_to_timm`; tests write checkpoints with it)."""
    import torch

    out = {hf_key: sd[timm_key] for timm_key, hf_key in _DINO_TOP.items()}
    width = sd["cls_token"].shape[-1]
    out["embeddings.mask_token"] = torch.zeros(1, width)
    for i in range(depth):
        for timm_key, hf_key in _DINO_BLOCK.items():
            out["encoder." + hf_key.format(i=i)] = sd[f"blocks.{i}.{timm_key}"]
        for part in ("weight", "bias"):
            q, k, v = sd[f"blocks.{i}.attn.qkv.{part}"].chunk(3, dim=0)
            for name, t in (("query", q), ("key", k), ("value", v)):
                out[f"encoder.layer.{i}.attention.attention.{name}.{part}"] = t.clone()
    return out
