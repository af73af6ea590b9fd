"""The search as a library call: `search(SearchConfig(...))` creates or resumes an Optuna study,
tracks every trial in MLflow, crowns the champion, and returns what it found.

TPE proposes a config, the objective trains it with plain `fit`, the pruner stops it early on
validation accuracy, and every trial becomes a nested MLflow run under the study's parent run.
Calling `search` again resumes the study until it has `trials` finished (complete or pruned)
trials; it never has more, however many workers share it. `python -m mnist_search.study`
builds a SearchConfig from its flags and calls `search`; notebooks and tests call it directly.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import optuna
import torch

from mnist_search import interrupts, workers
from mnist_search.champion import crown
from mnist_search.cli import DEFAULT_SPACE, PRUNERS, SPACE_DEFAULTS, SPACES, default_name
from mnist_search.data import VAL_SIZE, load_data
from mnist_search.fetch import data_digest, default_data_dir, ensure_mnist
from mnist_search.objective import OVER_BUDGET, OverBudget, make_objective
from mnist_search.report import study_figures
from mnist_search.space import StaleParams, check_rebuildable, study_space
from mnist_search.storage import DEFAULT_STORAGE, check_storage, open_storage
from mnist_search.summary import (
    finished_count,
    leaderboard,
    progress_points,
    running_count,
    study_summary,
)
from mnist_search.tracking import StudyTracker, TrackingError
from mnist_search.train import resolve_device

PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute: the MLflow parent run
METRIC_NAME = "val_accuracy"  # the objective's name in Optuna's dashboard, CLI and plots


class BadInput(ValueError):
    """A setting that cannot work, found before anything was created; names the flag."""


@dataclass(frozen=True)
class SearchConfig:
    """One search: what the `study` command's flags say (`python -m mnist_search.study --help`)."""

    trials: int = 50  # finished (complete + pruned) trials the study should have, never more
    epochs: int | None = None  # most epochs per trial; None: the space's (cli.SPACE_DEFAULTS)
    space: str = DEFAULT_SPACE  # the model families the sampler may choose: mlp | cnn | all
    study_name: str | None = None  # the study to create or resume; None: mnist-SPACE
    storage: str = DEFAULT_STORAGE  # a journal file path or an RDB URL
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else MLflow's default
    data_dir: Path | None = None  # None: $MNIST_SEARCH_DATA, else ./data
    seed: int = 0  # seeds the sampler and every trial
    device: str = "auto"  # auto | cpu | cuda
    cuda_graphs: bool = True  # on a GPU, replay training steps from CUDA graphs
    pruner: str = "hyperband"  # hyperband | median | none
    timeout: float | None = None  # seconds after which no new trial starts
    workers: int = 1  # trial processes on this machine, sharing the storage
    champion: bool = True  # at the end, retrain, test and register the best
    register_as: str | None = None  # the champion's registered model; None: the study's name
    ensemble: int | None = None  # the champion averages this many best distinct trials
    retrain_epochs: int | None = None  # ... each retrained this long; None: its best epoch
    seeds: int = 1  # retrain the champion with this many seeds, to log its spread
    worker_id: int = field(default=0, repr=False)  # > 0: a worker `search` started

    def __post_init__(self):
        if self.space not in SPACES or self.pruner not in PRUNERS:
            raise BadInput(f"--space is one of {SPACES} and --pruner one of {PRUNERS}")
        # what a flag left out means, in this space (frozen: set through object.__setattr__)
        for name, value in SPACE_DEFAULTS[self.space].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.study_name is None:
            object.__setattr__(self, "study_name", default_name(self.space))
        if self.register_as is None:
            object.__setattr__(self, "register_as", self.study_name)
        small = [f"--{n}" for n in ("trials", "epochs", "workers") if getattr(self, n) < 1]
        small += [f"--{n}" for n in ("ensemble", "seeds") if getattr(self, n) < 1]
        if self.retrain_epochs is not None and self.retrain_epochs < 1:
            small.append("--retrain-epochs")
        if small:
            raise BadInput(f"{' and '.join(small)} must be at least 1")
        if self.timeout is not None and self.timeout <= 0:
            raise BadInput(f"--timeout must be positive, not {self.timeout:g}")
        for flag in ("study_name", "register_as", "storage"):
            if not getattr(self, flag).strip():
                raise BadInput(f"--{flag.replace('_', '-')} is empty; give it a name")

    def to_argv(self) -> list[str]:
        """The `study` flags that make this config again (for worker processes)."""
        argv = []
        for f in fields(self):
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if value is None or value == f.default:
                continue
            if isinstance(value, bool):  # both default to True: --no-champion, --no-cuda-graphs
                argv.append(f"--no-{flag[2:]}")
            else:
                argv += [flag, str(value)]
        return argv


@dataclass
class SearchResult:
    study: optuna.Study
    exit_code: int  # 0; 1 when trials kept failing or a worker failed; 130/143 when interrupted
    summary: dict[str, float]  # trial counts, epochs trained, search seconds (`study_summary`)
    champion: dict | None = None  # what `crown` returned, if it ran


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "hyperband":  # brackets of successive halving over 1..epochs
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    return optuna.pruners.NopPruner()


def name_objective(study: optuna.Study) -> None:
    """Label the objective `val_accuracy` rather than Optuna's "Objective 0"."""
    import warnings

    if study.metric_names != [METRIC_NAME]:
        with warnings.catch_warnings():  # experimental since Optuna 3.2, still in 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC_NAME])


def open_study(name: str, storage, pruner, seed: int, tracker, params: dict, space: str = "mlp"):
    """Create the study and its MLflow parent run exactly once, however many workers start
    together: creating a study is atomic in every Optuna storage, so the one worker whose
    create succeeds makes the parent run and records its id on the study; the others wait
    for that id and reopen the same run. A study resumes only in the space it was made in
    (BadInput otherwise): its trials' params are only meaningful there."""
    try:
        study = optuna.create_study(
            study_name=name, storage=storage, direction="maximize", pruner=pruner
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
        name_objective(study)  # a study made before its objective had a name
    else:
        study.set_user_attr("seed", seed)  # the champion retrains with the study's own seed
        name_objective(study)
        study.set_user_attr("space", space)  # the champion rebuilds configs in the same space
        study.set_user_attr(PARENT_ATTR, tracker.create_parent(params))
        return study
    deadline = time.monotonic() + 60
    while PARENT_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)  # the creating worker is making the parent run (after the space)
    made_in = study_space(study)
    if made_in != space:
        raise BadInput(
            f"study {name!r} searches --space {made_in}, not {space}: pass --space {made_in} "
            "to resume it, or a new --study-name for a new search"
        )
    try:
        check_rebuildable(study)
    except StaleParams as e:
        raise BadInput(f"study {name!r}: {e}") from None
    run_id = study.user_attrs.get(PARENT_ATTR) or tracker.find_parent()
    if run_id is None:  # its creator died before making one
        run_id = tracker.create_parent(params)
        study.set_user_attr(PARENT_ATTR, run_id)
    tracker.reopen_parent(run_id)
    return study


class _GiveBacksQuiet(logging.Filter):
    """Optuna logs every failed trial as a warning with its traceback; a trial given back over
    budget is no error, and `run_trials` says so in one line instead."""

    def __init__(self):
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, OverBudget):
            self.numbers.add(error.number)
            return False
        message = record.getMessage()
        return not any(message.startswith(f"Trial {n} failed") for n in self.numbers)


def run_trials(config: SearchConfig, study, storage, tracker, data, device) -> int:
    """Optimize until the study has `config.trials` finished trials, never more. Returns an exit
    code: 1 after 10 failed trials in a row."""
    from tqdm import tqdm

    # Reseed by progress: a resumed study must not replay the first run's random start-up trials.
    # Workers get their own streams, so they do not propose the same start-up trials.
    seed = config.seed + len(study.trials) + 1000 * config.worker_id
    study.sampler = optuna.samplers.TPESampler(seed=seed)
    start, failures_in_a_row = time.monotonic(), 0
    objective = make_objective(
        data, device, config.epochs, config.seed, tracker, config.cuda_graphs,
        budget=config.trials, space=config.space,
    )  # fmt: skip
    ours = []  # the trial each optimize call ran: other workers add theirs to study.trials
    bar = tqdm(
        total=config.trials,
        initial=finished_count(study),
        desc=f"study {config.study_name}",
        unit="trial",
        disable=config.worker_id > 0,  # one progress bar: the first worker's
    )
    quiet = _GiveBacksQuiet()
    optuna_log = logging.getLogger("optuna.study._optimize")  # where Optuna logs failed trials
    optuna_log.addFilter(quiet)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        # A cheap first test: start a trial only while finished + running ones fall short.
        # Workers that pass it together may each start one; the objective then gives back
        # those beyond --trials, by trial number (a rerun tops up if a running one fails).
        while True:
            interrupts.check()
            workers.fail_dead_trials(study, storage, tracker)  # a dead worker's place is free
            if finished_count(study) + running_count(study) >= config.trials:
                break
            if config.timeout is not None and time.monotonic() - start > config.timeout:
                print(f"--timeout {config.timeout:g}s reached; rerun to finish", file=sys.stderr)
                break
            study.optimize(
                objective,
                n_trials=1,
                catch=(Exception,),
                callbacks=[lambda study, trial: ours.append(trial)],
            )
            tracker.log_parent_series(progress_points(study))
            last = ours[-1]
            bar.update(finished_count(study) - bar.n)
            if last.user_attrs.get(OVER_BUDGET):
                print(f"trial {last.number}: {last.user_attrs['fail_reason']}", file=sys.stderr)
                continue
            failures_in_a_row = failures_in_a_row + 1 if last.state.name == "FAIL" else 0
            if failures_in_a_row >= 10:
                print("error: 10 trials in a row failed; see fail_reason", file=sys.stderr)
                return 1
            if any(t.state.name == "COMPLETE" for t in study.trials):
                bar.set_postfix(best=f"{study.best_value:.4f}", trial=study.best_trial.number)
    finally:
        optuna.logging.set_verbosity(verbosity)
        optuna_log.removeFilter(quiet)
        bar.close()
    print(f"worker {config.worker_id} searched for {time.monotonic() - start:.1f} s")
    return 0


def report(study, tracker, out_dir: Path) -> None:
    """Print the leaderboard; keep it and the study's figures locally and on the parent run,
    with the study's series and summary as the parent's metrics."""
    tracker.log_parent_series(progress_points(study))
    tracker.log_parent_metrics(study_summary(study))
    board = leaderboard(study)
    if board.empty:
        print("no finished trials yet")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "leaderboard.csv"
    board.to_csv(path, index=False)
    tracker.log_parent_file(path)
    columns = ["trial", "state", "val_accuracy", "epochs", "seconds"]
    print(board[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"leaderboard saved to {path}")
    for figure in study_figures(study, out_dir / "figures"):
        tracker.log_parent_file(figure, "figures")


def lead(config: SearchConfig, study, storage, tracker, data, data_dir, device, children):
    """The first worker's part: trials, then (with the others done) report and champion. The
    parent run ends FINISHED, KILLED (interrupted: the exit code says by what) or FAILED.
    Returns (exit code, the champion's info or None)."""
    out_dir = Path("reports") / config.study_name
    reported, champion = False, None
    try:
        try:
            code = run_trials(config, study, storage, tracker, data, device)
            code = max([code, *workers.wait(children)])
        finally:
            workers.stop(children)
        report(study, tracker, out_dir)
        reported = True
        if code == 0 and finished_count(study) >= config.trials and config.champion:
            champion = crown(
                study, tracker, data_dir, device, config.register_as,
                cuda_graphs=config.cuda_graphs, ensemble=config.ensemble,
                retrain_epochs=config.retrain_epochs, seeds=config.seeds,
            )  # fmt: skip
        interrupts.check()  # a signal that came during the last steps still counts
    except KeyboardInterrupt:
        print("\ninterrupted: the running trial or champion ended as FAIL/KILLED; rerun to resume")
        if not reported:
            report(study, tracker, out_dir)
        tracker.finish_parent("KILLED")
        return interrupts.exit_code(), champion
    except BaseException:
        tracker.finish_parent("FAILED")
        raise
    tracker.finish_parent("FINISHED" if code == 0 else "FAILED")
    return code, champion


def open_tracker(config: SearchConfig) -> StudyTracker:
    try:
        return StudyTracker(config.study_name, config.tracking_uri)
    except TrackingError as e:
        raise BadInput(str(e)) from None


def search(config: SearchConfig, launcher: list[str] | None = None) -> SearchResult:
    """Run the search `config` describes; see the module's docstring.

    Bad settings raise BadInput before anything is created (no study, no file, no run);
    `fetch.DataError` says MNIST could not be put in place. A Ctrl-C or SIGTERM during the call
    ends the running trial or champion KILLED and returns exit code 130 or 143; the signal
    handlers (and torch's thread count, Optuna's log level) are the caller's again on return.
    With `workers` > 1, workers 2..N run `launcher` (default: `python -m mnist_search.study`)
    with this config's flags."""
    try:
        device = resolve_device(config.device)
    except ValueError as e:
        raise BadInput(str(e)) from None
    try:
        check_storage(config.storage)
    except ValueError as e:
        raise BadInput(f"cannot use --storage {config.storage!r}: {e}") from None
    data_dir = config.data_dir or default_data_dir()
    if data_dir.exists() and not data_dir.is_dir():
        raise BadInput(f"--data-dir {data_dir} is a file; give the folder MNIST lives in")
    tracker = open_tracker(config)
    ensure_mnist(data_dir)
    storage = open_storage(config.storage)
    pruner = make_pruner(config.pruner, config.epochs)
    params = {
        "study_name": config.study_name,
        "seed": config.seed,
        "epochs": config.epochs,
        "space": config.space,
        "sampler": "TPESampler",
        "pruner": f"{config.pruner}: {type(pruner).__name__}",
        "objective": "max validation accuracy over epochs",
        "data_digest": data_digest(data_dir),
        "val_size": VAL_SIZE,
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "mlflow": __import__("mlflow").__version__,
    }
    study = open_study(
        config.study_name, storage, pruner, config.seed, tracker, params, config.space
    )
    data = load_data(data_dir, device)
    threads = torch.get_num_threads()
    if config.workers > 1:  # the matmuls of N trials share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.workers))
    champion = None
    try:
        with interrupts.deferred():  # Ctrl-C and `kill` stop at the next safe point
            if config.worker_id > 0:  # a worker: trials only; the first one reports and crowns
                try:
                    code = run_trials(config, study, storage, tracker, data, device)
                except KeyboardInterrupt:
                    code = interrupts.exit_code()
            else:
                command = launcher or [sys.executable, "-m", "mnist_search.study"]
                children = workers.spawn(
                    [*command, *config.to_argv(), "--no-champion"], config.workers
                )
                code, champion = lead(
                    config, study, storage, tracker, data, data_dir, device, children
                )
    finally:
        torch.set_num_threads(threads)
    return SearchResult(study, code, study_summary(study), champion)
