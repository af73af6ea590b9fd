"""`python -m mnist_search.study`: the search's flags, turned into a `search.SearchConfig`.

The search itself (Optuna study, MLflow runs, champion) is `search.search`; this module only
parses flags, so that `--help` is instant, and maps errors to exit codes: 2 for a bad flag
(nothing created), 1 when MNIST cannot be put in place, 130/143 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnist_search.cli import (
    DEFAULT_SPACE,
    PRUNERS,
    SPACES,
    HelpFormatter,
    add_champion_flags,
    add_device_flags,
    space_defaults_help,
)
from mnist_search.storage import DEFAULT_STORAGE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mnist_search.study",
        description="Search network hyperparameters for MNIST with Optuna, track every trial "
        "in MLflow, then retrain, test and register the best.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--trials",
        type=int,
        default=50,
        help="finished (complete + pruned) trials the study should have, never more, "
        "however many workers: one that starts a trial beyond them gives it back before "
        "training (state FAIL, user attribute over_budget); failed trials do not count, and a "
        "rerun tops up",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"most epochs per trial (default, by --space: {space_defaults_help('epochs')})",
    )
    p.add_argument(
        "--space",
        choices=SPACES,
        default=DEFAULT_SPACE,
        help="the model families the sampler may choose: cnn (small conv nets on augmented "
        "batches), mlp (the original project's fully connected nets on plain pixels, searched "
        "and crowned as before), all",
    )
    p.add_argument(
        "--study-name",
        default=None,
        help="the study to create or resume (default: mnist-SPACE, so mnist-cnn; mnist-mlp is "
        "the original project's MLP search)",
    )
    p.add_argument(
        "--storage",
        default=DEFAULT_STORAGE,
        help="Optuna storage: an RDB URL (sqlite:///..., postgresql://...) or the "
        "path of a journal file (safe for concurrent workers)",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's own "
        "default, sqlite:///mlflow.db with artifacts in ./mlruns)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where MNIST lives (default: $MNIST_SEARCH_DATA or ./data)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler and every trial")
    add_device_flags(p)
    p.add_argument(
        "--pruner",
        choices=PRUNERS,
        default="hyperband",
        help="how trials are stopped early on validation accuracy",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="stop starting new trials after this many seconds",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="trial processes on this machine, sharing the storage (each gets cores / N threads)",
    )
    p.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument(
        "--no-champion",
        action="store_true",
        help="skip retraining, testing and registering the best trial at the end",
    )
    add_champion_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the heavy imports only now that the flags parse, so that --help is instant
    from mnist_search.fetch import DataError
    from mnist_search.search import BadInput, SearchConfig, search

    flags = vars(args)
    flags["champion"] = not flags.pop("no_champion")
    try:
        result = search(
            SearchConfig(**flags), launcher=launcher() if argv in (None, sys.argv[1:]) else None
        )
    except BadInput as e:
        parser.error(str(e))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return result.exit_code


def launcher() -> list[str]:
    """How this process was started (`python -m mnist_search.study`, or a script that calls
    `main` with the command line's flags), so that worker processes start the same way."""
    return [sys.executable, *sys.orig_argv[1 : len(sys.orig_argv) - len(sys.argv) + 1]]


if __name__ == "__main__":
    sys.exit(main())
