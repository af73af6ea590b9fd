"""`python -m mnist_search.study`: the search's flags, turned into a `search.SearchConfig`.

The search itself (Optuna study, MLflow runs, champion) is `search.search`; this module parses
flags, so that `--help` is instant, prints what the search returns, and maps errors to exit
codes: 2 for a bad flag (nothing created), 1 when MNIST cannot be put in place, 130/143 when
interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mnist_search import cli
from mnist_search.space import DEFAULT_SPACE, SPACES, defaults_help
from mnist_search.storage import DEFAULT_STORAGE

# search.PRUNERS, named here for an instant --help
PRUNERS = ("hyperband", "halving", "median", "none")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mnist_search.study",
        description="Search network hyperparameters for MNIST with Optuna, track every trial "
        "in MLflow, then retrain, test and register the best.",
        formatter_class=cli.HelpFormatter,
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
        help=f"most epochs per trial (default, by --space: {defaults_help('epochs')})",
    )
    p.add_argument(
        "--space",
        choices=SPACES,
        default=DEFAULT_SPACE,
        help="the model families the sampler may choose: cnn (small conv nets on augmented "
        "batches), mlp (the original project's fully connected nets on plain pixels, searched "
        "and crowned as before), all",
    )
    cli.add_study_flags(p, None, DEFAULT_STORAGE)
    cli.add_data_dir_flag(p)
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler and every trial")
    cli.add_device_flags(p)
    p.add_argument(
        "--pruner",
        choices=PRUNERS,
        default=None,
        help=f"how trials stop early (default, by --space: {defaults_help('pruner')})",
    )
    p.add_argument("--timeout", type=float, default=None, help="start no trial after this (s)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="trial processes on this machine, sharing the storage (each gets cores / N threads)",
    )
    p.add_argument(
        "--store-retry-seconds",
        type=float,
        default=None,
        help="how long the Optuna storage or the MLflow tracking store may be away (a restart) "
        "before the running trial fails and the command exits 75 (default: "
        "$MNIST_SEARCH_STORE_RETRY_SECONDS, else 120)",
    )
    p.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument(
        "--no-champion",
        action="store_true",
        help="skip retraining, testing and registering the best trials at the end",
    )
    cli.add_champion_flags(p, defaults_help)
    return p


def main(argv: list[str] | None = None, launcher: list[str] | None = None) -> int:
    """The command. `launcher` is how workers 2..N start (default: `python -m
    mnist_search.study`); a script that wraps this command passes its own."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # the heavy imports only now that the flags parse, so that --help is instant
    from mnist_search.champion import ChampionConfig
    from mnist_search.fetch import DataError
    from mnist_search.retry import StoreUnavailable
    from mnist_search.search import STORE_AWAY, BadInput, SearchConfig, search
    from mnist_search.tracking import QUIET, env_defaults

    flags = vars(args)
    crowning = {k: flags.pop(k) for k in cli.CHAMPION_FLAGS}
    no_champion = flags.pop("no_champion")
    logging.basicConfig(format="%(message)s")  # the search's one-line notices, on stderr
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines
    try:
        champion = ChampionConfig(**crowning)  # checked even with --no-champion
        champion = None if no_champion else champion
        with env_defaults(QUIET):
            result = search(SearchConfig(**flags, champion=champion), launcher)
    except BadInput as e:
        parser.error(str(e))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except StoreUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return STORE_AWAY
    board = result.leaderboard
    if args.worker_id == 0 and not board.empty:
        columns = ["trial", "state", "val_accuracy", "epochs", "seconds"]
        print(board[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        print(f"leaderboard saved to reports/{result.study.study_name}/leaderboard.csv")
    if result.champion is not None:
        print(result.champion.summary())
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
