"""Validation evidence for `--ensemble K`: how accurate is the mean of the K best trials?

    python experiments/ensemble_evidence.py [--study-name mnist-cnn] [--storage ...] [--max-k 5]

run where the study ran (its storage and tracking store). It loads the weights every completed
trial logged (the trial's last epoch, `weights_only=True`) and scores ensembles of them on the
validation split only; the test set is never read. Two scores for each K:

- `as the champion picks`: the K best distinct trials by their study value, scored on all of
  validation. Optimistic: the same images chose the members.
- `held out`: validation is cut in two halves (stratified, fixed seed); members are ranked by
  their accuracy on one half and the ensemble is scored on the other, then the other way round;
  the mean of the two. No image both chooses and scores, so a gain here is not selection luck.

Prints one row per K and the K with the best held-out accuracy (the smallest of ties).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from mnist_search.champion import members_of
from mnist_search.cli import add_data_dir_flag
from mnist_search.data import load_data
from mnist_search.fetch import default_data_dir
from mnist_search.space import DEFAULT_SPACE, default_name
from mnist_search.storage import DEFAULT_STORAGE
from mnist_search.studies import BadInput, open_existing
from mnist_search.tracking import load_weights
from mnist_search.train import TrainConfig, build_model, predict_logits


def member_probs(trials, tracking_uri, val_x: torch.Tensor) -> list[torch.Tensor]:
    """Each trial's logged network's class probabilities on `val_x`, (N, 10) each."""
    probs = []
    for trial in trials:
        state_dict, meta = load_weights(trial.user_attrs["mlflow_run_id"], tracking_uri)
        net = build_model(TrainConfig(**meta["config"]))
        net.load_state_dict(state_dict)
        probs.append(torch.softmax(predict_logits(net, val_x), dim=1))
    return probs


def accuracy(probs: list[torch.Tensor], y: torch.Tensor) -> float:
    return (torch.stack(probs).mean(0).argmax(1) == y).float().mean().item()


def halves(y: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint index sets of the validation split, each with half of every class."""
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    for c in y.unique():
        members = (y == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=g)]
        a.append(members[: len(members) // 2])
        b.append(members[len(members) // 2 :])
    return torch.cat(a), torch.cat(b)


def held_out(probs: list[torch.Tensor], y: torch.Tensor, k: int) -> float:
    """Rank members on one half, score the top-k ensemble on the other; mean of both ways."""
    a, b = halves(y)
    scores = []
    for rank_on, score_on in ((a, b), (b, a)):
        ranked = sorted(
            range(len(probs)), key=lambda i: accuracy([probs[i][rank_on]], y[rank_on]), reverse=True
        )
        scores.append(accuracy([probs[i][score_on] for i in ranked[:k]], y[score_on]))
    return sum(scores) / 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study-name", default=default_name(DEFAULT_SPACE))
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--max-k", type=int, default=5, help="largest ensemble to score")
    p.add_argument(
        "--candidates", type=int, default=10, help="best distinct trials the held-out ranking sees"
    )
    add_data_dir_flag(p)
    args = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per trial
    if not 1 <= args.max_k <= args.candidates:
        p.error("--max-k must be at least 1 and at most --candidates")
    try:
        study, _ = open_existing(args.study_name, args.storage, args.tracking_uri)
    except BadInput as e:
        p.error(str(e))
    trials = members_of(study, args.candidates)
    val = load_data(args.data_dir or default_data_dir()).val
    probs = member_probs(trials, args.tracking_uri, val.features())
    print(f"study {args.study_name}: {len(trials)} candidate trials, {len(val)} validation images")
    print("K | members (as the champion picks) | as the champion picks | held out")
    best = None
    for k in range(1, min(args.max_k, len(trials)) + 1):
        picked, out = accuracy(probs[:k], val.y), held_out(probs, val.y, k)
        numbers = ", ".join(str(t.number) for t in trials[:k])
        print(f"{k} | {numbers} | {picked:.4f} | {out:.4f}")
        if best is None or out > best[1]:
            best = (k, out)
    print(f"best held-out K: {best[0]} ({best[1]:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
