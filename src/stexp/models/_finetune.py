"""End-to-end fine-tuning of the image encoder: shared by every model that takes ``finetune_encoder=True``.

A model fine-tunes the encoder that made its frozen features: :func:`finetune_encoder` rebuilds it from
the features' :class:`~stexp.images.EncoderSpec` (the same name, weights and patch size), so a fine-tuned
model and its frozen twin start from the same point and the spec check of :func:`stexp.tl.predict` keeps
meaning something. The frozen features are still used once, for the z-scoring statistics of the
encoder's output (the projection heads then see the same scale as on frozen features). Patches come
from the spots' :class:`~stexp.images.PatchSource` (built by ``stexp.tl``), are cut once per slide into
memory (:class:`stexp.images.PatchDataset`) and augmented per item (flips, 90° rotations, colour jitter; HED stain jitter with ``hed_jitter``).

A model that can fine-tune subclasses :class:`FinetunableExpressionModel`, which declares the options.
Imported only by models that fine-tune (this module imports torch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stexp.models._base import check_hparams
from stexp.models._data import SpotData
from stexp.models._torch import TorchExpressionModel


class FinetunableExpressionModel(TorchExpressionModel):
    """A neural model that can fine-tune the image encoder that made its features (mclSTExp, NH2ST).

    Parameters
    ----------
    genes
        The gene panel.
    finetune_encoder
        Train the encoder that made the features end to end on patches (rebuilt from their spec).
    augment
        Flips, 90° rotations and colour jitter of the training patches.
    hed_jitter
        With ``augment``: HED stain augmentation of that strength (``PatchDataset``'s ``hed_jitter``), in [0, 1).
    encoder_lr
        The encoder's learning rate (``None``: the model's ``lr``).
    **kwargs
        :class:`~stexp.models.TorchExpressionModel`'s training options, ``features_key``, ``encoder_spec``
        and a subclass's hyper-parameters.
    """

    def __init__(
        self,
        genes: list[str],
        *,
        finetune_encoder: bool = False,
        augment: bool = True,
        hed_jitter: float = 0.0,
        encoder_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            genes,
            finetune_encoder=finetune_encoder,
            augment=augment,
            hed_jitter=hed_jitter,
            encoder_lr=encoder_lr,
            **kwargs,
        )
        check_hparams(self, fraction=("hed_jitter",), positive=("encoder_lr",))


def finetune_encoder(spec, *, pretrained: bool = True):
    """Rebuild the image encoder recorded in a features spec, for training or to load fine-tuned weights into.

    Parameters
    ----------
    spec
        The :class:`~stexp.images.EncoderSpec` of the features.
    pretrained
        Start from the spec's weights (training); ``False``: random weights of the same architecture (a
        saved fine-tuned state is loaded into it).

    Raises
    ------
    ValueError
        If the spec names no encoder, or one that cannot be rebuilt from it (not
        :attr:`~stexp.images.EncoderSpec.rebuildable`: a user-given module or callable...).
    """
    from stexp.images import EncoderSpec, build_encoder

    spec = EncoderSpec.from_mapping(spec)
    try:
        kwargs = spec.embed_kwargs()
    except ValueError as err:
        raise ValueError(
            f"finetune_encoder=True rebuilds the image encoder that made the features, but {str(err).rstrip('.')}; "
            "embed the images with a registry or timm encoder (stexp.pp.embed_images(adata, "
            "encoder='efficientnet_lite0')) and pass its features_key."
        ) from None
    weights = kwargs["weights"] if pretrained else None
    return build_encoder(kwargs["encoder"], weights=weights, **(kwargs["encoder_kwargs"] or {}))


def training_encoder(model, n_features: int):
    """The pretrained encoder ``model`` fine-tunes, or ``None`` when it trains on frozen features.

    Raises
    ------
    ValueError
        If the encoder's output width differs from the ``n_features`` columns of the features its spec describes.
    """
    if not model.hparams.get("finetune_encoder", False):
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
    if not model.hparams.get("finetune_encoder", False):
        return None
    return finetune_encoder(model.encoder_spec, pretrained=False)


def _patch_source(data: SpotData):
    if data.patches is None:
        raise ValueError(
            "the fine-tuned image encoder reads the spots' patches, but these spots carry none (SpotData.patches "
            "is None); build the data with stexp.tl (fit/predict), which attaches the slides' patches."
        )
    return data.patches


def spot_patches(data: SpotData, encoder, *, augment: bool, hed_jitter: float = 0.0):
    """The :class:`stexp.images.PatchDataset` of the spots of ``data``, item ``i`` being spot ``i`` of ``data``."""
    from stexp.images import PatchDataset

    return PatchDataset(_patch_source(data), encoder=encoder, augment=augment, hed_jitter=hed_jitter)


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
def encode_spots(encoder, data: SpotData, *, device: str, batch_size: int = 64) -> torch.Tensor:
    """Features ``(n_spots, D)`` of the spots of ``data`` from the (fine-tuned) encoder, one slide decoded at a time.

    ``encoder`` is an :class:`stexp.images.Encoder` whose module holds the fine-tuned weights.
    """
    module = encoder.module.to(device).eval()
    out = torch.empty(data.n_spots, encoder.out_dim)
    try:
        for spots, patches in _patch_source(data).batches(encoder.input_px, batch_size):
            out[spots] = module(encoder.preprocess(patches, device=device)).float().cpu()
    finally:
        module.to("cpu")
    return out
