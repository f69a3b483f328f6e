"""End-to-end fine-tuning of the image encoder: shared by every model that takes ``finetune_encoder=True``.

A model fine-tunes the encoder that made its frozen features: :func:`finetune_encoder` rebuilds it from
the features' spec (``adata.uns["stexp"]["features"][key]``, the same name, weights and patch size), so
a fine-tuned model and its frozen twin start from the same point and the spec check of
:func:`stexp.tl.predict` keeps meaning something. The frozen features are still used once, for the
z-scoring statistics of the encoder's output (the projection heads then see the same scale as on
frozen features). Patches are cut once per slide into memory (:class:`stexp.images.PatchDataset`) and
augmented per item (flips, 90° rotations, colour jitter).

Imported only by models that fine-tune (this module imports torch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stexp.models._data import SpotData

#: Hyper-parameters of every model that can fine-tune its encoder, with their defaults.
FINETUNE_HPARAMS: dict[str, Any] = {
    "finetune_encoder": False,  # train the encoder that made the features end to end on patches
    "augment": True,  # flips, 90° rotations and colour jitter of the training patches
    "encoder_lr": None,  # the encoder's learning rate (None: the model's lr)
    "num_workers": 0,  # DataLoader workers that cut and augment patches
}


def finetune_encoder(spec: dict[str, Any], *, pretrained: bool = True):
    """Rebuild the image encoder recorded in a features spec, for training or to load fine-tuned weights into.

    Parameters
    ----------
    spec
        The spec :func:`stexp.pp.embed_images` recorded for the features (``encoder``, ``weights_arg``...).
    pretrained
        Start from the spec's weights (training); ``False``: random weights of the same architecture (a
        saved fine-tuned state is loaded into it).

    Raises
    ------
    ValueError
        If the spec names no encoder, or one that cannot be rebuilt (a user-given module or callable).
    """
    from stexp.images import build_encoder

    name = spec.get("encoder") if spec else None
    if not name or str(name).startswith("callable:"):
        raise ValueError(
            "finetune_encoder=True rebuilds the image encoder that made the features from their spec, but "
            f"{'no spec was recorded' if not name else f'the encoder is a user-given callable ({name})'}; embed "
            "the images with a registry or timm encoder (stexp.pp.embed_images(adata, encoder='efficientnet_lite0')) "
            "and pass its features_key."
        )
    return build_encoder(str(name), weights=spec.get("weights_arg") if pretrained else None)


def training_encoder(model, n_features: int):
    """The pretrained encoder ``model`` fine-tunes, or ``None`` when it trains on frozen features.

    Raises
    ------
    ValueError
        If the encoder's output width differs from the ``n_features`` columns of the features its spec describes.
    """
    if not model.hparams["finetune_encoder"]:
        return None
    encoder = finetune_encoder(model.encoder_spec)
    if n_features != encoder.out_dim:
        raise ValueError(
            f"{model.name}: the features have {n_features} columns but their encoder {encoder.name} outputs "
            f"{encoder.out_dim}; the features spec does not describe them."
        )
    return encoder


def loading_encoder(model):
    """The architecture of the encoder a saved fine-tuned ``model`` holds (its weights follow), or ``None``."""
    return finetune_encoder(model.encoder_spec, pretrained=False) if model.hparams["finetune_encoder"] else None


def spec_patch_um(spec: dict[str, Any]) -> float | None:
    """The patch side (µm) of a spec; ``None`` (each library's default) when it was recorded per library."""
    value = spec.get("patch_um") if spec else None
    return float(value) if isinstance(value, (int, float)) else None


def spot_patches(data: SpotData, encoder, spec: dict[str, Any], *, augment: bool):
    """The :class:`stexp.images.PatchDataset` of the spots of ``data``, item ``i`` being spot ``i`` of ``data``.

    Raises
    ------
    ValueError
        If ``data`` does not carry its AnnData (patches are read from its images).
    """
    from stexp.images import PatchDataset

    if data.adata is None or data.obs_index is None:
        raise ValueError("fine-tuning reads patches from the AnnData's images, but these spots carry no AnnData.")
    return PatchDataset(
        data.adata,
        np.asarray(data.obs_index, dtype=np.int64),
        encoder=encoder,
        patch_um=spec_patch_um(spec),
        augment=augment,
        library_key=data.library_key,
    )


class PatchBatch:
    """``collate_fn`` that turns a list of spot indices into their patches.

    Without ``nodes`` a batch is ``{"index": (B,), "x": (B, 3, H, W)}``. With ``nodes`` (the
    ``(n_spots, m)`` neighbourhoods of NH2ST) the patches of every distinct node of the batch's
    neighbourhoods are loaded once: ``{"index": (B,), "x": (U, 3, H, W), "inverse": (B, m)}`` with
    ``x[inverse]`` the patches of each neighbourhood's nodes.
    """

    def __init__(self, patches, nodes: np.ndarray | None = None) -> None:
        self.patches = patches
        self.nodes = None if nodes is None else torch.as_tensor(nodes)

    def __call__(self, items) -> dict[str, torch.Tensor]:
        index = torch.as_tensor([int(i[0]) if isinstance(i, (tuple, list)) else int(i) for i in items])
        if self.nodes is None:
            return {"index": index, "x": torch.stack([self.patches[int(i)][0] for i in index])}
        unique, inverse = torch.unique(self.nodes[index], return_inverse=True)
        x = torch.stack([self.patches[int(i)][0] for i in unique])
        return {"index": index, "x": x, "inverse": inverse}


@torch.no_grad()
def encode_spots(encoder, data: SpotData, spec: dict[str, Any], *, device: str, batch_size: int = 64) -> torch.Tensor:
    """Features ``(n_spots, D)`` of the spots of ``data`` from the (fine-tuned) encoder, one slide in memory at a time.

    ``encoder`` is an :class:`stexp.images.Encoder` whose module holds the fine-tuned weights.
    """
    from torch.utils.data import DataLoader

    module = encoder.module.to(device).eval()
    out = torch.empty(data.n_spots, encoder.out_dim)
    try:
        for lib in data.libraries:
            rows = np.flatnonzero(data.library == lib)
            patches = spot_patches(data.subset(rows), encoder, spec, augment=False)
            start = 0
            for x, _ in DataLoader(patches, batch_size=batch_size, shuffle=False):
                feats = module(x.to(device)).float().cpu()
                out[rows[start : start + len(feats)]] = feats
                start += len(feats)
    finally:
        module.to("cpu")
    return out


def optimizer(net: torch.nn.Module, *, lr: float, weight_decay: float, encoder_lr: float | None):
    """AdamW with the image encoder (``net.image_encoder``, if any) in its own group at ``encoder_lr``."""
    encoder = getattr(net, "image_encoder", None)
    if encoder is None:
        return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    enc_ids = {id(p) for p in encoder.parameters()}
    groups = [
        {"params": [p for p in net.parameters() if id(p) not in enc_ids], "lr": lr},
        {"params": list(encoder.parameters()), "lr": lr if encoder_lr is None else float(encoder_lr)},
    ]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
