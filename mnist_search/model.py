"""The networks: an MLP and a small CNN over normalized pixels, and the raw-pixel wrapper that
ships (one network, or the average of several: an ensemble)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def _dense(in_features: int, hidden: Sequence[int], dropout: float, activation: str) -> list:
    """Linear, activation, dropout for each hidden width, then the 10-class Linear."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), ACTIVATIONS[activation](), nn.Dropout(dropout)]
        in_features = width
    return [*layers, nn.Linear(in_features, 10)]


class MLP(nn.Module):
    """784 -> hidden... -> 10; each hidden layer is Linear, activation, dropout."""

    def __init__(self, hidden: Sequence[int], dropout: float = 0.0, activation: str = "relu"):
        super().__init__()
        self.net = nn.Sequential(*_dense(784, hidden, dropout, activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 784) normalized -> (N, 10) logits
        return self.net(x)


class CNN(nn.Module):
    """Conv blocks that each halve the maps (28 -> 14 -> 7): a stride-2 conv -> batch norm ->
    activation, followed by `depth - 1` 3x3 stride-1 blocks of the same width; then a dense
    head over the last maps (dropout after its hidden layers). A stride-2 conv computes a
    quarter of the outputs of a conv followed by a 2x2 max pool, and skips the pool: on 2 CPU
    cores a 16-32 channel net trained 3.8x faster this way than with conv + max pool (batch
    128), at the accuracy the README's table gives. Maps are channels-last, the layout in which
    PyTorch's CPU convolutions ran about 2x faster here."""

    def __init__(
        self,
        channels: Sequence[int] = (16, 32),
        kernel: int = 5,
        hidden: Sequence[int] = (128,),
        dropout: float = 0.0,
        activation: str = "relu",
        depth: int = 1,
        stem: int = 0,
    ):
        super().__init__()

        def block(in_channels: int, out_channels: int, kernel: int, stride: int) -> list:
            conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False)
            return [conv, nn.BatchNorm2d(out_channels), ACTIVATIONS[activation]()]

        layers: list[nn.Module] = []
        in_channels = 1
        if stem:  # a 3x3 stride-1 block at full resolution, as the anchors' nets start
            layers += block(1, stem, 3, stride=1)
            in_channels = stem
        for out_channels in channels:
            layers += block(in_channels, out_channels, kernel, stride=2)
            for _ in range(depth - 1):  # not searched: docs/search-space.md, "Training levers"
                layers += block(out_channels, out_channels, 3, stride=1)
            in_channels = out_channels
        side = 28
        for _ in channels:  # a stride-2 conv with padding kernel // 2 rounds up: 7 -> 4
            side = (side + 1) // 2
        self.features = nn.Sequential(*layers)
        # dropout only inside the head: on the flattened maps it cost up to a third of a
        # training step here (one random number per feature), and batch norm and the
        # augmentation already regularize the convs
        self.head = nn.Sequential(
            nn.Flatten(), *_dense(in_channels * side**2, hidden, dropout, activation)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 784) normalized -> (N, 10) logits
        x = x.reshape(-1, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        return self.head(self.features(x))


def training_flops_per_sample(net: nn.Module) -> int:
    """Multiply-adds x 2 of one forward pass through every conv and linear layer, x 3 for
    training (forward, and backward for inputs and for weights), as `bench` counts the MLP."""
    total = 0

    def count(layer: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        positions = output.shape[-1] * output.shape[-2] if isinstance(layer, nn.Conv2d) else 1
        total += 2 * layer.weight.numel() * positions

    kinds = (nn.Conv2d, nn.Linear)
    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, kinds)]
    training = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 784, device=next(net.parameters()).device))
    finally:
        net.train(training)
        for hook in hooks:
            hook.remove()
    return 3 * total


class PixelClassifier(nn.Module):
    """Raw pixels in, class probabilities out: normalization and flattening live here, so no
    caller can forget them. Accepts (N, 28, 28) or (N, 784), uint8 or float, values 0-255.
    Given several networks, it returns the mean of their probabilities (an ensemble)."""

    def __init__(self, nets: nn.Module | Sequence[nn.Module], mean: float, std: float):
        super().__init__()
        self.nets = nn.ModuleList([nets] if isinstance(nets, nn.Module) else nets)
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.reshape(pixels.shape[0], -1).float() / 255 - self.mean) / self.std  # (N, 784)
        probs = [torch.softmax(net(x), dim=1) for net in self.nets]  # each (N, 10)
        return torch.stack(probs).mean(0)  # (N, 10)
