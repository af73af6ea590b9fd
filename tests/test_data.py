import gzip
import hashlib
import io
import pickle

import pytest
import torch
from torchvision.datasets import MNIST

from mnist_search import data as mdata
from tests.conftest import synthetic_images


def test_write_idx_reads_back_through_torchvision(tmp_path):
    images, labels = synthetic_images(30, seed=3)
    raw = mdata.raw_dir(tmp_path)
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        mdata.write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        mdata.write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    ds = MNIST(str(tmp_path), train=True, download=False)  # torchvision's own IDX reader
    assert torch.equal(ds.data, images)
    assert torch.equal(ds.targets, labels)


def test_files_in_place_are_verified_and_kept(synthetic_mnist):
    assert mdata.ensure_mnist(synthetic_mnist) == "files already in place"


def test_altered_file_is_refused_and_left_untouched(synthetic_mnist):
    path = mdata.raw_dir(synthetic_mnist) / "train-labels-idx1-ubyte"
    altered = path.read_bytes()[:-1] + b"\x07"
    path.write_bytes(altered)
    with pytest.raises(mdata.DataError) as err:
        mdata.ensure_mnist(synthetic_mnist)
    message = str(err.value)
    assert "train-labels-idx1-ubyte" in message
    assert mdata.OFFICIAL_SHA256["train-labels-idx1-ubyte"] in message
    assert hashlib.sha256(altered).hexdigest() in message
    assert path.read_bytes() == altered  # never silently replaced


def test_missing_file_falls_through_to_the_next_source(synthetic_mnist, monkeypatch):
    raw = mdata.raw_dir(synthetic_mnist)
    wanted = (raw / "t10k-images-idx3-ubyte").read_bytes()
    (raw / "t10k-images-idx3-ubyte").unlink()
    kept = {n: (raw / n).read_bytes() for n in mdata.OFFICIAL_SHA256 if (raw / n).exists()}

    def unreachable(staging):
        raise OSError("mirror unreachable")

    def corrupt(staging):  # writes every file, wrong: must be refused, nothing moved
        for name in mdata.OFFICIAL_SHA256:
            (staging / name).write_bytes(b"junk")

    def good(staging):
        for name in mdata.OFFICIAL_SHA256:
            (staging / name).write_bytes(wanted if name == "t10k-images-idx3-ubyte" else b"x")

    sources = [("first", unreachable), ("second", corrupt), ("third", good)]
    monkeypatch.setattr(mdata, "SOURCES", sources)
    # "third" writes junk for the files already present: only the missing file is taken, and
    # only because the staged set verifies... which it does not, so it must also be refused.
    with pytest.raises(mdata.DataError) as err:
        mdata.ensure_mnist(synthetic_mnist)
    assert "first: OSError: mirror unreachable" in str(err.value)
    assert "second" in str(err.value) and "third" in str(err.value)
    assert "by hand" in str(err.value)

    def full(staging):
        for name in mdata.OFFICIAL_SHA256:
            (staging / name).write_bytes(kept.get(name, wanted))

    monkeypatch.setattr(mdata, "SOURCES", [("first", unreachable), ("full", full)])
    assert mdata.ensure_mnist(synthetic_mnist) == "full"
    assert (raw / "t10k-images-idx3-ubyte").read_bytes() == wanted


def test_unpickler_refuses_anything_but_arrays():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    blob = pickle.dumps(Evil())
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        mdata._ArrayUnpickler(io.BytesIO(blob)).load()


def test_unpickler_loads_numpy_arrays():
    import numpy as np

    arrays = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2])),)
    blob = gzip.compress(pickle.dumps(arrays, protocol=2))
    ((x, y),) = mdata._ArrayUnpickler(gzip.open(io.BytesIO(blob)), encoding="latin1").load()
    assert x.tolist() == arrays[0][0].tolist() and y.tolist() == [1, 2]


def test_stratified_split_is_disjoint_complete_and_balanced():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([100, 300, 200])])
    train, val = mdata.stratified_split(labels, val_size=60, seed=0)
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert sorted(train.tolist() + val.tolist()) == list(range(600))
    assert torch.bincount(labels[val]).tolist() == [10, 30, 20]
    again, val_again = mdata.stratified_split(labels, val_size=60, seed=0)
    assert torch.equal(val, val_again)


def test_normalization_comes_from_the_training_split_only(synthetic_mnist):
    data = mdata.load_data(synthetic_mnist)
    assert len(data.train) == 500 and len(data.val) == 100
    assert data.train.x.shape == (500, 784)
    assert abs(data.train.x.mean().item()) < 1e-4  # normalized by its own statistics
    assert abs(data.train.x.std().item() - 1) < 1e-3
    images, _ = mdata.load_images(synthetic_mnist, train=True)
    assert data.mean != pytest.approx((images.float() / 255).mean().item(), abs=1e-7)


def test_batches_cover_the_split_once_per_epoch():
    split = mdata.Split(torch.arange(10.0).unsqueeze(1), torch.arange(10))
    batches = list(split.batch_indices(3, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    seen = torch.cat(batches)
    assert sorted(seen.tolist()) == list(range(10))
    assert seen.tolist() != list(range(10))  # shuffled


def test_data_cli_summarizes(synthetic_mnist, capsys):
    assert mdata.main(["--data-dir", str(synthetic_mnist)]) == 0
    out = capsys.readouterr().out
    assert "files already in place" in out and "(600, 28, 28)" in out


@pytest.mark.mnist
def test_real_mnist_is_byte_exact(real_mnist):
    raw = mdata.raw_dir(real_mnist)
    for name, digest in mdata.OFFICIAL_SHA256.items():
        assert mdata.sha256_file(raw / name) == digest
    images, labels = mdata.load_images(real_mnist, train=False)
    assert images.shape == (10000, 28, 28) and torch.bincount(labels)[1] == 1135
