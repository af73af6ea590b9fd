"""`python -m mnist_search.explore`: look at MNIST; measure why each preprocessing step is there.

Writes figures, a class-count table and a markdown summary into `--out`, and logs them all to an
MLflow run named `explore` in the experiment `mnist-explore`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnist_search import cli

# torch, matplotlib (through report) and MLflow are imported where used, so --help is instant


def sample_grid(images, labels, path: Path, per_class: int = 10) -> Path:
    from mnist_search.figures import plt, save_figure

    fig, axes = plt.subplots(10, per_class, figsize=(per_class * 0.9, 10 * 0.95))
    for digit in range(10):
        members = (labels == digit).nonzero().squeeze(1)[:per_class]
        for col, i in enumerate(members.tolist()):
            ax = axes[digit, col]
            ax.imshow(images[i].numpy(), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(str(digit), rotation=0, labelpad=10, fontsize=12)
    fig.suptitle("Training samples, one row per label")
    return save_figure(fig, path)


def class_counts_chart(counts: dict[str, list[int]], path: Path) -> Path:
    from mnist_search.figures import plt, save_figure

    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(counts)
    for k, (split, values) in enumerate(counts.items()):
        ax.bar([d + k * width for d in range(10)], values, width, label=split)
    ax.set(xticks=[d + 0.4 - width / 2 for d in range(10)], xticklabels=range(10),
           xlabel="digit", ylabel="images", title="Class counts per split")  # fmt: skip
    ax.legend()
    return save_figure(fig, path)


def mean_images(images, labels, path: Path) -> Path:
    from mnist_search.figures import plt, save_figure

    fig, axes = plt.subplots(2, 5, figsize=(10, 4.5))
    for digit, ax in enumerate(axes.ravel()):
        ax.imshow(images[labels == digit].float().mean(0).numpy(), cmap="magma")
        ax.set_title(f"mean of {digit}")
        ax.axis("off")
    return save_figure(fig, path)


def intensity_histograms(images, mean: float, std: float, path: Path) -> Path:
    from mnist_search.figures import plt, save_figure

    raw = images.flatten().float()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.hist(raw.numpy(), bins=64, log=True, color="tab:gray")
    left.set(title="raw pixels (uint8)", xlabel="value", ylabel="count (log)")
    right.hist(((raw / 255 - mean) / std).numpy(), bins=64, log=True, color="tab:blue")
    right.set(title=f"normalized: (x/255 - {mean:.4f}) / {std:.4f}", xlabel="value")
    return save_figure(fig, path)


def normalization_ablation(
    images, labels, train_idx, val_idx, mean: float, std: float, epochs: int
) -> dict[str, float]:
    """Validation accuracy of one small MLP fed raw 0-255, [0, 1], and standardized pixels
    (`mean` and `std`: of the training images, scaled to [0, 1])."""
    from mnist_search.data import Data, Split
    from mnist_search.train import TrainConfig, fit

    x = images.reshape(len(images), -1).float()  # (N, 784)
    variants = {
        "raw 0-255": (x, 0.0, 1.0),
        "scaled to [0, 1]": (x / 255, 0.0, 1.0),
        "standardized": (x / 255, mean, std),
    }
    config = TrainConfig(hidden=(256,), dropout=0.0, lr=1e-3, batch_size=256, epochs=epochs)
    results = {}
    for name, (values, m, s) in variants.items():
        z = (values - m) / s
        train, val = Split(z[train_idx], labels[train_idx]), Split(z[val_idx], labels[val_idx])
        data = Data(train, val, m, s)
        results[name] = fit(config, data).history[-1]["val_accuracy"]
    return results


def explore(data_dir: Path, out: Path, ablation_epochs: int = 2) -> list[Path]:
    """Write every figure, the counts table and the summary into `out`; return their paths."""
    import torch

    from mnist_search import data as mdata
    from mnist_search.data import SPLIT_SEED, pixel_stats, stratified_split
    from mnist_search.fetch import load_images

    out.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = load_images(data_dir, train=True)
    test_images, test_labels = load_images(data_dir, train=False)
    train_idx, val_idx = stratified_split(train_labels, mdata.VAL_SIZE, SPLIT_SEED)
    counts = {
        "train": torch.bincount(train_labels[train_idx], minlength=10).tolist(),
        "validation": torch.bincount(train_labels[val_idx], minlength=10).tolist(),
        "test": torch.bincount(test_labels, minlength=10).tolist(),
    }
    mean, std = pixel_stats(train_images[train_idx])

    import pandas as pd

    table = pd.DataFrame(counts, index=pd.Index(range(10), name="digit"))
    table.to_csv(out / "class_counts.csv")
    fractions = table / table.sum()
    drift = (fractions["validation"] - fractions["train"]).abs().max()
    paths = [
        sample_grid(train_images, train_labels, out / "samples_per_class.png"),
        class_counts_chart(counts, out / "class_counts.png"),
        mean_images(train_images, train_labels, out / "mean_image_per_class.png"),
        intensity_histograms(train_images[train_idx], mean, std, out / "pixel_histograms.png"),
        out / "class_counts.csv",
    ]
    ablation = normalization_ablation(
        train_images, train_labels, train_idx, val_idx, mean, std, ablation_epochs
    )
    float_mb = len(train_labels) * 784 * 4 / 2**20
    summary = f"""# MNIST, explored

| | train (all) | test |
|---|---|---|
| images | {tuple(train_images.shape)} {train_images.dtype} | {tuple(test_images.shape)} {test_images.dtype} |
| labels | {tuple(train_labels.shape)} {train_labels.dtype} | {tuple(test_labels.shape)} {test_labels.dtype} |
| pixel range | {train_images.min().item()}..{train_images.max().item()} | {test_images.min().item()}..{test_images.max().item()} |
| zero pixels | {(train_images == 0).float().mean().item():.1%} | {(test_images == 0).float().mean().item():.1%} |

Normalization statistics, from the {len(train_idx):,} training images only (not validation, not
test): mean {mean:.4f}, std {std:.4f} (pixels scaled to [0, 1]).

## Why each preprocessing step is there
- **Tensors, kept whole on the device.** All {len(train_labels):,} training images as float32 take
  {float_mb:.0f} MiB, so they fit in memory at once; batches are sliced from a random permutation
  instead of decoding PIL images one by one (`python -m mnist_search.bench` measures the gain).
- **Normalize.** {(train_images == 0).float().mean().item():.0%} of pixels are 0 and the rest pile
  up near 255: the inputs are far from zero-mean, unit-variance. Validation accuracy of a 784-256-10
  MLP (Adam, lr 1e-3, batch 256) after {ablation_epochs} epochs:
{chr(10).join(f"  - {name}: {acc:.2%}" for name, acc in ablation.items())}
- **Flatten.** An MLP takes vectors: each 28x28 image becomes 784 features, `(N, 28, 28) -> (N, 784)`.
- **Validation split.** {len(val_idx):,} training images, stratified by class with a fixed seed
  ({SPLIT_SEED}), select the hyperparameters; the largest gap between a class's share of
  train and of validation is {drift:.3%}. The {len(test_labels):,} test images are counted here
  and score a model only after the search: the champion's, once per retrain.
"""  # noqa: E501
    (out / "summary.md").write_text(summary)
    return paths + [out / "summary.md"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mnist_search.explore",
        description="Explore MNIST: figures, class counts, and the numbers behind preprocessing.",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("reports/explore"), help="folder to write to")
    cli.add_data_dir_flag(p)
    cli.add_tracking_flag(p)
    p.add_argument(
        "--ablation-epochs", type=int, default=2, help="epochs of each normalization's MLP"
    )
    args = p.parse_args(argv)
    if args.ablation_epochs < 1:
        p.error("--ablation-epochs must be at least 1")
    cli.check_folder(p, "--out", args.out)
    data_dir = cli.data_dir(p, args)
    if not cli.mnist_ready(data_dir):
        return 1

    from mnist_search.tracking import ROLE_TAG, StudyTracker, TrackingError, create_run, lifecycle

    try:  # before the work: an unreachable store is reported now, not after the figures
        tracker = StudyTracker("mnist-explore", args.tracking_uri)  # opens or creates it
    except TrackingError as e:
        p.error(str(e))
    run = create_run(tracker.client, tracker.experiment_id, "explore", {ROLE_TAG: "explore"})
    with lifecycle(run):
        for path in explore(data_dir, args.out, args.ablation_epochs):
            run.log_artifacts(path)
    print((args.out / "summary.md").read_text())
    print(f"figures in {args.out}/ and in MLflow (experiment mnist-explore, run explore)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
