import math
import re

import pytest
import torch

from mnist_search import data as mdata
from mnist_search import fetch, train
from mnist_search.data import Data, Split, load_data, load_test
from mnist_search.machine import resolve_device
from mnist_search.model import ACTIVATIONS, MLP, PixelClassifier
from mnist_search.train import (
    CHOICES,
    FitResult,
    NonFiniteLossError,
    TrainConfig,
    evaluate,
    fit,
    lr_at,
)
from tests.helpers import synthetic_images


def tiny_data(n=400, seed=0) -> Data:
    """Class c raises feature 3c among 784 noisy ones: a linearly separable 10-class problem."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.randn(n, 784, generator=g) * 0.2
    x[torch.arange(n), 3 * y] += 4
    train, val = Split(x[:300], y[:300]), Split(x[300:], y[300:])
    return Data(train, val, mean=0.0, std=1.0)


CONFIG = TrainConfig(hidden=(32,), dropout=0.1, lr=3e-3, batch_size=32, epochs=4)


def test_same_config_and_seed_give_the_same_numbers():
    a, b = fit(CONFIG, tiny_data()), fit(CONFIG, tiny_data())
    strip = [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in a.history]
    assert strip == [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in b.history]
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    c = fit(TrainConfig(**{**CONFIG.to_dict(), "seed": 1}), tiny_data())
    assert c.history[-1]["train_loss"] != a.history[-1]["train_loss"]


def test_loss_decreases_and_the_model_learns():
    result = fit(TrainConfig(**{**CONFIG.to_dict(), "epochs": 15}), tiny_data())
    losses = [m["train_loss"] for m in result.history]
    assert losses[-1] < losses[0] / 3
    assert result.history[-1]["val_accuracy"] > 0.8  # chance is 0.1


def test_hook_is_called_every_epoch_with_the_metrics():
    calls = []
    fit(CONFIG, tiny_data(), on_epoch_end=lambda e, m, model: calls.append((e, m, model)))
    assert [e for e, _, _ in calls] == [1, 2, 3, 4]
    for _, metrics, model in calls:
        assert {"train_loss", "val_loss", "val_accuracy", "epoch_seconds"} <= set(metrics)
        assert isinstance(model, MLP)


def test_hook_raising_stops_training():
    class Stop(Exception):
        pass

    epochs = []

    def hook(epoch, metrics, model):
        epochs.append(epoch)
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(CONFIG, tiny_data(), on_epoch_end=hook)
    assert epochs == [1, 2]


def test_non_finite_loss_stops_with_a_clear_error():
    data = tiny_data()
    data.train.x[5, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match="training loss became nan in epoch 1"):
        fit(CONFIG, data)
    with pytest.raises(FloatingPointError):  # catchable by its standard base class too
        fit(TrainConfig(hidden=(32,), lr=1e30, optimizer="adam", epochs=3), tiny_data())


def test_evaluate_matches_a_hand_count():
    data = tiny_data()
    model = fit(CONFIG, data).model
    logits = model.eval()(data.val.x)
    expected = (logits.argmax(1) == data.val.y).sum().item() / len(data.val)
    assert evaluate(model, data.val)["accuracy"] == pytest.approx(expected)


def test_best_epoch_is_the_validation_peak():
    result = fit(CONFIG, tiny_data())
    accs = [m["val_accuracy"] for m in result.history]
    assert accs[result.best_epoch - 1] == max(accs)


def history(*val_accuracies) -> list[dict]:
    return [
        {"epoch": epoch, "train_loss": 1.0 / epoch, "val_accuracy": accuracy}
        for epoch, accuracy in enumerate(val_accuracies, start=1)
    ]


def test_best_epoch_of_hand_built_histories():
    def best(h):
        return FitResult(model=MLP((4,)), history=h).best_epoch

    assert best(history(0.50, 0.90, 0.70)) == 2  # the peak, not the last epoch
    assert best(history(0.90, 0.50, 0.70)) == 1
    assert best(history(0.50, 0.90, 0.85, 0.90, 0.88)) == 2  # a tie: the earliest
    assert best(history(0.70, 0.70, 0.70)) == 1
    no_validation = [{"epoch": e, "train_loss": 1.0 / e} for e in (1, 2, 3)]
    assert best(no_validation) == 3  # nothing to choose by: the last
    assert best([]) == 0


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_fit_steps_at_the_scheduled_learning_rate(schedule, monkeypatch):
    """The lr the optimizer holds at each of its steps, against torch's own CosineAnnealingLR
    over all steps of all epochs (from the peak down towards 0); or the peak throughout."""
    used = []
    make = train._optimizer

    def recording(*args, **kwargs):
        optimizer = make(*args, **kwargs)
        step = optimizer.step
        optimizer.step = lambda *a, **k: (used.append(optimizer.param_groups[0]["lr"]), step())[1]
        return optimizer

    monkeypatch.setattr(train, "_optimizer", recording)
    config = TrainConfig(**{**CONFIG.to_dict(), "lr": 0.01, "schedule": schedule})
    fit(config, tiny_data())
    total = config.epochs * math.ceil(300 / config.batch_size)  # 4 epochs of 10 steps
    assert len(used) == total == 40
    if schedule == "constant":
        assert used == [0.01] * total
        return
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    cosine = []
    for _ in range(total):
        cosine.append(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    assert used == pytest.approx(cosine, rel=1e-9, abs=1e-12)
    assert used[0] == 0.01 and used[-1] < 0.01 * 0.002  # the last step is at ~0
    assert all(a > b for a, b in zip(used, used[1:], strict=False))


def test_train_command_reports_the_test_accuracy_of_the_model_its_flags_describe(
    in_tmp, synthetic_mnist, monkeypatch, capsys
):
    """With every test label shifted by one, a model that learned scores ~1 on validation and ~0
    on test: the command's test accuracy must come from the test files, read only with --test."""
    labels = fetch.raw_dir(synthetic_mnist) / "t10k-labels-idx1-ubyte"
    fetch.write_idx(labels, (synthetic_images(200, seed=1)[1] + 1) % 10)
    monkeypatch.setitem(fetch.OFFICIAL_SHA256, labels.name, fetch.sha256_file(labels))
    flags = ["--hidden", "32", "--epochs", "3", "--batch-size", "50", "--lr", "3e-3"]
    flags += ["--data-dir", str(synthetic_mnist), "--device", "cpu"]
    reads = []
    real_load_test = mdata.load_test
    monkeypatch.setattr(
        mdata, "load_test", lambda *a, **k: reads.append(1) or real_load_test(*a, **k)
    )
    assert train.main(flags) == 0
    assert reads == [] and "test accuracy" not in capsys.readouterr().out  # not asked for
    assert train.main([*flags, "--test"]) == 0 and reads == [1]
    lines = capsys.readouterr().out.strip().splitlines()
    epochs = [line.split() for line in lines[:-1]]
    assert [(e[0], int(e[1])) for e in epochs] == [("epoch", 1), ("epoch", 2), ("epoch", 3)]
    losses = [float(e[e.index("train_loss") + 1]) for e in epochs]
    assert losses[-1] < losses[0]
    summary = re.fullmatch(
        r"validation accuracy (\S+)  test accuracy (\S+)  \(\S+ s/epoch on cpu, (\d+) threads\)",
        lines[-1],
    )
    assert summary, lines[-1]
    assert summary[1] == epochs[-1][epochs[-1].index("val_accuracy") + 1]  # the last epoch's
    assert float(summary[1]) > 0.8  # chance is 0.1
    assert int(summary[3]) == torch.get_num_threads()
    # the same config through the library, tested on the 200 (mislabelled) test images
    config = TrainConfig(hidden=(32,), epochs=3, batch_size=50, lr=3e-3)
    data = load_data(synthetic_mnist)
    model = fit(config, data).model
    test = evaluate(model, load_test(synthetic_mnist, data.mean, data.std))["accuracy"]
    assert summary[2] == f"{test:.4f}" and test < 0.2
    assert list(in_tmp.iterdir()) == [synthetic_mnist]  # it writes nothing, tracks nothing


def test_activation_choices_are_the_models():
    assert CHOICES["activation"] == tuple(ACTIVATIONS)


def test_pixel_classifier_equals_manual_preprocessing():
    mlp = MLP((16,), 0.0)
    raw = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    model = PixelClassifier(mlp, mean=0.13, std=0.31).eval()
    manual = torch.softmax(mlp((raw.reshape(5, 784).float() / 255 - 0.13) / 0.31), dim=1)
    assert torch.allclose(model(raw), manual)
    assert torch.allclose(model(raw.reshape(5, 784).float()), manual)
    assert torch.allclose(model(raw).sum(1), torch.ones(5))


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown device .tpu. for --device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_unknown_choices_are_refused_when_the_config_is_made():
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="unknown optimizer 'lbfgs'"):
        TrainConfig(optimizer="lbfgs")


def test_cosine_schedule_matches_torch_cosine_annealing():
    config = TrainConfig(schedule="cosine", lr=0.01)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.lr)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=40)
    for step in range(40):
        assert lr_at(config, step, 40) == pytest.approx(reference.get_last_lr()[0], abs=1e-12)
        optimizer.step()
        reference.step()
    assert lr_at(TrainConfig(lr=0.01), 17, 40) == 0.01


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_cuda_graph_replay_trains_like_eager_steps(optimizer, monkeypatch):
    """Same seed, no dropout (its random stream differs between the two), a cosine lr and a
    partial last batch: the replayed graph must land on the weights the eager loop reaches."""
    replays = []
    real_replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(
        torch.cuda.CUDAGraph, "replay", lambda g: (replays.append(1), real_replay(g))[1]
    )
    data = tiny_data()
    data = Data(data.train.to("cuda"), data.val.to("cuda"), data.mean, data.std)
    config = TrainConfig(**{**CONFIG.to_dict(), "dropout": 0.0, "schedule": "cosine",
                            "optimizer": optimizer, "weight_decay": 1e-3})  # fmt: skip
    graphed = fit(config, data, "cuda")
    assert len(replays) == config.epochs * (300 // 32) - 3  # every full batch after 3 warm-ups
    eager = fit(config, data, "cuda", cuda_graphs=False)
    for pg, pe in zip(graphed.model.parameters(), eager.model.parameters(), strict=True):
        assert torch.allclose(pg, pe, atol=1e-5, rtol=1e-4)
    for mg, me in zip(graphed.history, eager.history, strict=True):
        assert mg["train_loss"] == pytest.approx(me["train_loss"], rel=1e-4)
        assert mg["val_accuracy"] == me["val_accuracy"]


@cuda
def test_cuda_graphs_with_dropout_learn():
    data = tiny_data()
    data = Data(data.train.to("cuda"), data.val.to("cuda"), data.mean, data.std)
    result = fit(TrainConfig(**{**CONFIG.to_dict(), "epochs": 15}), data, "cuda")
    assert result.history[-1]["val_accuracy"] > 0.8


def test_workers_beyond_the_available_memory_are_refused_naming_the_limit():
    from mnist_search.machine import WORKER_MB, check_memory_for

    check_memory_for(4, available_mb=4 * WORKER_MB)  # just fits
    with pytest.raises(ValueError) as refused:
        check_memory_for(5, available_mb=4.5 * WORKER_MB)
    message = str(refused.value)
    assert message.startswith(f"--workers 5 needs about {5 * WORKER_MB / 1024:.1f} GiB")
    assert "use --workers 4 or fewer here" in message
