"""Every figure function on tiny synthetic data writes a valid, non-empty PNG."""

import subprocess
import sys

import numpy as np
import optuna
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from mnist_search import explore, figures
from tests.helpers import synthetic_images


def assert_png(path, min_size=(200, 150)):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        assert np.asarray(image.convert("L")).std() > 0  # not a blank canvas


def tiny_study() -> optuna.Study:
    """A real study on a toy objective, with learning curves and a pruned trial."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))

    def objective(trial):
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        batch = trial.suggest_categorical("batch_size", [128, 256, 512])
        width = trial.suggest_int("width_0", 128, 1024, log=True)
        value = 1 - abs(np.log10(lr) + 2.5) / 3 - batch / 5000 + width / 1e5
        for epoch in range(1, 4):
            trial.report(value * epoch / 3, epoch)
            if batch == 512 and epoch == 2:  # some trials pruned, the rest complete
                raise optuna.TrialPruned
        return value

    study.optimize(objective, n_trials=12)
    states = {t.state.name for t in study.trials}
    assert states == {"COMPLETE", "PRUNED"}
    return study


def test_study_figures(tmp_path):
    paths = figures.study_figures(tiny_study(), tmp_path)
    assert {p.name for p in paths} == {
        "optimization_history.png",
        "intermediate_values.png",
        "parallel_coordinate.png",
        "slice_lr_batch_size.png",
        "param_importances.png",
    }
    for path in paths:
        assert_png(path)


@pytest.mark.slow
def test_drawing_figures_leaves_the_callers_backend_alone(tmp_path):
    """A notebook's inline backend stays inline after the package draws (in a fresh process:
    a backend set at import time would hide behind an import made by an earlier test)."""
    probe = f"""
import matplotlib
matplotlib.use("module://matplotlib_inline.backend_inline")
import optuna
from pathlib import Path
from mnist_search import figures, search
study = optuna.create_study(direction="maximize")
study.optimize(lambda t: t.suggest_float("lr", 0, 1) + t.suggest_int("batch_size", 1, 2), 4)
print(len(figures.study_figures(study, Path({str(tmp_path)!r}))), matplotlib.get_backend())
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["5", "module://matplotlib_inline.backend_inline"]


def test_model_figures(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 10
    probs = rng.dirichlet(np.ones(10), size=40).astype(np.float32)
    images = rng.integers(0, 255, (40, 784))
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (labels, probs.argmax(1)), 1)
    assert_png(figures.confusion_heatmap(confusion, tmp_path / "c.png"))
    per_class = (confusion.diagonal() / confusion.sum(1)).tolist()
    assert_png(figures.per_class_accuracy(per_class, tmp_path / "p.png"))
    assert_png(figures.confident_mistakes(images, labels, probs, tmp_path / "m.png"))


def test_explore_figures(tmp_path):
    images, labels = synthetic_images(300, seed=0)
    assert_png(explore.sample_grid(images, labels, tmp_path / "s.png"))
    assert_png(explore.mean_images(images, labels, tmp_path / "m.png"))
    assert_png(explore.intensity_histograms(images, 0.2, 0.3, tmp_path / "h.png"))
    counts = {"train": [5] * 10, "test": list(range(10))}
    assert_png(explore.class_counts_chart(counts, tmp_path / "c.png"))


def test_explore_command_logs_its_artifacts(in_tmp, synthetic_mnist, capsys):
    argv = ["--data-dir", str(synthetic_mnist), "--out", str(in_tmp / "explore")]
    assert explore.main(argv + ["--ablation-epochs", "1"]) == 0
    client = MlflowClient()
    exp = client.get_experiment_by_name("mnist-explore")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "explore"
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert logged == {
        "samples_per_class.png",
        "class_counts.png",
        "mean_image_per_class.png",
        "pixel_histograms.png",
        "class_counts.csv",
        "summary.md",
    }
    summary = (in_tmp / "explore/summary.md").read_text()
    assert "standardized:" in summary and "mean 0." in summary
    counts = (in_tmp / "explore/class_counts.csv").read_text().splitlines()
    assert counts[0] == "digit,train,validation,test" and len(counts) == 11
    assert torch.tensor([int(v) for v in counts[1].split(",")[1:]]).sum() == 60 + 20
