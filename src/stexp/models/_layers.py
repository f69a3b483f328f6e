"""Building blocks shared by the neural models: projection head and InfoNCE loss.

This module imports torch at import time; it is only imported by the model modules, which the
registry loads on first use, so ``import stexp`` stays fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Project an embedding into the shared space: Linear -> GELU -> Linear, dropout, residual, LayerNorm.

    The residual adds the output of the first Linear (the layout of CLIP-style heads used by BLEEP
    and mclSTExp).

    Parameters
    ----------
    in_dim
        Input width.
    out_dim
        Width of the shared embedding space.
    dropout
        Dropout applied after the second Linear.
    """

    def __init__(self, in_dim: int, out_dim: int, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_dim) -> (..., out_dim)``."""
        projected = self.projection(x)
        x = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(x + projected)


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    temperature: float = 1.0,
    normalize: bool = True,
    negative_weight: float = 1.0,
    symmetric: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP) loss between two batches of paired embeddings.

    Row ``i`` of ``a`` and row ``i`` of ``b`` are a positive pair; every other row of the batch is a
    negative. The loss is the mean of the cross-entropies in both directions (``a -> b`` and
    ``b -> a``, each weighted 0.5), computed in float32; with ``symmetric=False`` only ``a -> b``.

    Parameters
    ----------
    a, b
        Embeddings ``(batch, dim)``.
    temperature
        Logits are divided by it (e.g. 0.05 for NH2ST on L2-normalised embeddings, 1 for mclSTExp).
    normalize
        L2-normalise the embeddings first (cosine similarities); ``False`` uses raw dot products.
    negative_weight
        Factor on the off-diagonal (negative) logits; NH2ST's code uses 0.1 (``contrastive_loss`` of
        ``models/NGHist2ST.py``), which softens the negatives. 1: plain InfoNCE.
    symmetric
        Average both directions (CLIP, mclSTExp); ``False``: ``a -> b`` only (NH2ST's code).

    Returns
    -------
    A scalar tensor; ``ln(batch)`` at chance (with ``negative_weight=1``).
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"info_nce needs two (batch, dim) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}.")
    if not negative_weight >= 0:
        raise ValueError(f"negative_weight must be non-negative, got {negative_weight!r}.")
    a, b = a.float(), b.float()
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = a @ b.T / temperature
    if negative_weight != 1.0:
        eye = torch.eye(a.shape[0], device=a.device, dtype=torch.bool)
        logits = torch.where(eye, logits, logits * negative_weight)
    labels = torch.arange(a.shape[0], device=a.device)
    if not symmetric:
        return F.cross_entropy(logits, labels)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
