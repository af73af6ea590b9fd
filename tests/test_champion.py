"""Retrain, test once, export, register, load, predict, serve: on tiny synthetic studies, a CNN
ensemble the search crowned and a one-trial MLP the champion CLI crowned on its own."""

import copy
import json
import os
import subprocess
import sys
import sysconfig
import urllib.request
from types import SimpleNamespace

import mlflow
import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from mnist_search import champion, fetch, predict, ship
from mnist_search import data as mdata
from mnist_search.champion import ChampionConfig
from mnist_search.fetch import load_images
from mnist_search.model import PixelClassifier
from mnist_search.search import SearchConfig, search
from mnist_search.space import config_from_params
from mnist_search.storage import open_storage
from mnist_search.tracking import StudyTracker, load_weights
from mnist_search.train import TrainConfig, build_model, fit
from tests.helpers import assert_parent_series, free_port, use_synthetic_mnist, wait_for_http


@pytest.fixture(scope="module")
def crowned(tmp_path_factory):
    """A 2-trial study of CNNs on synthetic data, crowned as an ensemble of both trials (no
    pruning: both complete), each retrained for 3 epochs (at half its searched learning rate,
    as CNN members are by default), with 2 seeds: (folder, data_dir, study, crown's metrics)."""
    tmp = tmp_path_factory.mktemp("champion")
    with pytest.MonkeyPatch.context() as mp:  # undone before the tests: each sets what it needs
        mp.chdir(tmp)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # samples in a short study
        data_dir = use_synthetic_mnist(mp, tmp / "data")
        crowning = ChampionConfig(ensemble=2, retrain_epochs=3, seeds=2)
        config = SearchConfig(
            trials=2, epochs=2, data_dir=data_dir, device="cpu", space="cnn", pruner="none",
            storage=str(tmp / "s.journal"), champion=crowning,
        )  # fmt: skip
        result = search(config)
        assert result.exit_code == 0 and result.champion.shipped.alias == "champion"
    storage = open_storage(str(tmp / "s.journal"))
    study = optuna.load_study(study_name="mnist-cnn", storage=storage)
    metrics = json.loads((tmp / "exports/mnist-cnn/metrics.json").read_text())
    return tmp, data_dir, study, metrics


def test_the_champion_is_registered_with_alias_and_tags(crowned):
    tmp, _, study, metrics = crowned
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    version = client.get_model_version_by_alias("mnist-cnn", "champion")
    assert version.tags["study"] == "mnist-cnn"
    members = champion.members_of(study, 2)  # both trials, best first
    assert [t.number for t in members] == sorted(
        (t.number for t in study.trials), key=lambda n: -study.trials[n].value
    )
    assert version.tags["trial"] == "-".join(str(t.number) for t in members)
    assert version.tags["family"] == "cnn"
    assert float(version.tags["test_accuracy"]) == pytest.approx(metrics["test_accuracy"])
    assert len(version.tags["data_digest"]) == 16
    # the registry page says what the model is and how good; the version, where it came from
    accuracy = f"{metrics['test_accuracy']:.2%}"
    model_text = client.get_registered_model("mnist-cnn").description
    assert f"version {version.version}, test accuracy {accuracy}" in model_text
    assert "(N, 784)" in model_text and "models:/mnist-cnn@champion" in model_text
    assert f"Test accuracy {accuracy} ({version.tags['test_accuracy']})" in version.description
    numbers = ", ".join(str(t.number) for t in members)
    for fact in (f"ensemble (mean of the probabilities) of trials {numbers} ", "`mnist-cnn`"):
        assert fact in version.description
    assert version.tags["data_digest"] in version.description
    assert "| `channels` |" in version.description and "parameters" in version.description
    # what model.onnx costs to run, measured at export (the figures vary with the machine)
    speed = f"{metrics['onnx_ms_per_image_batch_1']:.2f} ms per image one at a time"
    assert speed in version.description and metrics["onnx_images_per_s_batch_1000"] > 0
    run = client.get_run(version.run_id)
    assert run.data.tags["mnist_search.role"] == "champion"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])  # nested under the study's run
    assert parent.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert_parent_series(client, study, parent.info.run_id)
    retrain = [  # each member's loss, one per epoch from 1
        [m.step for m in client.get_metric_history(run.info.run_id, f"member_{i}.train_loss")]
        for i in range(2)
    ]
    assert (
        [len(steps) for steps in retrain]
        == [int(run.data.params[f"member_{i}.epochs"]) for i in range(2)]
        == [3, 3]
    )  # --retrain-epochs, not the 2 epochs the trials trained
    for i in range(2):  # CNN members retrain deeper, wider, more augmented, at half the lr
        assert run.data.params[f"member_{i}.depth"] == "2"
        assert run.data.params[f"member_{i}.channels"] == "(24, 48)"
        assert run.data.params[f"member_{i}.augment"] == "0.5"
        trial = study.trials[members[i].number]
        assert float(run.data.params[f"member_{i}.lr"]) == pytest.approx(trial.params["lr"] / 2)
        # what trained, as its trial's run says it: precision "auto" resolved on this machine
        trial_run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.params[f"member_{i}.precision"] == trial_run.data.params["precision"]
        assert trial_run.data.params["precision"] in ("fp32", "bf16")
        assert (trial.params["channels_0"], trial.params["channels_1"]) != (24, 48)
        assert trial.params["augment"] != 0.5
    assert "2 convs a stage" in version.description
    assert sum(map(len, retrain)) == metrics["epochs"] and all(s[0] == 1 for s in retrain)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "figures")} == {
        "figures/confusion_matrix.png",
        "figures/per_class_accuracy.png",
        "figures/confident_mistakes.png",
    }
    by_seed = client.get_metric_history(run.info.run_id, "test_accuracy_by_seed")
    accuracies = [m.value for m in sorted(by_seed, key=lambda m: m.step)]
    assert len(accuracies) == 2 and accuracies[0] == pytest.approx(metrics["test_accuracy"])
    assert metrics["test_accuracy_seed_mean"] == pytest.approx(sum(accuracies) / 2)
    assert (metrics["test_accuracy_seed_min"], metrics["test_accuracy_seed_max"]) == (
        pytest.approx(min(accuracies)),
        pytest.approx(max(accuracies)),
    )
    assert {a.path for a in client.list_artifacts(run.info.run_id, "test")} == {
        "test/confusion_matrix.csv",
        "test/misclassified_test_indices.json",
    }


def test_every_run_records_the_datasets_it_trained_and_was_scored_on(crowned):
    tmp, data_dir, study, metrics = crowned
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    digest = client.get_model_version_by_alias("mnist-cnn", "champion").tags["data_digest"]
    source = json.dumps({"uri": fetch.raw_dir(data_dir).resolve().as_uri()})

    def inputs(run_id) -> dict:
        run = client.get_run(run_id)
        return {
            d.tags[0].value: (d.dataset.name, d.dataset.digest, d.dataset.source, d.tags[0].key)
            for d in run.inputs.dataset_inputs
        }

    trial = ("mnist-train-split", "mnist-validation-split")
    for t in study.trials:
        assert inputs(t.user_attrs["mlflow_run_id"]) == {
            "training": (trial[0], digest, source, "mlflow.data.context"),
            "validation": (trial[1], digest, source, "mlflow.data.context"),
        }
    champion_run = client.get_model_version_by_alias("mnist-cnn", "champion").run_id
    assert {c: d[0] for c, d in inputs(champion_run).items()} == {
        "training": "mnist-train",  # all 60,000 (here 600) images
        "validation": "mnist-validation-split",  # what chose the members
        "test": "mnist-test",
    }
    schema = json.loads(client.get_run(champion_run).inputs.dataset_inputs[0].dataset.schema)
    shapes = [spec["tensor-spec"]["shape"] for spec in schema["mlflow_colspec"]]
    assert shapes == [[600, 28, 28], [600]]  # the training images and labels
    # the test figures are linked to the registered model and to the test set
    (output,) = client.get_run(champion_run).outputs.model_outputs
    model_id = output.model_id
    assert (
        client.get_model_version_by_alias("mnist-cnn", "champion").source == f"models:/{model_id}"
    )
    linked = {m.key: (m.value, m.dataset_name) for m in client.get_logged_model(model_id).metrics}
    assert linked == {
        "test_accuracy": (pytest.approx(metrics["test_accuracy"]), "mnist-test"),
        "test_errors": (metrics["test_errors"], "mnist-test"),
    }


def test_the_study_run_has_system_metrics(crowned):
    tmp, _, study, _ = crowned
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    system = {k for k in parent.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    for t in study.trials:  # none on the trials: no thread per trial
        trial_run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert not [k for k in trial_run.data.metrics if k.startswith("system/")]


# A process without mnist_search (as LOAD_WITHOUT_THE_PACKAGE below) loads a trial's logged model.
LOAD_A_LOGGED_MODEL = """
import sys
sys.path += sys.argv[4:]
try:
    import mnist_search
except ImportError:
    pass
else:
    sys.exit(f"mnist_search is importable here: {mnist_search.__file__}")
import mlflow, numpy as np, torch
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pytorch.load_model(f"models:/{sys.argv[2]}")
with torch.no_grad():
    np.save(sys.argv[3], model(torch.from_numpy(np.load(sys.argv[3]))).numpy())
"""


@pytest.mark.slow
def test_a_trials_logged_model_is_its_best_epoch_and_loads_without_the_package(crowned, tmp_path):
    tmp, data_dir, study, _ = crowned
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    trial = study.best_trial
    model_id = trial.user_attrs["mlflow_model_id"]
    logged = client.get_logged_model(model_id)
    assert (logged.name, logged.source_run_id) == (
        f"trial-{trial.number}",
        trial.user_attrs["mlflow_run_id"],
    )
    assert logged.params == {k: str(v) for k, v in trial.params.items()}
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [
        (model_id, trial.user_attrs["best_epoch"])
    ]
    linked = {m.key: (m.value, m.dataset_name, m.step) for m in logged.metrics}
    best = trial.user_attrs["best_epoch"]
    assert linked["val_accuracy"] == (trial.value, "mnist-validation-split", best)
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(1, trial.user_attrs["epochs_trained"] + 1))

    # the weights it came from: the trial trained again (deterministic), at its best epoch
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mdata, "VAL_SIZE", 100)
        data = mdata.load_data(data_dir)
    config = config_from_params(trial.params, 2, study.user_attrs["seed"], "cnn")
    weights = {}
    fit(config, data, on_epoch_end=lambda e, m, net: weights.__setitem__(e, copy.deepcopy(net)))
    expected_model = PixelClassifier(weights[best], data.mean, data.std).eval()
    pixels = data.val.x.float()  # raw 0-255, (N, 784)
    with torch.no_grad():
        expected = expected_model(pixels).numpy()
    np.save(tmp_path / "io.npy", pixels.numpy())
    site_packages = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    argv = [f"sqlite:///{tmp}/mlflow.db", model_id, str(tmp_path / "io.npy"), *site_packages]
    loaded = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LOAD_A_LOGGED_MODEL, *argv],
        cwd=tmp, capture_output=True, text=True, timeout=600,  # bounds a hang only
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    assert np.abs(np.load(tmp_path / "io.npy") - expected).max() < 1e-5


def test_loads_agree_and_reproduce_the_test_accuracy(crowned, monkeypatch):
    tmp, data_dir, _, metrics = crowned
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    images, labels = load_images(data_dir, train=False)
    x = images.reshape(len(images), -1).float().numpy()  # raw 0-255 pixels, (N, 784)
    pyfunc_probs = np.asarray(mlflow.pyfunc.load_model("models:/mnist-cnn@champion").predict(x))
    torch_model = mlflow.pytorch.load_model("models:/mnist-cnn@champion")
    with torch.no_grad():
        torch_probs = torch_model(torch.from_numpy(x)).numpy()
    assert np.allclose(pyfunc_probs, torch_probs, atol=1e-6)
    accuracy = (torch_probs.argmax(1) == labels.numpy()).mean()
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-7)


# Run in the export folder by a bare interpreter: -I ignores PYTHONPATH and the working
# folder, -S skips site-packages' .pth files (the editable install is one), and the script
# puts back site-packages itself: what a user without mnist_search has.
LOAD_WITHOUT_THE_PACKAGE = """
import sys
sys.path += sys.argv[3:]
try:
    import mnist_search
except ImportError:
    pass
else:
    sys.exit(f"mnist_search is importable here: {mnist_search.__file__}")
import json
import numpy as np
import onnxruntime
import torch

state = torch.load("weights.pt", weights_only=True)
members = len(json.loads(open("config.json").read())["members"])
session = onnxruntime.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
(probs,) = session.run(None, {"pixels": np.load(sys.argv[1])})
np.save(sys.argv[2], probs)
print(json.dumps({"tensors": sorted(state), "members": members}))
"""


@pytest.mark.slow
def test_export_folder_loads_without_the_package_and_onnx_matches(crowned, tmp_path):
    tmp, data_dir, study, metrics = crowned
    out = tmp / "exports/mnist-cnn"
    assert {p.name for p in out.iterdir()} == {
        "weights.pt",
        "config.json",
        "metrics.json",
        "model.onnx",
    }
    config = json.loads((out / "config.json").read_text())
    assert [m["trial"] for m in config["members"]] == [
        t.number for t in champion.members_of(study, 2)
    ]
    nets = [build_model(TrainConfig(**member["config"])) for member in config["members"]]
    model = PixelClassifier(nets, config["mean"], config["std"]).eval()
    model.load_state_dict(torch.load(out / "weights.pt", weights_only=True))  # every tensor fits
    images, labels = load_images(data_dir, train=False)
    pixels = images.reshape(len(images), -1).float()  # raw 0-255, (N, 784), as model.onnx takes
    with torch.no_grad():
        probs = model(pixels).numpy()
    accuracy = (probs.argmax(1) == labels.numpy()).mean()  # these weights are the champion's
    assert accuracy == pytest.approx(metrics["test_accuracy"], abs=1e-7)

    np.save(tmp_path / "pixels.npy", pixels.numpy())
    site_packages = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    argv = [str(tmp_path / "pixels.npy"), str(tmp_path / "onnx.npy"), *site_packages]
    loaded = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LOAD_WITHOUT_THE_PACKAGE, *argv],
        cwd=out, capture_output=True, text=True, timeout=600,  # bounds a hang only
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout) == {"tensors": sorted(model.state_dict()), "members": 2}
    onnx_probs = np.load(tmp_path / "onnx.npy")
    assert onnx_probs.shape == probs.shape == (len(images), 10)  # the batch size is dynamic
    assert np.abs(onnx_probs - probs).max() < 1e-5
    assert metrics["onnx_max_abs_error"] < 1e-5  # and crown's own check agrees


@pytest.fixture(scope="module")
def crowned_by_cli(tmp_path_factory):
    """A 1-trial MLP study searched without a champion, then crowned by the champion CLI on
    its own, with `champion.fit` spied on: what each retrain was given."""
    tmp = tmp_path_factory.mktemp("cli")
    uri = f"sqlite:///{tmp}/mlflow.db"
    fitted, real_fit = [], champion.fit

    def spy(config, data, *args, **kwargs):
        fitted.append({"config": config, "train_images": len(data.train), "val": data.val})
        return real_fit(config, data, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:  # undone before the tests: each sets what it needs
        mp.chdir(tmp)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        data_dir = use_synthetic_mnist(mp, tmp / "data")
        storage = str(tmp / "s.journal")
        config = SearchConfig(
            trials=1, epochs=3, pruner="none", data_dir=data_dir, device="cpu", storage=storage,
            champion=None, space="mlp",
        )  # fmt: skip
        result = search(config)
        assert result.exit_code == 0 and result.champion is None
        assert not MlflowClient().search_registered_models()  # nothing crowned yet
        mp.setattr(champion, "fit", spy)
        argv = ["--study-name", "mnist-mlp", "--storage", storage, "--data-dir", str(data_dir)]
        code = champion.main([*argv, "--device", "cpu"])
    study = optuna.load_study(study_name="mnist-mlp", storage=open_storage(storage))
    return SimpleNamespace(
        tmp=tmp, uri=uri, data_dir=data_dir, study=study, code=code, fitted=fitted
    )


def test_the_champion_retrains_the_best_trials_config_on_all_training_images(crowned_by_cli):
    run = crowned_by_cli
    best = run.study.best_trial
    (retrain,) = run.fitted  # one member, one seed: one fit
    _, meta = load_weights(best.user_attrs["mlflow_run_id"], run.uri)
    searched = meta["config"]  # what the trial's MLflow run says it trained
    retrained = json.loads(json.dumps(retrain["config"].to_dict()))  # tuples as JSON lists
    assert retrained["epochs"] == best.user_attrs["best_epoch"]
    # (on this data validation accuracy peaks at epoch 1 of 3, so epochs_trained would differ)
    assert {k: v for k, v in retrained.items() if k != "epochs"} == {
        k: v for k, v in searched.items() if k != "epochs"
    }
    _, labels = load_images(run.data_dir, train=True)
    assert retrain["train_images"] == len(labels) and retrain["val"] is None  # none held out


def test_the_champion_cli_crowns_a_study_searched_without_one(crowned_by_cli):
    run = crowned_by_cli
    assert run.code == 0
    client = MlflowClient(run.uri)
    (only,) = client.search_model_versions("name='mnist-mlp'")
    version = client.get_model_version_by_alias("mnist-mlp", "champion")
    assert version.version == only.version
    assert version.tags["study"] == "mnist-mlp"
    assert version.tags["trial"] == str(run.study.best_trial.number)
    champion_run = client.get_run(version.run_id)
    assert champion_run.info.status == "FINISHED"
    assert champion_run.data.tags["mnist_search.role"] == "champion"
    parent_id = champion_run.data.tags["mlflow.parentRunId"]
    assert parent_id == run.study.user_attrs["mlflow_parent_run_id"]
    assert client.get_run(parent_id).data.tags["mnist_search.role"] == "study"


def test_an_alias_goes_to_the_better_model_and_never_to_a_worse_one():
    assert ship.choose_alias(0.90, None) == "champion"  # the first version
    assert ship.choose_alias(0.95, 0.90) == "champion"
    assert ship.choose_alias(0.90, 0.90) == "champion"  # as good: the newer one
    assert ship.choose_alias(0.85, 0.90) == "challenger"
    assert ship.choose_alias(0.85, float("nan")) == "champion"  # a champion without its tag


def test_register_moves_the_aliases_and_describes_the_champion(in_tmp):
    """Three versions of one untrained net, registered as if they had tested at 0.5, 0.4 and
    0.6: the registry's aliases and descriptions follow `choose_alias`."""
    client = MlflowClient()
    tracker = StudyTracker("ladder")
    tracker.create_parent({})
    config = TrainConfig(hidden=(8,))
    model = PixelClassifier([build_model(config)], mean=0.1, std=0.3).eval()
    example = torch.randint(0, 256, (8, 784), dtype=torch.uint8)

    def register(accuracy: float) -> tuple[str, str]:
        metrics = {"test_accuracy": accuracy, "test_images": 10_000, "parameters": 6370}
        card = ship.ModelCard("ladder", "ladder-study", [3], [config], metrics, "0" * 16)
        run = tracker.start_run("champion", f"champion-{accuracy}")
        return ship.register(run, model, card, example)

    def holder(alias: str) -> str:
        return str(client.get_model_version_by_alias("ladder", alias).version)

    def described_champion() -> str:
        return client.get_registered_model("ladder").description

    assert register(0.5) == ("1", "champion")
    assert register(0.4) == ("2", "challenger")
    assert holder("champion") == "1" and holder("challenger") == "2"
    assert "version 1, test accuracy 50.00%" in described_champion()
    assert register(0.6) == ("3", "champion")
    assert holder("champion") == "3" and holder("challenger") == "2"
    assert "version 3, test accuracy 60.00%" in described_champion()
    for version, accuracy in (("1", 0.5), ("2", 0.4), ("3", 0.6)):
        registered = client.get_model_version("ladder", version)
        assert float(registered.tags["test_accuracy"]) == accuracy
        assert registered.description.startswith(f"Test accuracy {accuracy:.2%}")


def digit_canvas() -> np.ndarray:
    """A light '7'-ish stroke on black, 28x28, MNIST-like."""
    img = np.zeros((28, 28), np.uint8)
    img[6:9, 8:21] = 255
    for i in range(14):
        img[8 + i, 19 - i // 2 : 21 - i // 2] = 255
    return img


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(float).ravel(), b.astype(float).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def test_images_of_any_polarity_size_and_mode_become_the_same_mnist_digit(tmp_path):
    reference = predict.to_mnist(Image.fromarray(digit_canvas()))
    big = Image.fromarray(digit_canvas()).resize((300, 300), Image.Resampling.BILINEAR)
    inverted = Image.fromarray(255 - np.asarray(big))
    variants = {
        "big.png": big,
        "inverted.png": inverted,  # dark ink on white paper
        "rgb.jpg": inverted.convert("RGB"),
        "wide.png": Image.fromarray(np.pad(digit_canvas(), ((0, 0), (40, 10)))),
    }
    for name, image in variants.items():
        image.save(tmp_path / name)
        result = predict.load_image(tmp_path / name)
        assert result.shape == (28, 28) and result.dtype == np.uint8
        assert similarity(result, reference) > 0.9, name
        assert result[0].max() == 0 and result[:, 0].max() == 0  # a dark 4-pixel-ish frame


@pytest.mark.mnist
def test_an_mnist_digit_is_left_almost_as_it_was(real_mnist):
    images, _ = load_images(real_mnist, train=False)
    for i in range(20):
        image = images[i].numpy()
        assert similarity(predict.to_mnist(Image.fromarray(image)), image) > 0.85


def test_predict_cli_prints_the_models_digit_for_each_image_and_errors_per_file(
    crowned, tmp_path, capsys, monkeypatch
):
    tmp, _, _, _ = crowned
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    Image.fromarray(digit_canvas()).save(tmp_path / "seven.png")
    Image.fromarray(255 - digit_canvas()).convert("RGB").save(tmp_path / "seven.jpg")
    bar = np.zeros((40, 30), np.uint8)
    bar[5:35, 13:17] = 200  # a '1'-ish stroke
    Image.fromarray(bar).save(tmp_path / "one.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    Image.new("L", (28, 28), 255).save(tmp_path / "blank.png")
    files = ["seven.png", "broken.png", "seven.jpg", "one.png", "blank.png"]
    argv = [str(tmp_path / f) for f in files] + ["--tracking-uri", f"sqlite:///{tmp}/mlflow.db"]
    assert predict.main(argv) == 1  # some files failed
    out, err = capsys.readouterr()
    # the model's own answer for each readable file, through MLflow's pyfunc loader and NumPy
    # (predict uses the PyTorch flavor), from the same preprocessed 28x28 image
    model = mlflow.pyfunc.load_model("models:/mnist-cnn@champion", model_config={"device": "cpu"})
    expected = []
    for name in ("seven.png", "seven.jpg", "one.png"):
        pixels = predict.load_image(tmp_path / name).reshape(1, 784).astype(np.float32)
        probs = np.asarray(model.predict(pixels))[0]
        digit = int(probs.argmax())
        expected.append(f"{tmp_path / name}: {digit} (p={probs[digit]:.3f})")
    assert out.strip().splitlines() == expected
    assert "broken.png: error: cannot read image" in err
    assert "blank.png: error: no digit found" in err


def test_predict_cli_rejects_missing_files_and_unknown_models(crowned, tmp_path, capsys):
    tmp, _, _, _ = crowned
    with pytest.raises(SystemExit) as exit_:
        predict.main([str(tmp_path / "nope.png")])
    assert exit_.value.code == 2 and "no such image file" in capsys.readouterr().err
    Image.fromarray(digit_canvas()).save(tmp_path / "seven.png")
    argv = [str(tmp_path / "seven.png"), "--model-uri", "models:/no-such-model@champion"]
    with pytest.raises(SystemExit) as exit_:
        predict.main(argv + ["--tracking-uri", f"sqlite:///{tmp}/mlflow.db"])
    assert exit_.value.code == 2 and "cannot load model" in capsys.readouterr().err


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(crowned, monkeypatch):
    tmp, data_dir, _, _ = crowned
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/mnist-cnn@champion"]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    log = tmp / "serve.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the server
        server = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, 600, log.read_text)  # a hang bound
        images, _ = load_images(data_dir, train=False)
        batch = images[:5].reshape(5, -1).tolist()  # raw 0-255 integers, as a client sends them
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": batch}).encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=300).read())
        served = np.asarray(answer["predictions"])
        with torch.no_grad():
            local = mlflow.pytorch.load_model("models:/mnist-cnn@champion")(
                images[:5].reshape(5, -1).float()
            ).numpy()
        assert served.shape == (5, 10) and np.allclose(served, local, atol=1e-5)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
