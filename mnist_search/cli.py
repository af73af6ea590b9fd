"""Flags that the commands share, and the checks of their values that must come before anything
is opened or created; argparse and pathlib only, so `--help` stays instant."""

from __future__ import annotations

import argparse
from pathlib import Path

from mnist_search.storage import sqlite_path

SPACES = ("mlp", "cnn", "all")  # the search spaces of space.py, named here for instant --help
DEFAULT_SPACE = "cnn"  # the best test accuracy within the MLP search's wall time (README, Results)
# What a flag left out means, per space: the most epochs per trial, how many best trials the
# champion averages, and for how many epochs it retrains each (None: the epoch where the trial's
# validation accuracy peaked). `mlp` keeps the original search and its champion exactly. For
# CNNs: 5 epochs per trial, and 4 members retrained for 10 epochs each (their cosine schedules
# stretched), the most accurate ensemble on validation that fits the search and its champion
# into the MLP search's time on 2 CPU cores (README, "An ensemble champion").
SPACE_DEFAULTS = {
    "mlp": {"epochs": 10, "ensemble": 1, "retrain_epochs": None},
    "cnn": {"epochs": 5, "ensemble": 4, "retrain_epochs": 10},
    "all": {"epochs": 5, "ensemble": 4, "retrain_epochs": 10},
}


def space_defaults_help(flag: str) -> str:
    """`mlp: 10, cnn: 5, all: 5`: what leaving `flag` out means in each space, for its --help
    (None, for --retrain-epochs: each trial's best epoch)."""
    shown = lambda value: "the trial's best epoch" if value is None else value  # noqa: E731
    return ", ".join(f"{space}: {shown(SPACE_DEFAULTS[space][flag])}" for space in SPACES)


def default_name(space: str) -> str:
    """The default name of a study and of its registered model: `mnist-mlp` for the original
    project's MLP search, as before there were other spaces; `mnist-cnn`, `mnist-all`."""
    return f"mnist-{space}"


PRUNERS = ("hyperband", "median", "none")  # how search.py stops trials early


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Says each flag's default in its help, except a default of None: such a flag's help says
    where its value then comes from ($MNIST_SEARCH_DATA, $MLFLOW_TRACKING_URI), and
    `(default: None)` after it would only confuse."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def add_data_dir_flag(p: argparse.ArgumentParser) -> None:
    """--data-dir, resolved after parsing (`args.data_dir or fetch.default_data_dir()`): the
    data module imports torch, which --help must not wait for."""
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where MNIST lives, or is fetched to (default: $MNIST_SEARCH_DATA, else ./data)",
    )


def check_folder(p: argparse.ArgumentParser, flag: str, path: Path) -> None:
    """Refuse a `path` that cannot be a folder because it, or a folder above it, is a file:
    otherwise the command would find out after its work, when it writes there."""
    existing = next(q for q in (path, *path.parents) if q.exists())
    if existing == path and not path.is_dir():
        p.error(f"{flag} {path} is a file, not a folder")
    if not existing.is_dir():
        p.error(f"{flag} {path} cannot be a folder: {existing} is a file")


def open_existing_study(
    p: argparse.ArgumentParser, study_name: str, storage: str, tracking_uri: str | None
):
    """(study, its StudyTracker) for commands that add to a study a former `study` made
    (champion, report), or exit 2 naming the flag. Stores that are not there are refused
    before they are opened (opening a journal file or SQLite database creates it)."""
    import mlflow

    from mnist_search.storage import load_existing_study
    from mnist_search.tracking import StudyTracker, TrackingError

    if not study_name:
        p.error("--study-name must not be empty")
    if "://" not in storage and Path(storage).is_dir():
        p.error(f"--storage {storage} is a folder: pass the study's journal file or RDB URL")
    try:
        study = load_existing_study(study_name, storage)
    except ValueError as e:  # its message names the flag
        p.error(str(e))
    except Exception as e:  # noqa: BLE001 - SQLAlchemy and Optuna raise many kinds
        p.error(f"cannot open --storage {storage!r}: {type(e).__name__}: {e}")
    path = sqlite_path(tracking_uri or mlflow.get_tracking_uri())
    if path is not None and not path.exists():
        p.error(
            f"no MLflow parent run for study {study_name!r}: the tracking store {path} does not "
            "exist; run the study first, or pass the --tracking-uri (or $MLFLOW_TRACKING_URI) "
            "it used"
        )
    try:
        tracker = StudyTracker(study_name, tracking_uri)
        tracker.require_parent()
    except TrackingError as e:
        p.error(str(e))
    return study, tracker


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


def add_champion_flags(p: argparse.ArgumentParser) -> None:
    """How the champion is made and registered: the same for `study` and `champion`."""
    p.add_argument(
        "--register-as",
        default=None,
        help="registered model name for the champion (default: the study's name)",
    )
    p.add_argument(
        "--ensemble",
        type=int,
        default=None,
        help="retrain this many best distinct trials and ship the mean of their probabilities "
        "(1: the best trial alone; default, by the study's space: "
        f"{space_defaults_help('ensemble')})",
    )
    p.add_argument(
        "--retrain-epochs",
        type=int,
        default=None,
        help="retrain each member for this many epochs, its schedule stretched to them "
        f"(default, by the study's space: {space_defaults_help('retrain_epochs')})",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="also retrain and test the champion with this many seeds in all, to log the "
        "spread of its test accuracy (only the first seed's model ships)",
    )


def check_champion_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("ensemble", "retrain_epochs", "seeds"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, not {value}")
