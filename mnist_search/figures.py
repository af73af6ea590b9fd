"""Figures: the study (Optuna's matplotlib plots) and the champion (confusion, per class, mistakes).

Each function writes PNGs into a folder and returns their paths; callers log them to MLflow.
`python -m mnist_search.figures --study-name NAME` redraws a study's figures on demand.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

# No matplotlib.use(): the backend is the caller's (a notebook's stays inline). Without a
# display matplotlib picks Agg by itself, and every figure here is saved and closed, never shown.
import matplotlib.pyplot as plt
import numpy as np

from mnist_search import cli
from mnist_search.storage import DEFAULT_STORAGE


def save_figure(figure, path: Path, width: float = 8) -> Path:
    """Save a Figure, an Axes, or an array of Axes (Optuna returns all three) as a PNG."""
    axes = np.atleast_1d(figure).ravel() if not isinstance(figure, plt.Figure) else None
    fig = figure if axes is None else axes[0].figure
    if axes is not None:  # Optuna's plots: room for every panel and legible ticks
        fig.set_size_inches(max(width, 5.5 * len(axes)), 5)
        for ax in axes:
            legend = ax.get_legend()
            if legend is not None and len(legend.get_texts()) > 12:
                legend.remove()  # one entry per trial says nothing past a dozen
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def study_figures(study, out_dir: Path) -> list[Path]:
    """Optimization history, importances, parallel coordinates, learning curves, lr/batch slice."""
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots = {
        "optimization_history.png": lambda: ov.plot_optimization_history(study),
        "intermediate_values.png": lambda: ov.plot_intermediate_values(study),
        "parallel_coordinate.png": lambda: ov.plot_parallel_coordinate(study),
        "slice_lr_batch_size.png": lambda: ov.plot_slice(study, params=["lr", "batch_size"]),
    }
    if len(complete) >= 2:  # importances need at least two completed trials
        plots["param_importances.png"] = lambda: ov.plot_param_importances(study)
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        for name, plot in plots.items():
            wide = name == "parallel_coordinate.png"  # one axis per parameter
            paths.append(save_figure(plot(), out_dir / name, width=18 if wide else 8))
    return paths


def confusion_heatmap(confusion: np.ndarray, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 6))
    shown = ax.imshow(np.log1p(confusion), cmap="Blues")
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=7,
                color="white" if i == j else "black")  # fmt: skip
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title="Test confusion matrix (color: log count)")  # fmt: skip
    fig.colorbar(shown, ax=ax)
    return save_figure(fig, path)


def per_class_accuracy(per_class: list[float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(10), [100 * a for a in per_class], color="tab:blue")
    for digit, acc in enumerate(per_class):
        ax.text(digit, 100 * acc, f"{100 * acc:.2f}", ha="center", va="bottom", fontsize=8)
    low = min(per_class) * 100
    ax.set(xticks=range(10), xlabel="digit", ylabel="test accuracy (%)",
           ylim=(max(0, low - 2), 100.2), title="Test accuracy per class")  # fmt: skip
    return save_figure(fig, path)


def confident_mistakes(images, labels, probs, path: Path, count: int = 24) -> Path:
    """The `count` wrong predictions the model was surest of, with true and predicted labels."""
    images, labels, probs = (np.asarray(a) for a in (images, labels, probs))
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != labels)
    worst = wrong[np.argsort(-probs[wrong, pred[wrong]])][:count]
    cols = 8
    rows = max(1, int(np.ceil(len(worst) / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.7), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), worst, strict=False):
        ax.imshow(images[i].reshape(28, 28), cmap="gray")
        ax.set_title(f"#{i} true {labels[i]}\npred {pred[i]} {probs[i, pred[i]]:.2f}", fontsize=7)
    fig.suptitle("Most confident test mistakes")
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from mnist_search.space import DEFAULT_SPACE, default_name
    from mnist_search.studies import BadInput, open_existing

    p = argparse.ArgumentParser(
        prog="python -m mnist_search.figures",
        description="Draw a study's figures and log them to its MLflow parent run.",
        formatter_class=cli.HelpFormatter,
    )
    cli.add_study_flags(p, default_name(DEFAULT_SPACE), DEFAULT_STORAGE)
    p.add_argument("--out", type=Path, default=None, help="default: reports/STUDY/figures")
    args = p.parse_args(argv)
    if args.out is not None:
        cli.check_folder(p, "--out", args.out)
    try:
        study, tracker = open_existing(args.study_name, args.storage, args.tracking_uri)
    except BadInput as e:
        p.error(str(e))
    out = args.out or Path("reports") / args.study_name / "figures"
    for path in study_figures(study, out):
        tracker.log_parent_file(path, "figures")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
