import pytest
import torch

from mnist_search import data as mdata
from mnist_search import fetch


def test_stratified_split_is_disjoint_complete_and_balanced():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([100, 300, 200])])
    train, val = mdata.stratified_split(labels, val_size=60, seed=0)
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert sorted(train.tolist() + val.tolist()) == list(range(600))
    assert torch.bincount(labels[val]).tolist() == [10, 30, 20]
    again, val_again = mdata.stratified_split(labels, val_size=60, seed=0)
    assert torch.equal(val, val_again)


def test_normalization_comes_from_the_training_split_only(synthetic_mnist, monkeypatch):
    data = mdata.load_data(synthetic_mnist)
    assert len(data.train) == 500 and len(data.val) == 100
    # kept as raw pixels (a quarter of float32's memory), normalized as they are served
    assert data.train.x.shape == (500, 784) and data.train.x.dtype == torch.uint8
    features = data.train.features()
    assert features.dtype == torch.float32
    assert abs(features.mean().item()) < 1e-4  # normalized by its own statistics
    assert abs(features.std().item() - 1) < 1e-3
    rows = torch.tensor([3, 0, 7])
    assert torch.equal(data.train.features(rows), features[rows])  # a batch: the same numbers
    images, labels = fetch.load_images(synthetic_mnist, train=True)
    _, val_idx = mdata.stratified_split(labels, mdata.VAL_SIZE, mdata.SPLIT_SEED)
    train_idx = sorted(set(range(len(labels))) - set(val_idx.tolist()))  # the complement
    train_pixels = images[train_idx].double() / 255
    assert data.mean == pytest.approx(train_pixels.mean().item(), abs=1e-6)
    assert data.std == pytest.approx(train_pixels.std().item(), abs=1e-6)
    # whatever the validation images hold, the statistics stay those of the training images
    images[val_idx] = 255
    path = fetch.raw_dir(synthetic_mnist) / "train-images-idx3-ubyte"
    fetch.write_idx(path, images)
    monkeypatch.setitem(fetch.OFFICIAL_SHA256, path.name, fetch.sha256_file(path))
    again = mdata.load_data(synthetic_mnist)
    assert (again.mean, again.std) == (data.mean, data.std)
    assert torch.equal(again.train.x, data.train.x) and not torch.equal(again.val.x, data.val.x)


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
