"""A small regression head on frozen image features (ST-Net-like), trained with the Lightning engine.

Imported by the model registry on first use of ``model="mlp"`` (this module imports torch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from stexp.models._base import check_hparams
from stexp.models._registry import register_model
from stexp.models._torch import TorchExpressionModel, as_tensor


class MLPNetwork(nn.Module):
    """Standardise the features (training statistics, stored as buffers), then MLP to the gene panel."""

    feature_mean: torch.Tensor
    feature_std: torch.Tensor

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

    def losses(self, batch, data, gather) -> dict[str, torch.Tensor]:
        """MSE of the batch's predicted expression."""
        index = batch["index"]
        return {"mse": nn.functional.mse_loss(self(data["features"][index]).float(), data["target"][index])}


@register_model("mlp")
class MLPModel(TorchExpressionModel):
    """Regress expression on frozen image features with a small MLP (ST-Net's head, without the encoder).

    The features are standardised with the training mean and standard deviation, passed through
    ``n_hidden`` layers of ``hidden_dim`` units (Linear, GELU, dropout) and a linear output whose
    bias starts at the training mean of each gene. Loss: MSE on the target. Optimiser: AdamW.
    With ``validation=`` slides, training stops early when the validation MSE has not improved for
    ``early_stopping_patience`` epochs. No spread is returned.

    Parameters
    ----------
    genes
        The gene panel.
    hidden_dim
        Units of each hidden layer.
    n_hidden
        Hidden layers (``0``: a linear model).
    dropout
        Dropout after each hidden layer, in [0, 1).
    **kwargs
        :class:`~stexp.models.TorchExpressionModel`'s training options (defaults ``lr=1e-3``,
        ``weight_decay=1e-4``, ``batch_size=128``, ``max_epochs=50``, ``early_stopping_patience=10``,
        ``seed=0``), ``features_key``, ``encoder_spec``.
    """

    def __init__(
        self, genes: list[str], *, hidden_dim: int = 256, n_hidden: int = 1, dropout: float = 0.2, **kwargs: Any
    ) -> None:
        super().__init__(genes, hidden_dim=hidden_dim, n_hidden=n_hidden, dropout=dropout, **kwargs)
        check_hparams(self, positive_int=("hidden_dim",), non_negative_int=("n_hidden",), fraction=("dropout",))

    def build_network(self, *, n_features: int, encoder: nn.Module | None, **sizes: int) -> MLPNetwork:
        hp = self.hparams
        return MLPNetwork(
            n_features, len(self.genes), hidden_dim=hp["hidden_dim"], n_hidden=hp["n_hidden"], dropout=hp["dropout"]
        )

    def initialise(self, network: Any, train) -> None:
        super().initialise(network, train)
        network.layers[-1].bias.copy_(as_tensor(train.target).mean(0))  # the MSE starts at the variance

    def _predict(self, data) -> tuple[np.ndarray, np.ndarray | None]:
        X = as_tensor(data.features)
        with self.on_device() as (net, device), torch.no_grad():
            out = [net(X[start : start + 4096].to(device)).float().cpu() for start in range(0, data.n_spots, 4096)]
        return torch.cat(out).numpy(), None
