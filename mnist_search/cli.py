"""Flags the commands share, and the checks of their values that come before anything is opened
or created. Argparse helpers only: domain constants live where their meaning does (the spaces in
`space`), and what a flag's value opens lives below the commands (`studies`, `storage`). Imports
only the package's leaf modules `fetch` and `machine`, so `--help` stays instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Says each flag's default in its help, except a default of None: such a flag's help says
    where its value then comes from ($MNIST_SEARCH_DATA, $MLFLOW_TRACKING_URI), and
    `(default: None)` after it would only confuse."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def add_data_dir_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where MNIST lives, or is fetched to (default: $MNIST_SEARCH_DATA, else ./data)",
    )


def add_tracking_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's own default, "
        "sqlite:///mlflow.db with artifacts in ./mlruns)",
    )


def add_study_flags(p: argparse.ArgumentParser, study_name: str | None, storage: str) -> None:
    """--study-name, --storage and --tracking-uri: where a study and its MLflow runs live."""
    p.add_argument(
        "--study-name",
        default=study_name,
        help="the Optuna study, and the MLflow experiment named after it"
        + ("" if study_name else " (default: mnist-SPACE, so mnist-cnn)"),
    )
    p.add_argument(
        "--storage",
        default=storage,
        help="Optuna storage: the path of a journal file (safe for workers on one machine) or "
        "an RDB URL (sqlite:///..., postgresql://...)",
    )
    add_tracking_flag(p)


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


CHAMPION_FLAGS = (  # ChampionConfig's fields, one flag each
    "ensemble", "retrain_epochs", "retrain_depth", "retrain_channels", "retrain_augment",
    "retrain_lr_scale", "seeds", "register_as",
)  # fmt: skip


class Widths(argparse.Action):
    """`--retrain-channels 24 48` -> (24, 48); `--retrain-channels searched` -> ()."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values == ["searched"]:
            return setattr(namespace, self.dest, ())
        try:
            setattr(namespace, self.dest, tuple(int(v) for v in values))
        except ValueError:
            parser.error(f"{option_string} takes conv widths, such as 24 48, or 'searched'")


def strength_or_searched(text: str) -> float | str:
    """`--retrain-augment 0.5` -> 0.5; `--retrain-augment searched` -> space.SEARCHED."""
    if text == "searched":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"takes a strength from 0 to 1, such as 0.5, or 'searched', not {text!r}"
        ) from None


def add_champion_flags(p: argparse.ArgumentParser, defaults_help: Callable[[str], str]) -> None:
    """How the champion is made and registered, for `study` and `champion`; `defaults_help(flag)`
    says what leaving a flag out means in each space (`space.defaults_help`)."""
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
        f"(1: the best trial alone; default, by the study's space: {defaults_help('ensemble')})",
    )
    p.add_argument(
        "--retrain-epochs",
        type=int,
        default=None,
        help="retrain each member for this many epochs, its schedule stretched to them "
        f"(default, by the study's space: {defaults_help('retrain_epochs')})",
    )
    p.add_argument(
        "--retrain-depth",
        type=int,
        default=None,
        help="retrain each CNN member with this many conv blocks a stage, a stride-2 one and "
        "then 3x3 ones (1: as searched; default, by the study's space: "
        f"{defaults_help('retrain_depth')})",
    )
    p.add_argument(
        "--retrain-channels",
        nargs="+",
        action=Widths,
        default=None,
        metavar="C",
        help="retrain each CNN member with these conv widths, one per stage, or 'searched' "
        f"(default, by the study's space: {defaults_help('retrain_channels')})",
    )
    p.add_argument(
        "--retrain-augment",
        type=strength_or_searched,
        default=None,
        metavar="S",
        help="retrain each CNN member with this augmentation strength, or 'searched' "
        f"(default, by the study's space: {defaults_help('retrain_augment')})",
    )
    p.add_argument(
        "--retrain-lr-scale",
        type=float,
        default=None,
        metavar="F",
        help="retrain each member at its searched learning rate times F (default, by the "
        f"study's space: {defaults_help('retrain_lr_scale')})",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="also retrain and test the champion with this many seeds in all, to log the "
        "spread of its test accuracy (only the first seed's model ships)",
    )


def check_folder(p: argparse.ArgumentParser, flag: str, path: Path) -> None:
    """Refuse a `path` that cannot be a folder because it, or a folder above it, is a file:
    otherwise the command would find out after its work, when it writes there."""
    existing = next(q for q in (path, *path.parents) if q.exists())
    if existing == path and not path.is_dir():
        p.error(f"{flag} {path} is a file, not a folder")
    if not existing.is_dir():
        p.error(f"{flag} {path} cannot be a folder: {existing} is a file")


def data_dir(p: argparse.ArgumentParser, args: argparse.Namespace) -> Path:
    """--data-dir, or $MNIST_SEARCH_DATA, else ./data; refused (exit 2) if it cannot be a folder."""
    from mnist_search.fetch import default_data_dir

    path = args.data_dir or default_data_dir()
    check_folder(p, "--data-dir", path)
    return path


def device(p: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """--device as a torch device, or exit 2 naming the problem."""
    from mnist_search.machine import resolve_device

    try:
        return resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))


def mnist_ready(path: Path) -> bool:
    """Put verified MNIST in `path` (see `fetch`); False, with the reason on stderr, if it
    cannot be: the command then exits 1."""
    from mnist_search.fetch import DataError, ensure_mnist

    try:
        ensure_mnist(path)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    return True
