"""Validation evidence for `--retrain-epochs E` and `--ensemble K` together: for the same
training time, more members or longer ones?

    python experiments/retrain_evidence.py [--study-name mnist-cnn] [--epochs 5 10] [--k 6]

run where the study ran (its storage). The K best distinct trials, as the champion picks them,
are trained again on the search's own 50,000 training images for each epoch count E (their
schedule stretched to E, as the champion's retrain does) and scored on the validation split:
each alone, and the mean of the probabilities of the best k, for every k up to K; the test set
is never read. The members were picked on these validation images, which flatters every row
alike: compare rows, not the absolute figures. `--seeds N` repeats each row with N seeds (the
study's seed, + 1, ...); `--first-seed S` starts them at the study's seed + S, to add seeds.

`--own-seeds` gives member i of seed s the seed + s x K + i, where the champion trains every
member of a seed with one seed (docs/search-space.md, "Members with their own seeds").
`--lr-scale F` retrains each member at its searched learning rate times F, as the champion's
`--retrain-lr-scale F` does. Left out, it is 1, the rate as searched, as `--variant` starts from
the members as found; the champion's CNN default is 0.5.

`--variant` measures training levers on the same members: each value is a row set of
TrainConfig fields given to every member, e.g. `--variant base ema=0.999 elastic=0.5,shear=0.5
channels=24-48,depth=2` (`base`: the members as the study found them).

Prints one row per variant, E and seed: the members' mean validation accuracy, the ensemble of
the best k for k = 1..K, and the seconds the K trainings took.

`--inference` adds, for the same trained members, the two inference-side levers (their rows come
after the training rows): test-time augmentation (each member's probabilities averaged over its
image and the image shifted one pixel up, down, left and right: 5x the inference) and greedy
forward selection with replacement over the K members (Caruana et al. 2004, `GREEDY_STEPS`
steps: a weighted ensemble). Greedy chooses on one stratified half of validation and is scored
on the other, both ways; beside it, the plain ensemble of all K on the same halves.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from mnist_search.champion import members_of, retrain_configs
from mnist_search.cli import add_data_dir_flag
from mnist_search.data import load_data
from mnist_search.fetch import default_data_dir
from mnist_search.space import DEFAULT_SPACE, default_name
from mnist_search.storage import DEFAULT_STORAGE
from mnist_search.studies import BadInput, open_existing
from mnist_search.train import TrainConfig, fit, predict_logits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a study's folder
from experiments.ensemble_evidence import halves  # noqa: E402

GREEDY_STEPS = 10  # as the try on the logged trial weights
SHIFTS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))  # (rows, columns): the image and 4 shifts


def right(probs: torch.Tensor, y: torch.Tensor) -> float:
    return (probs.argmax(1) == y).float().mean().item()


def scores(configs, data, device, shifted: list | None = None) -> tuple[float, list[float]]:
    """(mean accuracy of the members, [accuracy of the ensemble of the first k, k = 1..K]) on
    `data.val`. Each member's probabilities over `SHIFTS` are appended to `shifted` if given."""
    probs, val = [], data.val.features()
    for config in configs:
        model = fit(config, data, device).model
        probs.append(torch.softmax(predict_logits(model, val), 1))
        if shifted is not None:
            background = -data.mean / data.std
            views = [shift(val, rows, cols, background) for rows, cols in SHIFTS]
            shifted.append(torch.stack([torch.softmax(predict_logits(model, v), 1) for v in views]))
    together = [right(torch.stack(probs[:k]).mean(0), data.val.y) for k in range(1, len(probs) + 1)]
    return sum(right(p, data.val.y) for p in probs) / len(probs), together


def shift(x: torch.Tensor, rows: int, cols: int, background: float) -> torch.Tensor:
    """(N, 784) images moved `rows` down and `cols` right, uncovered pixels set to background."""
    images = F.pad(x.reshape(-1, 28, 28), (1, 1, 1, 1), value=background)  # (N, 30, 30)
    return images[:, 1 - rows : 29 - rows, 1 - cols : 29 - cols].reshape(-1, 784)


def greedy_weights(probs: list[torch.Tensor], y: torch.Tensor, steps: int) -> list[float]:
    """Caruana's forward selection with replacement: `steps` times, add to the ensemble the
    member whose addition scores best on (probs, y) (ties: the lower mean log-loss, then the
    lower index); a member's weight is the share of steps that chose it."""
    counts, total = [0] * len(probs), torch.zeros_like(probs[0])

    def merit(i: int) -> tuple[float, float]:
        mean = (total + probs[i]) / (sum(counts) + 1)
        return right(mean, y), -F.nll_loss(mean.clamp_min(1e-12).log(), y).item()

    for _ in range(steps):
        best = max(range(len(probs)), key=lambda i: (merit(i), -i))
        counts[best] += 1
        total += probs[best]
    return [c / steps for c in counts]


def weighted(probs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return sum(w * p for w, p in zip(weights, probs, strict=True))


def inference_levers(shifted: list[torch.Tensor], y: torch.Tensor) -> dict:
    """For members' probabilities over `SHIFTS` ((5, N, 10) each): the plain ensemble of all,
    the same averaged over the shifts, and greedy selection chosen on one half of validation,
    scored on the other (mean of both ways) beside the plain ensemble on those halves."""
    plain = [views[0] for views in shifted]
    out = {
        "all": right(torch.stack(plain).mean(0), y),
        "all, shifted": right(torch.stack([v.mean(0) for v in shifted]).mean(0), y),
    }
    held, greedy = [], []
    for choose, score in zip(halves(y), reversed(halves(y)), strict=True):
        weights = greedy_weights([p[choose] for p in plain], y[choose], GREEDY_STEPS)
        greedy.append(right(weighted([p[score] for p in plain], weights), y[score]))
        held.append(right(torch.stack([p[score] for p in plain]).mean(0), y[score]))
    return out | {"all, held out": sum(held) / 2, "greedy, held out": sum(greedy) / 2}


def member_seeds(base: int, offset: int, k: int, own: bool) -> list[int]:
    """The k members' seeds for seed `offset`: base + offset for all, as the champion trains
    them, or (`--own-seeds`) base + offset x k + i for member i, so that no two share one."""
    return [base + offset * k + i for i in range(k)] if own else [base + offset] * k


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
    p.add_argument("--first-seed", type=int, default=0, help="offset of the first seed")
    p.add_argument("--variant", type=variant, nargs="+", default=[{}], help="levers, see above")
    p.add_argument("--own-seeds", action="store_true", help="a seed per member, see above")
    p.add_argument("--lr-scale", type=float, default=1.0, help="times each member's lr")
    p.add_argument("--device", default="cpu")
    p.add_argument("--inference", action="store_true", help="also TTA and greedy, see above")
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
    levers = []  # (variant, epochs, seed, inference_levers(...)) for --inference
    for changes in args.variant:
        name = ",".join(f"{k}={v}" for k, v in changes.items()) or "base"
        for epochs, offset in itertools.product(
            args.epochs, range(args.first_seed, args.first_seed + args.seeds)
        ):
            found = retrain_configs(study, members, epochs, lr_scale=args.lr_scale)
            seeds = member_seeds(found[0].seed, offset, len(found), args.own_seeds)
            configs = [
                dataclasses.replace(c, **changes, seed=s) for c, s in zip(found, seeds, strict=True)
            ]
            start = time.perf_counter()
            shifted = [] if args.inference else None
            alone, together = scores(configs, data, args.device, shifted)
            seconds = time.perf_counter() - start
            ensembles = " | ".join(f"{a:.4f}" for a in together)
            row = f"{epochs} | {configs[0].seed} | {alone:.4f} | {ensembles} | {seconds:.0f}"
            print(f"{name} | {row}", flush=True)
            if shifted is not None:
                levers.append(
                    (name, epochs, configs[0].seed, inference_levers(shifted, data.val.y))
                )
    if levers:
        print(f"variant | epochs | seed | {' | '.join(levers[0][3])} (ensembles of {len(members)})")
    for name, epochs, seed, found in levers:
        print(f"{name} | {epochs} | {seed} | {' | '.join(f'{a:.4f}' for a in found.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
