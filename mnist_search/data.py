"""Split MNIST into train and validation, hold it as tensors on the device, serve batches.

`python -m mnist_search.data [--data-dir DIR]` puts the verified files in place (see `fetch`) and
prints a summary of what the training code will read.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist_search import cli, fetch

VAL_SIZE = 10_000  # held out of 60,000, stratified: per-class rounding makes it 10,001
SPLIT_SEED = 0  # fixed so that every study selects on the same validation images


@dataclass(frozen=True)
class Split:
    """Images and labels. MNIST's are kept as raw uint8 pixels, a quarter of float32's memory
    (39 MB instead of 157 for the training split, in every worker), and normalized batch by
    batch on their device with `mean` and `std`; features that need no normalization (tests'
    toy problems) have no `mean`."""

    x: torch.Tensor  # (N, 784): uint8 pixels 0-255 when `mean` is given, else float features
    y: torch.Tensor  # (N,) int64
    mean: float | None = None  # of the training pixels scaled to [0, 1]
    std: float | None = None

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: str | torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device), self.mean, self.std)

    def head(self, n: int) -> Split:
        return Split(self.x[:n], self.y[:n], self.mean, self.std)

    def features(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The rows (an index tensor or a slice) as the networks take them: (n, 784) float32,
        normalized."""
        x = self.x.index_select(0, rows) if isinstance(rows, torch.Tensor) else self.x[rows]
        return x if self.mean is None else (x.float() / 255 - self.mean) / self.std

    def batch_indices(self, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """One epoch of shuffled batches, as index tensors on the split's device, sliced from a
        permutation drawn (on the CPU, so every device sees the same order) from `generator`."""
        order = torch.randperm(len(self), generator=generator).to(self.y.device)
        return iter(order.split(batch_size))


@dataclass(frozen=True)
class Data:
    """What `fit` trains on: a training split, an optional validation split, the normalization."""

    train: Split
    val: Split | None
    mean: float  # of training pixels in [0, 1]; kept with the model
    std: float


def stratified_split(labels: torch.Tensor, val_size: int, seed: int) -> tuple:
    """Indices (train, val): each class gives the same fraction of its images to validation."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    val = []
    for c in labels.unique():
        members = order[labels[order] == c]
        val.append(members[: round(len(members) * val_size / len(labels))])
    val_idx = torch.cat(val).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val_idx] = False
    return keep.nonzero().squeeze(1), val_idx


def to_split(images: torch.Tensor, labels: torch.Tensor, mean: float, std: float, device) -> Split:
    pixels = images.reshape(len(images), -1).to(torch.uint8)  # (N, 784), normalized per batch
    return Split(pixels.to(device), labels.long().to(device), mean, std)


def pixel_stats(images: torch.Tensor) -> tuple[float, float]:
    """Mean and std of uint8 `images` scaled to [0, 1]: the normalization a model keeps."""
    pixels = images.float() / 255
    return pixels.mean().item(), pixels.std().item()


def load_data(
    data_dir: Path, device: str | torch.device = "cpu", val_size: int | None = None
) -> Data:
    """The training images as tensors on `device`, `val_size` (default VAL_SIZE) of them held
    out for validation; `val_size=0` trains on all. Mean and std come from the images trained
    on, never from validation or test."""
    images, labels = fetch.load_images(data_dir, train=True)
    val_size = VAL_SIZE if val_size is None else val_size
    if not 0 <= val_size < len(labels):
        raise fetch.DataError(f"validation size {val_size} must be in [0, {len(labels)})")
    if val_size:
        train_idx, val_idx = stratified_split(labels, val_size, SPLIT_SEED)
    else:
        train_idx, val_idx = torch.arange(len(labels)), None
    mean, std = pixel_stats(images[train_idx])
    val = None if val_idx is None else to_split(images[val_idx], labels[val_idx], mean, std, device)
    return Data(to_split(images[train_idx], labels[train_idx], mean, std, device), val, mean, std)


def load_test(data_dir: Path, mean: float, std: float, device="cpu") -> Split:
    """The 10,000 test images, for a final model only (`train --test`; the champion reads them
    through `fetch.load_images`)."""
    images, labels = fetch.load_images(data_dir, train=False)
    return to_split(images, labels, mean, std, device)


def summary(data_dir: Path) -> str:
    lines = []
    for train in (True, False):
        images, labels = fetch.load_images(data_dir, train)
        counts = torch.bincount(labels, minlength=10).tolist()
        lines.append(
            f"{'train' if train else 'test '}: images {tuple(images.shape)} {images.dtype}, "
            f"pixels {images.min().item()}..{images.max().item()}, "
            f"class counts {counts}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_search.data", description="Fetch, verify and summarize MNIST."
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=fetch.default_data_dir(),
        help=f"where MNIST lives (default: ${fetch.DATA_DIR_ENV} or ./data; now %(default)s)",
    )
    args = parser.parse_args(argv)
    cli.check_folder(parser, "--data-dir", args.data_dir)  # before a download lands beside a file
    try:
        source = fetch.ensure_mnist(args.data_dir)
    except fetch.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"MNIST verified in {fetch.raw_dir(args.data_dir)} (source: {source})")
    for name, digest in fetch.OFFICIAL_SHA256.items():
        print(f"  {name}  sha256 {digest}")
    print(summary(args.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
