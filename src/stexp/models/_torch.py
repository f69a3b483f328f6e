"""``TorchExpressionModel``: what every neural stexp model shares, so a model keeps only its network.

A neural model subclasses :class:`TorchExpressionModel` (or, when it can fine-tune its image encoder,
:class:`stexp.models._finetune.FinetunableExpressionModel`), declares its own hyper-parameters as typed
keyword arguments of ``__init__`` (the training options ``max_epochs``, ``batch_size``, ``lr``,
``weight_decay``, ``early_stopping_patience`` and ``seed`` are this class's; a model re-declares one only
to change its default), implements :meth:`~TorchExpressionModel.build_network` (a module with ``losses(batch, data, gather)``,
see :mod:`stexp.models._engine`) and :meth:`~TorchExpressionModel._predict`, and registers itself with
:func:`stexp.models.register_model`. This class trains it with the engine's ``TrainingPlan``, keeps the
network on the CPU between calls (moving it to ``model.device`` while it works), saves and loads its
weights, and, with ``finetune_encoder=True``, rebuilds and fine-tunes the image encoder.

Imported by the neural model modules only (this module imports torch).
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from stexp._settings import settings
from stexp.models._base import ExpressionModel, check_hparams
from stexp.models._data import SpotData
from stexp.models._scaling import STD_FLOOR_FRACTION, feature_scaling


def training_hparams(
    *,
    max_epochs: int,
    lr: float,
    weight_decay: float,
    early_stopping_patience: int,
    batch_size: int = 128,
    seed: int = 0,
) -> dict[str, Any]:
    """The training options with a model's defaults, for a model that declares ``default_hparams`` as a dict.

    That is the older way; a model now re-declares the options whose defaults it changes as keyword
    arguments of its ``__init__`` (see :class:`TorchExpressionModel`).
    """
    return {
        "max_epochs": max_epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "early_stopping_patience": early_stopping_patience,
        "seed": seed,
    }


def as_tensor(array: np.ndarray | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A contiguous tensor of a numpy array (no copy when it already has the dtype)."""
    if array is None:
        raise ValueError("no array to turn into a tensor (a target is needed here, but the data have none).")
    np_dtype = {torch.float32: np.float32, torch.int64: np.int64}[dtype]
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np_dtype))


class TorchExpressionModel(ExpressionModel):
    """Base of the neural models: training with the engine, device placement, saving and loading weights.

    Attributes
    ----------
    network
        The trained ``torch.nn.Module`` (on the CPU, in eval mode), ``None`` before fitting.
    encoder
        The fine-tuned :class:`stexp.images.Encoder` when ``finetune_encoder=True``, else ``None``.
    sizes
        The shapes the network was built with (``n_features`` and model-specific ones), saved with it.

    Parameters
    ----------
    genes
        The gene panel.
    max_epochs
        Epochs at most.
    batch_size
        Spots per training step (per process under DDP).
    lr
        AdamW's learning rate.
    weight_decay
        AdamW's weight decay.
    early_stopping_patience
        With validation spots, stop when the validation loss has not improved for this many epochs
        (``0``: never).
    seed
        Seeds the weights, the batches and the augmentation (the caller's random state is left alone).
    **kwargs
        ``features_key``, ``encoder_spec`` (:class:`~stexp.models.ExpressionModel`) and a subclass's
        hyper-parameters.
    """

    def __init__(
        self,
        genes: list[str],
        *,
        max_epochs: int = 50,
        batch_size: int = 128,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        early_stopping_patience: int = 10,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            genes,
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            early_stopping_patience=early_stopping_patience,
            seed=seed,
            **kwargs,
        )
        check_hparams(
            self,
            positive_int=("max_epochs", "batch_size"),
            non_negative_int=("early_stopping_patience",),
            positive=("lr",),
            non_negative=("weight_decay",),
        )
        self.network: Any = None  # the nn.Module once fitted or loaded
        self._world_size = 1  # training processes of the current fit (DDP)
        self.encoder = None
        self.sizes: dict[str, int] = {}

    # -- to implement -------------------------------------------------------------------------
    @abstractmethod
    def build_network(self, *, n_features: int, encoder: nn.Module | None, **sizes: int) -> nn.Module:
        """A new network for ``n_features``-wide image features (``encoder``: the fine-tuned image encoder)."""

    def network_sizes(self, train: SpotData) -> dict[str, int]:
        """Shapes besides ``n_features`` that the network takes from the training data (e.g. position tables)."""
        return {}

    def loss_weights(self) -> dict[str, float]:
        """Weight of each of the network's named losses in the total (default 1 each)."""
        return {}

    def training_tensors(self, data: SpotData) -> dict[str, torch.Tensor]:
        """The tensors ``network.losses`` reads for a split (kept on the device for the whole fit)."""
        out = {"target": as_tensor(data.target)}
        if self.encoder is None:  # fine-tuning reads patches instead
            out["features"] = as_tensor(data.features)
        return out

    def initialise(self, network: Any, train: SpotData) -> None:
        """Set data-dependent starting values: by default the features' z-scoring statistics."""
        if hasattr(network, "feature_mean") and self.hparams.get("standardize_features", True):
            mean, std = feature_scaling(np.asarray(train.features, dtype=np.float32), floor_fraction=STD_FLOOR_FRACTION)
            network.feature_mean.copy_(as_tensor(mean))
            network.feature_std.copy_(as_tensor(std))

    def node_index(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Per spot, the spots whose patches a batch needs (NH2ST's neighbourhoods); ``None``: the spot alone."""
        return None

    def validation_order(self, n: int) -> torch.Tensor | None:
        """Order of the validation spots in batches (``None``: ``0..n-1``)."""
        return None

    def after_fit(self, train: SpotData, validation: SpotData | None = None) -> None:
        """Work after training (e.g. a reference bank, or choices made on the validation spots)."""

    def extra_state(self) -> dict[str, np.ndarray]:
        """Arrays besides the network's weights that are saved (e.g. a reference bank)."""
        return {}

    def load_extra_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`extra_state` returned."""

    # -- shared machinery ---------------------------------------------------------------------
    @contextlib.contextmanager
    def on_device(self) -> Iterator[tuple[Any, str]]:
        """The network on ``self.device`` in eval mode; back on the CPU afterwards, whatever happens."""
        device = settings.resolve_device(self.device)
        net = self.network.to(device).eval()
        try:
            yield net, device
        finally:
            self.network = net.to("cpu").eval()

    def image_features(self, data: SpotData, device: str) -> torch.Tensor:
        """Image features of the spots: the fine-tuned encoder run on their patches, or the frozen features."""
        if self.encoder is None:
            return as_tensor(data.features)
        from stexp.models._finetune import encode_spots

        return encode_spots(self.encoder, data, device=device)

    def loader(self, data: SpotData, tensors: dict[str, torch.Tensor], *, train: bool):
        """Batches of spot indices (shuffled for training); with the patches of the batch when fine-tuning."""
        from stexp.models._engine import index_loader, per_process_batch

        hp = self.hparams
        # under DDP each process loads its share of the spots; the batch size is per process
        batch_size, drop_last = per_process_batch(data.n_spots, hp["batch_size"], self._world_size)
        collate = None
        if self.encoder is not None:
            from stexp.models import _finetune

            patches = _finetune.spot_patches(
                data,
                self.encoder,
                augment=train and hp["augment"],
                hed_jitter=hp.get("hed_jitter", 0.0),
            )
            nodes = self.node_index(tensors)
            collate = _finetune.PatchBatch(patches, nodes=None if nodes is None else nodes.numpy())
        return index_loader(
            data.n_spots,
            batch_size=batch_size,
            shuffle=train,
            seed=hp["seed"],
            drop_last=train and drop_last,
            num_workers=self.num_workers if self.encoder is not None else 0,
            collate_fn=collate,
            order=None if train else self.validation_order(data.n_spots),
        )

    def contrastive_batch_size(self, n_spots: int) -> int:
        """Spots a contrastive loss compares per step: the per-process batch times the DDP processes (gathered)."""
        from stexp.models._engine import per_process_batch

        return per_process_batch(n_spots, self.hparams["batch_size"], self._world_size)[0] * self._world_size

    def _fit(self, train: SpotData, validation: SpotData | None = None) -> None:
        from stexp.models import _finetune
        from stexp.models._engine import TrainingPlan, parallel_plan
        from stexp.models._engine import train as run_training

        hp = self.hparams
        self._world_size = parallel_plan(self.device, self.devices)["world_size"]
        seed = hp["seed"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = _finetune.training_encoder(self, train.features.shape[1])
            self.sizes = {"n_features": int(train.features.shape[1]), **self.network_sizes(train)}
            self.n_features = self.sizes["n_features"]
            if validation is not None:
                self.check_features(validation, "validation features")
            network = self.build_network(encoder=None if self.encoder is None else self.encoder.module, **self.sizes)
        with torch.no_grad():
            self.initialise(network, train)
        data = {"train": self.training_tensors(train)}
        if validation is not None:
            data["val"] = self.training_tensors(validation)
        plan = TrainingPlan(
            network,
            data,
            lr=hp["lr"],
            weight_decay=hp["weight_decay"],
            encoder_lr=hp.get("encoder_lr"),
            loss_weights=self.loss_weights(),
        )
        network.train()  # build_encoder returns the encoder in eval mode; fine-tuning trains it (BatchNorm too)
        self.history = run_training(
            plan,
            self.loader(train, data["train"], train=True),
            None if validation is None else self.loader(validation, data["val"], train=False),
            max_epochs=hp["max_epochs"],
            device=self.device,
            seed=seed,
            early_stopping_patience=hp["early_stopping_patience"] or None,
            devices=self.devices,
        )
        self.network = network.to("cpu").eval()
        self.after_fit(train, validation)

    def _state(self) -> dict[str, np.ndarray]:
        state = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.network.state_dict().items()}
        state.update({f"sizes.{k}": np.asarray([v], dtype=np.int64) for k, v in self.sizes.items()})
        state.update(self.extra_state())
        return state

    def legacy_sizes(self, state: dict[str, np.ndarray]) -> dict[str, int]:
        """Network shapes of a model saved before sizes were stored (stexp 0.1), from its weights."""
        return {"n_features": int(state["net.feature_mean"].shape[0])}

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        from stexp.models._finetune import loading_encoder

        sizes = {k.removeprefix("sizes."): int(v[0]) for k, v in state.items() if k.startswith("sizes.")}
        if not sizes:
            if "net.feature_mean" not in state:
                raise ValueError(
                    f"{self.name}: the saved weights are not a {self.name} state (they have {sorted(state)[:5]}...)."
                )
            sizes = self.legacy_sizes(state)
        self.sizes, self.n_features = sizes, sizes["n_features"]
        self.encoder = loading_encoder(self)
        network = self.build_network(encoder=None if self.encoder is None else self.encoder.module, **sizes)
        weights = {
            k.removeprefix("net."): torch.from_numpy(np.array(v)) for k, v in state.items() if k.startswith("net.")
        }
        try:
            network.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(
                f"{self.name}: the saved weights do not fit a network for the model's {len(self.genes)} genes and "
                f"{sizes['n_features']} features (model.json and the weights disagree): {err}"
            ) from err
        self.network = network.eval()
        self.load_extra_state(state)
