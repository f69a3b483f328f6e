"""A small regression head on frozen image features (ST-Net-like), trained with the Lightning engine.

Imported by the model registry on first use of ``model="mlp"`` (this module imports torch).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from stexp._settings import logger, settings
from stexp.models._base import ExpressionModel
from stexp.models._data import SpotData
from stexp.models._layers import feature_scaling
from stexp.models._registry import register_model


class MLPNetwork(nn.Module):
    """Standardise the features (training statistics, stored as buffers), then MLP to the gene panel."""

    def __init__(self, n_features: int, n_genes: int, *, hidden_dim: int, n_hidden: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        layers: list[nn.Module] = []
        width = n_features
        for _ in range(n_hidden):
            layers += [nn.Linear(width, hidden_dim), nn.GELU(), nn.Dropout(dropout)]
            width = hidden_dim
        layers.append(nn.Linear(width, n_genes))
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, n_features) -> (B, n_genes)``."""
        return self.layers((features - self.feature_mean) / self.feature_std)


@register_model("mlp")
class MLPModel(ExpressionModel):
    """Regress expression on frozen image features with a small MLP (ST-Net's head, without the encoder).

    The features are standardised with the training mean and standard deviation, passed through
    ``n_hidden`` layers of ``hidden_dim`` units (Linear, GELU, dropout) and a linear output whose
    bias starts at the training mean of each gene. Loss: MSE on the target. Optimiser: AdamW.
    With ``validation=`` slides, training stops early when the validation MSE has not improved for
    ``early_stopping_patience`` epochs. No spread is returned.

    Hyper-parameters (``default_hparams``)
        ``hidden_dim=256``, ``n_hidden=1``, ``dropout=0.2``, ``lr=1e-3``, ``weight_decay=1e-4``,
        ``batch_size=128``, ``max_epochs=50``, ``early_stopping_patience=10``, ``device="auto"``,
        ``seed=0``.
    """

    default_hparams: ClassVar[dict[str, Any]] = {
        "hidden_dim": 256,
        "n_hidden": 1,
        "dropout": 0.2,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "batch_size": 128,
        "max_epochs": 50,
        "early_stopping_patience": 10,
        "device": "auto",
        "seed": 0,
    }

    def __init__(self, genes: list[str], **kwargs: Any) -> None:
        super().__init__(genes, **kwargs)
        hp = self.hparams
        for key in ("hidden_dim", "batch_size", "max_epochs"):
            if int(hp[key]) != hp[key] or hp[key] < 1:
                raise ValueError(f"mlp: {key} must be a positive integer, got {hp[key]!r}.")
        for key in ("n_hidden", "early_stopping_patience"):
            if int(hp[key]) != hp[key] or hp[key] < 0:
                raise ValueError(f"mlp: {key} must be a non-negative integer, got {hp[key]!r}.")
        if not 0 <= hp["dropout"] < 1:
            raise ValueError(f"mlp: dropout must be in [0, 1), got {hp['dropout']!r}.")
        if not hp["lr"] > 0 or not hp["weight_decay"] >= 0:
            raise ValueError(f"mlp: lr must be > 0 and weight_decay >= 0, got {hp['lr']!r}, {hp['weight_decay']!r}.")
        self.network: MLPNetwork | None = None
        self.n_features: int | None = None

    def _build(self, n_features: int) -> MLPNetwork:
        hp = self.hparams
        self.n_features = int(n_features)
        return MLPNetwork(
            self.n_features,
            len(self.genes),
            hidden_dim=int(hp["hidden_dim"]),
            n_hidden=int(hp["n_hidden"]),
            dropout=float(hp["dropout"]),
        )

    def _fit(self, train: SpotData, validation: SpotData | None = None) -> None:
        from stexp.models._engine import make_loader, train_with_hparams

        hp = self.hparams
        seed = int(hp["seed"])
        torch.manual_seed(seed)
        net = self._build(train.features.shape[1])
        X = torch.from_numpy(np.ascontiguousarray(train.features, dtype=np.float32))
        Y = torch.from_numpy(np.ascontiguousarray(train.target, dtype=np.float32))
        with torch.no_grad():
            mean, std = feature_scaling(X)
            net.feature_mean.copy_(mean)
            net.feature_std.copy_(std)
            net.layers[-1].bias.copy_(Y.mean(0))
        data = {"train": torch.utils.data.TensorDataset(X, Y)}
        if validation is not None:
            if validation.target is None:
                raise ValueError("validation data have no measured expression (target is None).")
            if validation.features.shape[1] != self.n_features:
                raise ValueError(
                    f"validation features have {validation.features.shape[1]} columns, training features {self.n_features}."
                )
            data["val"] = torch.utils.data.TensorDataset(
                torch.from_numpy(np.ascontiguousarray(validation.features, dtype=np.float32)),
                torch.from_numpy(np.ascontiguousarray(validation.target, dtype=np.float32)),
            )
        batch_size = int(hp["batch_size"])
        train_loader = make_loader(
            data["train"], batch_size=batch_size, shuffle=True, seed=seed, drop_last=train.n_spots > batch_size
        )
        val_loader = None
        if "val" in data:
            val_loader = make_loader(data["val"], batch_size=batch_size, shuffle=False, seed=seed)
        module = _lightning_module(net, hp, validate=val_loader is not None)
        self.history = train_with_hparams(module, train_loader, val_loader, hp)
        self.network = module.net.to("cpu").eval()
        logger.debug(f"mlp: trained {len(self.history.get('train_loss', []))} epochs on {train.n_spots} spots")

    def _predict(self, data: SpotData) -> tuple[np.ndarray, np.ndarray | None]:
        if data.features.shape[1] != self.n_features:
            raise ValueError(
                f"mlp: the model was trained on {self.n_features}-dimensional image features, "
                f"the data have {data.features.shape[1]}; use the features the model was trained on."
            )
        device = settings.resolve_device(self.hparams["device"])
        net = self.network.to(device).eval()
        X = torch.from_numpy(np.ascontiguousarray(data.features, dtype=np.float32))
        out = []
        try:
            with torch.no_grad():
                for start in range(0, data.n_spots, 4096):
                    out.append(net(X[start : start + 4096].to(device)).float().cpu())
        finally:
            self.network = net.to("cpu")
        return torch.cat(out).numpy(), None

    def _state(self) -> dict[str, np.ndarray]:
        return {f"net.{k}": v.detach().cpu().numpy() for k, v in self.network.state_dict().items()}

    def _load_state(self, state: dict[str, np.ndarray]) -> None:
        if "net.feature_mean" not in state:
            raise ValueError(f"mlp: the saved weights lack 'net.feature_mean' (they have {sorted(state)[:5]}...).")
        net = self._build(state["net.feature_mean"].shape[0])
        net.load_state_dict({k.removeprefix("net."): torch.from_numpy(np.array(v)) for k, v in state.items()})
        self.network = net.eval()


def _lightning_module(net: MLPNetwork, hp: dict[str, Any], *, validate: bool = False):
    """The LightningModule that trains ``net`` with MSE and AdamW."""
    import lightning as L

    class MLPModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def _step(self, split: str, batch) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x).float(), y)
            self.log(f"{split}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=int(x.shape[0]))
            return loss

        def training_step(self, batch, batch_idx):
            return self._step("train", batch)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]))

    if validate:  # only then: Lightning warns about a validation_step without validation data
        MLPModule.validation_step = lambda self, batch, batch_idx: self._step("val", batch)
    return MLPModule()
