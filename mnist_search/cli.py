"""Flags that every command which trains shares; argparse only, so `--help` stays instant."""

from __future__ import annotations

import argparse

SPACES = ("mlp", "cnn", "all")  # the search spaces of space.py, named here for instant --help
PRUNERS = ("hyperband", "median", "none")  # how search.py stops trials early


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """--device and --cuda-graphs / --no-cuda-graphs: the same for every command that trains."""
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on a GPU, replay each training step from a CUDA graph; --no-cuda-graphs launches "
        "its kernels one by one (slower: for comparison, and as an escape hatch)",
    )


DEFAULT_ENSEMBLE = 1  # the best trial alone, until validation evidence says otherwise (README)


def add_champion_flags(p: argparse.ArgumentParser) -> None:
    """How the champion is made and registered: the same for `study` and `champion`."""
    p.add_argument(
        "--register-as", default="mnist-mlp", help="registered model name for the champion"
    )
    p.add_argument(
        "--ensemble",
        type=int,
        default=DEFAULT_ENSEMBLE,
        help="retrain this many best distinct trials and ship the mean of their probabilities "
        "(1: the best trial alone)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="also retrain and test the champion with this many seeds in all, to log the "
        "spread of its test accuracy (only the first seed's model ships)",
    )


def check_champion_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.ensemble < 1 or args.seeds < 1:
        p.error(f"--ensemble and --seeds must be at least 1, not {args.ensemble} and {args.seeds}")
