import pytest
import torch

from mnist_search.data import Data, Split
from mnist_search.model import MLP, PixelClassifier
from mnist_search.train import (
    NonFiniteLossError,
    TrainConfig,
    evaluate,
    fit,
    lr_at,
    resolve_device,
)


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
    with pytest.raises(ValueError, match="unknown --device"):
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
