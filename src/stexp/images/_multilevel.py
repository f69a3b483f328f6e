"""Multi-level pooling of an EfficientNet: global average pools of intermediate blocks and of the head, concatenated."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MultiLevel(nn.Module):
    """Wrap an ``efficientnet_lite_pytorch`` EfficientNet; output ``[GAP(block_i) for i in blocks] + [GAP(head)]``."""

    def __init__(self, model: nn.Module, blocks: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.blocks = tuple(int(b) for b in blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m: Any = self.model  # efficientnet_lite_pytorch's EfficientNet (untyped attributes)
        x = m._swish(m._bn0(m._conv_stem(x)))
        pooled = []
        for idx, block in enumerate(m._blocks):
            x = block(x, drop_connect_rate=0.0)
            if idx in self.blocks:
                pooled.append(x.mean(dim=(2, 3)))
        x = m._swish(m._bn1(m._conv_head(x)))
        pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)
