"""Seconds per 50,000-image epoch of a trial's net and a champion member's, in float32 and in
bf16 autocast, alternated so that the machine's drift falls on both: what `precision="auto"`
chooses between (docs/search-space.md, "Precision").

    python experiments/precision_cost.py [--rounds 3] [--threads N] [--data-dir DIR]

Two copies at once with `--threads 1` against one with both cores: whether two trial processes
of one thread each train more per second than one of two threads (`study --workers 2`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from mnist_search.cli import add_data_dir_flag
from mnist_search.data import load_data
from mnist_search.fetch import default_data_dir
from mnist_search.train import TrainConfig, fit, forward_precision

TRIAL = TrainConfig(  # a trial of the default study: a best trial's shape, one conv a stage
    family="cnn", channels=(10, 40), kernel=5, hidden=(150,), dropout=0.2, activation="silu",
    optimizer="adamw", lr=5e-3, schedule="cosine", augment=0.3, epochs=1,
)  # fmt: skip
MEMBER = dataclasses.replace(TRIAL, channels=(24, 48), depth=2, augment=0.5)  # as retrained


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="fp32, bf16 pairs per net")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_data_dir_flag(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_data(args.data_dir or default_data_dir(), "cpu")
    data = dataclasses.replace(data, val=data.val.head(1000))  # the epoch, not its scoring
    print(f"torch threads: {torch.get_num_threads()}")
    print("net | round | fp32 s | bf16 s | bf16 / fp32")
    for name, config in (("trial", TRIAL), ("member", MEMBER)):
        for round_ in range(args.rounds):
            fp32, bf16 = (
                fit(dataclasses.replace(config, precision=precision), data).history[0]
                for precision in ("fp32", "bf16")
            )
            fp32, bf16 = fp32["epoch_seconds"], bf16["epoch_seconds"]
            print(f"{name} | {round_} | {fp32:.2f} | {bf16:.2f} | {bf16 / fp32:.2f}")
    auto = dataclasses.replace(TRIAL, precision="auto")
    print(f"precision auto chooses here: {forward_precision(auto, 'cpu')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
