"""The model families, augmentation and the ensemble: tiny synthetic data, CPU, seconds."""

import dataclasses
import sys

import optuna
import pytest
import torch

from mnist_search.augment import random_affine
from mnist_search.champion import export_folder, onnx_max_error
from mnist_search.data import Data, to_split
from mnist_search.model import CNN, MLP, PixelClassifier, training_flops_per_sample
from mnist_search.space import StaleParams, config_from_params, suggest_config
from mnist_search.train import TrainConfig, build_model, fit
from tests.conftest import synthetic_images

CNN_CONFIG = TrainConfig(
    family="cnn", channels=(4, 8), kernel=3, hidden=(16,), lr=3e-3, batch_size=32, epochs=3
)
MLP_CONFIG = TrainConfig(hidden=(32,), lr=3e-3, batch_size=32, epochs=3)


def band_data(n=600) -> Data:
    """Fake digits whose class is the row of a bright band (tests/conftest.py), normalized."""
    images, labels = synthetic_images(n, seed=0)
    mean, std = images.float().mean().item() / 255, images.float().std().item() / 255
    cpu = torch.device("cpu")
    train = to_split(images[:500], labels[:500], mean, std, cpu)
    return Data(train, to_split(images[500:], labels[500:], mean, std, cpu), mean, std)


BF16_CNN = dataclasses.replace(CNN_CONFIG, precision="bf16")


@pytest.mark.parametrize(
    "config", [MLP_CONFIG, CNN_CONFIG, BF16_CNN], ids=["mlp", "cnn", "cnn-bf16"]
)
def test_each_family_trains_and_beats_chance_by_far(config):
    result = fit(config, band_data())
    assert isinstance(result.model, MLP if config.family == "mlp" else CNN)
    assert result.history[-1]["val_accuracy"] > 0.9  # chance is 0.1


def test_bf16_trains_through_autocast_and_keeps_float32_weights():
    fp32, bf16 = (fit(c, band_data()).model for c in (CNN_CONFIG, BF16_CNN))
    weights = [list(m.parameters()) for m in (fp32, bf16)]
    assert all(p.dtype == torch.float32 for p in weights[1])  # exported and evaluated as fp32
    # the same seed and batches: only the forward pass's precision can make them differ
    assert not all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_a_cnn_trains_with_augmentation_and_counts_its_flops():
    config = TrainConfig(**{**CNN_CONFIG.to_dict(), "augment": 0.5})
    assert fit(config, band_data()).history[-1]["val_accuracy"] > 0.9
    # two stride-2 convs (28 -> 14 -> 7) and the head; 3 x 2 x multiply-adds, as bench counts
    macs = 14 * 14 * 4 * 9 + 7 * 7 * 8 * 4 * 9 + 7 * 7 * 8 * 16 + 16 * 10
    assert training_flops_per_sample(build_model(CNN_CONFIG)) == 6 * macs


def test_augmentation_off_is_the_identity_and_on_keeps_shapes_and_is_seeded():
    x = band_data().train.x[:64]
    assert random_affine(x, 0.0, -1.0) is x
    torch.manual_seed(3)
    a = random_affine(x, 1.0, -1.0)
    torch.manual_seed(3)
    b = random_affine(x, 1.0, -1.0)
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    assert not torch.equal(a, x)
    # an all-background image stays background wherever it is moved to
    blank = torch.full((2, 784), -1.0)
    assert torch.allclose(random_affine(blank, 1.0, -1.0), blank, atol=1e-6)


def test_the_ensemble_outputs_the_mean_of_its_members():
    torch.manual_seed(0)
    nets = [build_model(MLP_CONFIG), build_model(CNN_CONFIG)]
    ensemble = PixelClassifier(nets, mean=0.1, std=0.3).eval()
    pixels = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        members = [PixelClassifier(net, mean=0.1, std=0.3).eval()(pixels) for net in nets]
        assert torch.allclose(ensemble(pixels), (members[0] + members[1]) / 2, atol=1e-7)
        assert torch.allclose(ensemble(pixels), ensemble(pixels.reshape(5, 784).float()))


@pytest.mark.parametrize("kind", ["cnn", "ensemble"])
def test_onnx_matches_pytorch(kind, tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    nets = [build_model(CNN_CONFIG)] + ([build_model(MLP_CONFIG)] if kind == "ensemble" else [])
    model = PixelClassifier(nets, mean=0.13, std=0.31).eval()
    images = synthetic_images(64, seed=1)[0].reshape(64, 784)  # as crown exports: (N, 784)
    out = export_folder(model, {"kind": kind}, images, tmp_path / kind)
    assert onnx_max_error(model, out / "model.onnx", images) < 1e-5


def test_without_onnxruntime_the_onnx_check_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    """`onnx` exports; only the check needs `onnxruntime`: a crown without it goes on."""
    model = PixelClassifier([build_model(TrainConfig(hidden=(8,)))], mean=0.13, std=0.31).eval()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # its import now raises ImportError
    assert onnx_max_error(model, tmp_path / "model.onnx", torch.zeros(2, 784)) is None
    assert "ONNX check skipped" in capsys.readouterr().err


@pytest.mark.parametrize("space", ["cnn", "all"])
def test_a_trials_params_rebuild_its_config(space):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(6):
        trial = study.ask()
        config = suggest_config(trial, epochs=5, seed=7, space=space)
        assert config_from_params(trial.params, 5, 7, space) == config
        study.tell(trial, 0.5)
    families = {config_from_params(t.params, 5, 7, space).family for t in study.trials}
    assert families == ({"cnn"} if space == "cnn" else {"mlp", "cnn"})


def test_the_mlp_space_samples_todays_params():
    trial = optuna.create_study().ask()
    config = suggest_config(trial, epochs=5, seed=0, space="mlp")
    assert (config.family, config.augment, config.precision) == ("mlp", 0, "fp32")
    widths = [f"width_{i}" for i in range(len(config.hidden))]
    # the same params in the same order: a seeded sampler draws them as it always did
    assert list(trial.params) == [
        "n_layers", *widths, "dropout", "activation", "optimizer", "lr", "weight_decay",
        "schedule", "label_smoothing", "batch_size",
    ]  # fmt: skip


def test_params_that_do_not_fit_the_space_are_refused_not_ignored():
    trial = optuna.create_study().ask()
    suggest_config(trial, epochs=5, seed=0, space="cnn")
    old = {**trial.params, "schedule": "constant"}  # searched for CNNs until commit 2378146
    with pytest.raises(StaleParams, match=r"\['schedule'\] are not in this version's --space cnn"):
        config_from_params(old, 5, 0, "cnn")
    missing = {k: v for k, v in trial.params.items() if k != "lr"}
    with pytest.raises(StaleParams, match="'lr'"):
        config_from_params(missing, 5, 0, "cnn")


def test_cnns_train_with_a_cosine_schedule_in_bf16_which_are_not_searched():
    trial = optuna.create_study().ask()
    config = suggest_config(trial, epochs=5, seed=0, space="cnn")
    assert (config.family, config.schedule, config.precision) == ("cnn", "cosine", "bf16")
    assert {"schedule", "precision"}.isdisjoint(trial.params)


def test_bench_times_the_cnn_with_and_without_augmentation_and_in_bf16():
    from mnist_search import bench

    train = band_data().train
    data = Data(train, None, 0.0, 1.0)  # no validation split: bench times training alone
    cpu = torch.device("cpu")
    for change in ({}, {"augment": 1.0}, {"precision": "bf16"}):
        assert bench.ours(data, 128, cpu, dataclasses.replace(bench.CNN_CONFIG, **change)) > 0
    assert bench.ours(data, 128, cpu) > 0  # the MLP


def test_flags_left_out_take_their_spaces_defaults_and_names_follow_the_space():
    from mnist_search.search import SearchConfig

    default = SearchConfig()
    assert (default.space, default.epochs, default.ensemble) == ("cnn", 5, 4)
    assert default.retrain_epochs == 10
    assert default.study_name == default.register_as == "mnist-cnn"
    # the original search: its epochs, its single-trial champion, its names
    mlp = SearchConfig(space="mlp")
    assert (mlp.epochs, mlp.ensemble, mlp.study_name, mlp.register_as) == (
        10,
        1,
        "mnist-mlp",
        "mnist-mlp",
    )
    assert mlp.retrain_epochs is None  # each member for the epoch where its validation peaked
    # what is given wins, and the registered model follows the study's name
    given = SearchConfig(space="mlp", epochs=3, ensemble=2, study_name="mine")
    assert (given.epochs, given.ensemble, given.register_as) == (3, 2, "mine")
    # workers get the resolved values, so a worker never resolves them differently
    argv = SearchConfig().to_argv()
    assert argv[argv.index("--epochs") + 1] == "5" and "--study-name" in argv
