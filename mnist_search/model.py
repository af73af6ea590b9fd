"""The networks: an MLP over flattened pixels, and the raw-pixel wrapper that ships."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class MLP(nn.Module):
    """784 -> hidden... -> 10; each hidden layer is Linear, activation, dropout."""

    def __init__(
        self,
        hidden: Sequence[int],
        dropout: float = 0.0,
        activation: str = "relu",
        in_features: int = 784,
        classes: int = 10,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [
                nn.Linear(in_features, width),
                ACTIVATIONS[activation](),
                nn.Dropout(dropout),
            ]
            in_features = width
        layers.append(nn.Linear(in_features, classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 784) normalized -> (N, 10) logits
        return self.net(x)


class PixelClassifier(nn.Module):
    """Raw pixels in, class probabilities out: normalization and flattening live here, so no
    caller can forget them. Accepts (N, 28, 28) or (N, 784), uint8 or float, values 0-255."""

    def __init__(self, mlp: MLP, mean: float, std: float):
        super().__init__()
        self.mlp = mlp
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.reshape(pixels.shape[0], -1).float()  # (N, 784)
        return torch.softmax(self.mlp((x / 255 - self.mean) / self.std), dim=1)  # (N, 10)
