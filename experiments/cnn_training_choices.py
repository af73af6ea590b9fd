"""Side by side: the training choices the CNN space fixes instead of searching.

    python experiments/cnn_training_choices.py [--seeds 3]

One CNN config (the best trial of a `--trials 50` study made when the CNN space still searched
the schedule and trained in float32: CNN 12-36 5x5, head 45, GELU, Adam 4.6e-3, constant
schedule, label smoothing 0.069, augment 0.35, batch 128), trained on the 50,000-image training
split with each change below, with the same seeds, and scored on the 10,000 validation images:

- `as searched`: the config as it is (constant learning rate, float32);
- `bf16`: its forward pass in bfloat16 (autocast), weights and optimizer in float32;
- `cosine`: a cosine schedule to zero over the epochs instead of the constant rate;
- `cosine, 10 epochs`: the same stretched to 10 epochs, as the champion retrains.

Prints, per variant, the mean validation accuracy over the seeds, each seed's, and the mean
seconds of one `fit` (epochs and validation included) on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from mnist_search.cli import add_data_dir_flag
from mnist_search.data import load_data
from mnist_search.fetch import default_data_dir
from mnist_search.train import TrainConfig, fit

BEST = TrainConfig(
    family="cnn", channels=(12, 36), kernel=5, hidden=(45,), dropout=0.0034, activation="gelu",
    optimizer="adam", lr=4.63e-3, weight_decay=4.97e-6, schedule="constant",
    label_smoothing=0.0687, augment=0.347, batch_size=128, epochs=5, precision="fp32",
)  # fmt: skip
VARIANTS = {
    "as searched": {},
    "bf16": {"precision": "bf16"},
    "cosine": {"schedule": "cosine"},
    "cosine, 10 epochs": {"schedule": "cosine", "epochs": 10},
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 for every variant")
    add_data_dir_flag(p)
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")
    data = load_data(args.data_dir or default_data_dir())
    print(f"{BEST.describe()}, {torch.get_num_threads()} threads")
    print("variant | mean validation accuracy | by seed | seconds per fit")
    for name, change in VARIANTS.items():
        accuracies, seconds = [], []
        for seed in range(args.seeds):
            start = time.perf_counter()
            result = fit(dataclasses.replace(BEST, seed=seed, **change), data)
            seconds.append(time.perf_counter() - start)
            accuracies.append(result.history[-1]["val_accuracy"])
        each = ", ".join(f"{a:.2%}" for a in accuracies)
        mean, per_fit = sum(accuracies) / len(accuracies), sum(seconds) / len(seconds)
        print(f"{name} | {mean:.2%} | {each} | {per_fit:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
