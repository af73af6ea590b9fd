"""Validation evidence for `--retrain-epochs E` and `--ensemble K` together: for the same
training time, more members or longer ones?

    python experiments/retrain_evidence.py [--study-name mnist-cnn] [--epochs 5 10] [--k 6]

run where the study ran (its storage). The K best distinct trials, as the champion picks them,
are trained again on the search's own 50,000 training images for each epoch count E (their
schedule stretched to E, as the champion's retrain does) and scored on the validation split:
each alone, and the mean of the probabilities of the best k, for every k up to K; the test set
is never read. The members were picked on these validation images, which flatters every row
alike: compare rows, not the absolute figures. `--seeds N` repeats each row with N seeds (the
study's seed, + 1, ...).

`--variant` measures training levers on the same members: each value is a row set of
TrainConfig fields given to every member, e.g. `--variant base ema=0.999 elastic=0.5,shear=0.5
channels=24-48,depth=2` (`base`: the members as the study found them).

Prints one row per variant, E and seed: the members' mean validation accuracy, the ensemble of
the best k for k = 1..K, and the seconds the K trainings took.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time

import torch

from mnist_search.champion import members_of, retrain_configs
from mnist_search.cli import add_data_dir_flag
from mnist_search.data import load_data
from mnist_search.fetch import default_data_dir
from mnist_search.space import DEFAULT_SPACE, default_name
from mnist_search.storage import DEFAULT_STORAGE
from mnist_search.studies import BadInput, open_existing
from mnist_search.train import TrainConfig, fit, predict_logits


def scores(configs, data, device) -> tuple[float, list[float]]:
    """(mean accuracy of the members, [accuracy of the ensemble of the first k, k = 1..K]) on
    `data.val`."""
    probs = [
        torch.softmax(predict_logits(fit(c, data, device).model, data.val.features()), 1)
        for c in configs
    ]
    right = lambda p: (p.argmax(1) == data.val.y).float().mean().item()  # noqa: E731
    together = [right(torch.stack(probs[:k]).mean(0)) for k in range(1, len(probs) + 1)]
    return sum(map(right, probs)) / len(probs), together


def variant(text: str) -> dict:
    """'ema=0.999,channels=24-48' -> {'ema': 0.999, 'channels': (24, 48)}; 'base' -> {}."""
    if text == "base":
        return {}
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    changes = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in fields or not value:
            raise argparse.ArgumentTypeError(f"{item!r}: use FIELD=VALUE with a TrainConfig field")
        if str(fields[key]).startswith("tuple"):  # channels=24-48
            changes[key] = tuple(int(width) for width in value.split("-"))
        else:
            changes[key] = {"str": str, "int": int}.get(str(fields[key]), float)(value)
    return changes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study-name", default=default_name(DEFAULT_SPACE))
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--epochs", type=int, nargs="+", default=[5, 10], help="retrain lengths")
    p.add_argument("--k", type=int, default=6, help="members, as --ensemble")
    p.add_argument("--seeds", type=int, default=1, help="seeds per row")
    p.add_argument("--variant", type=variant, nargs="+", default=[{}], help="levers, see above")
    p.add_argument("--device", default="cpu")
    add_data_dir_flag(p)
    args = p.parse_args(argv)
    if min(args.epochs) < 1 or args.k < 1 or args.seeds < 1:
        p.error("--epochs, --k and --seeds must be at least 1")
    try:
        study, _ = open_existing(args.study_name, args.storage, args.tracking_uri)
    except BadInput as e:
        p.error(str(e))
    members = members_of(study, args.k)
    data = load_data(args.data_dir or default_data_dir(), args.device)
    numbers = ", ".join(str(t.number) for t in members)
    print(f"study {args.study_name}: members {numbers}; {len(data.val)} validation images")
    ks = " | ".join(f"K={k}" for k in range(1, len(members) + 1))
    print(f"variant | epochs | seed | members' mean validation accuracy | {ks} | seconds")
    for changes in args.variant:
        name = ",".join(f"{k}={v}" for k, v in changes.items()) or "base"
        for epochs, offset in itertools.product(args.epochs, range(args.seeds)):
            configs = [
                dataclasses.replace(c, **changes, seed=c.seed + offset)
                for c in retrain_configs(study, members, epochs)
            ]
            start = time.perf_counter()
            alone, together = scores(configs, data, args.device)
            seconds = time.perf_counter() - start
            ensembles = " | ".join(f"{a:.4f}" for a in together)
            row = f"{epochs} | {configs[0].seed} | {alone:.4f} | {ensembles} | {seconds:.0f}"
            print(f"{name} | {row}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
