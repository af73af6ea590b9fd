"""The search as a library call: `search(SearchConfig(...))` creates or resumes an Optuna study,
tracks every trial in MLflow, crowns the champion, and returns what it found.

TPE proposes a config (`study.ask`), the objective trains it with plain `fit`, the pruner stops it
early on validation accuracy, and `study.tell` records how it ended; every trial is a nested
MLflow run under the study's parent run. Calling `search` again resumes the study until it has
`trials` finished (complete or pruned) trials; it never has more, however many workers share
it. Events worth a line while it runs (a trial given back, the timeout) go to the
`mnist_search` logger, which `python -m mnist_search.study` prints.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import optuna
import pandas as pd
import torch
from optuna.trial import FrozenTrial, TrialState

from mnist_search import interrupts, workers
from mnist_search.champion import Champion, ChampionConfig, crown
from mnist_search.data import VAL_SIZE, load_data
from mnist_search.fetch import data_digest, default_data_dir, ensure_mnist, raw_dir
from mnist_search.figures import study_figures
from mnist_search.machine import check_memory_for, resolve_device
from mnist_search.objective import (
    OVER_BUDGET,
    give_back,
    make_objective,
    mark_worker,
    places_taken_before,
)
from mnist_search.retry import StoreUnavailable, retry_seconds
from mnist_search.space import DEFAULT_SPACE, DEFAULTS, SPACES, default_name
from mnist_search.storage import DEFAULT_STORAGE, check_storage, heartbeat, open_storage
from mnist_search.studies import BadInput, open_study, open_tracker
from mnist_search.summary import (
    finished_count,
    leaderboard,
    progress_points,
    running_count,
    study_summary,
)
from mnist_search.tracking import TRACKING_STORE, mnist_datasets

log = logging.getLogger("mnist_search")
PRUNERS = ("hyperband", "halving", "median", "none")  # how trials are stopped early
STORE_AWAY = 75  # exit code (EX_TEMPFAIL) when a store stayed away: rerun once it is back


@dataclass(frozen=True)
class SearchConfig:
    """One search: what the `study` command's flags say (`python -m mnist_search.study --help`)."""

    trials: int = 50  # finished (complete + pruned) trials the study should have, never more
    epochs: int | None = None  # most epochs per trial; None: the space's (space.DEFAULTS)
    space: str = DEFAULT_SPACE  # the model families the sampler may choose: mlp | cnn | all
    study_name: str | None = None  # the study to create or resume; None: mnist-SPACE
    storage: str = DEFAULT_STORAGE  # a journal file path or an RDB URL
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else MLflow's default
    data_dir: Path | None = None  # None: $MNIST_SEARCH_DATA, else ./data
    seed: int = 0  # seeds the sampler and every trial
    device: str = "auto"  # auto | cpu | cuda
    cuda_graphs: bool = True  # on a GPU, replay training steps from CUDA graphs
    pruner: str | None = None  # hyperband | halving | median | none; None: the space's
    timeout: float | None = None  # seconds after which no new trial starts
    workers: int = 1  # trial processes on this machine, sharing the storage
    store_retry_seconds: float | None = None  # how long a store may be away; None: retry's
    # what to crown at the end (resolved against the space); None: no champion
    champion: ChampionConfig | None = ChampionConfig()
    worker_id: int = field(default=0, repr=False)  # > 0: a worker `search` started

    def __post_init__(self):
        if self.space not in SPACES or self.pruner not in (*PRUNERS, None):
            raise BadInput(f"--space is one of {SPACES} and --pruner one of {PRUNERS}")
        # what a flag left out means, in this space (frozen: set through object.__setattr__)
        if self.pruner is None:
            object.__setattr__(self, "pruner", DEFAULTS[self.space].pruner)
        if self.epochs is None:
            object.__setattr__(self, "epochs", DEFAULTS[self.space].epochs)
        if self.study_name is None:
            object.__setattr__(self, "study_name", default_name(self.space))
        small = [f"--{n}" for n in ("trials", "epochs", "workers") if getattr(self, n) < 1]
        if small:
            raise BadInput(f"{' and '.join(small)} must be at least 1")
        if self.timeout is not None and self.timeout <= 0:
            raise BadInput(f"--timeout must be positive, not {self.timeout:g}")
        try:
            object.__setattr__(self, "store_retry_seconds", retry_seconds(self.store_retry_seconds))
        except ValueError as e:
            raise BadInput(str(e)) from None
        for flag in ("study_name", "storage"):
            if not getattr(self, flag).strip():
                raise BadInput(f"--{flag.replace('_', '-')} is empty; give it a name")
        if self.champion is not None:
            resolved = self.champion.resolved(self.space, self.study_name)
            object.__setattr__(self, "champion", resolved)

    def to_argv(self) -> list[str]:
        """The `study` flags of a worker that searches as this config does (workers never
        crown: the first process does, once they are done)."""
        argv = ["--no-champion"]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "champion" or value is None or value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):  # cuda_graphs defaults to True
                argv.append(f"--no-{flag[2:]}")
            else:
                argv += [flag, str(value)]
        return argv


@dataclass
class SearchResult:
    study: optuna.Study
    exit_code: int  # 0; 1 when trials kept failing or a worker failed; 75 when a store stayed
    # away past --store-retry-seconds; 130/143 when interrupted
    summary: dict[str, float]  # trial counts, epochs trained, search seconds (`study_summary`)
    leaderboard: pd.DataFrame  # the best finished trials (`summary.leaderboard`)
    champion: Champion | None = None  # what `crown` made, if it ran


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "hyperband":  # brackets of successive halving over 1..epochs
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if name == "halving":  # one bracket: the trials below the top third stop at epochs 1 and 3
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    return optuna.pruners.NopPruner()


def run_trial(study: optuna.Study, storage, objective, tracker, budget: int) -> FrozenTrial:
    """One trial by ask and tell, as Optuna's `optimize` runs one: stale trials of dead workers
    failed first (RDB storages), the heartbeat kept while it runs. A trial that finds the
    budget taken is given back before training; an error ends it FAIL (its reason in the user
    attribute `fail_reason`); a KeyboardInterrupt ends it FAIL and propagates, and so does a
    store that stayed away (StoreUnavailable). A trial that another worker failed while this
    process was paused is left as that worker ended it, and said so in one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # since 2.9
        optuna.storages.fail_stale_trials(study)  # does nothing without a heartbeat
        # Optuna warns that the heartbeat is meant for optimize: here `heartbeat` keeps it
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed", UserWarning)
        trial = study.ask()
    retrier = getattr(storage, "retrier", None)  # an RDB storage counts its calls' seconds
    before = retrier.seconds if retrier else 0.0

    def note_storage_seconds() -> None:  # the control plane's cost, for finished trials
        if retrier is not None:
            trial.set_user_attr("storage_seconds", retrier.seconds - before)

    with heartbeat(storage, trial._trial_id):
        mark_worker(trial)
        if (taken := places_taken_before(trial)) >= budget:
            give_back(trial, tracker, budget, taken)
            return study.tell(trial, state=TrialState.FAIL)
        try:
            value = objective(trial)
            note_storage_seconds()
        except optuna.TrialPruned:
            note_storage_seconds()
            return study.tell(trial, state=TrialState.PRUNED)
        except optuna.exceptions.UpdateFinishedTrialError:
            log.warning(
                "trial %d: another worker failed it while this process was paused past the "
                "heartbeat's grace period; its work is dropped and the search goes on",
                trial.number,
            )
            return storage.get_trial(trial._trial_id)
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL)
            raise
        except StoreUnavailable as e:
            if e.store == TRACKING_STORE:  # the study still answers: the trial ends FAIL there
                study.tell(trial, state=TrialState.FAIL)
            raise  # the study away: the trial stays RUNNING until a worker finds it dead
        except Exception:  # noqa: BLE001 - the run and fail_reason say what it was
            return study.tell(trial, state=TrialState.FAIL)
    return study.tell(trial, value, skip_if_finished=True)  # paused after its last epoch


def run_trials(config: SearchConfig, study, storage, tracker, data, device, datasets=None) -> int:
    """Run trials until the study has `config.trials` finished ones, never more. Returns an exit
    code: 1 after 10 failed trials in a row. `datasets`: each trial run's MLflow inputs."""
    from tqdm import tqdm

    # Reseed by progress: a resumed study must not replay the first run's random start-up trials.
    # Workers get their own streams, so they do not propose the same start-up trials.
    seed = config.seed + len(study.trials) + 1000 * config.worker_id
    # Several workers (here, or on other machines of an RDB storage): propose with the running
    # trials in mind, as Optuna recommends for parallel TPE, so they do not train near-twins.
    parallel = config.workers > 1 or "://" in config.storage
    with warnings.catch_warnings():  # constant_liar is experimental since Optuna 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=parallel)
    start, failures_in_a_row = time.monotonic(), 0
    objective = make_objective(
        data, device, config.epochs, config.seed, tracker, config.cuda_graphs, config.space,
        datasets,
    )  # fmt: skip
    bar = tqdm(
        total=config.trials,
        initial=finished_count(study),
        desc=f"study {config.study_name}",
        unit="trial",
        disable=config.worker_id > 0,  # one progress bar: the first worker's
    )
    try:
        # A cheap first test: start a trial only while finished + running ones fall short.
        # Workers that pass it together may each start one; `run_trial` then gives back
        # those beyond --trials, by trial number (a rerun tops up if a running one fails).
        while True:
            interrupts.check()
            workers.fail_dead_trials(study, storage, tracker)  # a dead worker's place is free
            if finished_count(study) + running_count(study) >= config.trials:
                return 0
            if config.timeout is not None and time.monotonic() - start > config.timeout:
                log.warning("--timeout %gs reached; rerun to finish", config.timeout)
                return 0
            try:
                trial = run_trial(study, storage, objective, tracker, config.trials)
                tracker.log_parent_series(progress_points(study))
            except StoreUnavailable as e:
                log.error("error: %s", e)
                return STORE_AWAY
            bar.update(finished_count(study) - bar.n)
            if trial.user_attrs.get(OVER_BUDGET):
                log.warning("trial %d: %s", trial.number, trial.user_attrs["fail_reason"])
                continue
            failures_in_a_row = failures_in_a_row + 1 if trial.state == TrialState.FAIL else 0
            if failures_in_a_row >= 10:
                log.error("10 trials in a row failed; see their fail_reason")
                return 1
            if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
                bar.set_postfix(best=f"{study.best_value:.4f}", trial=study.best_trial.number)
    finally:
        bar.close()


def publish(study, tracker, out_dir: Path) -> pd.DataFrame:
    """The leaderboard and the study's figures, saved in `out_dir` and on the parent run, with
    the study's series and summary as the parent's metrics. Returns the leaderboard."""
    tracker.log_parent_series(progress_points(study))
    tracker.log_parent_metrics(study_summary(study))
    board = leaderboard(study)
    if board.empty:
        return board
    out_dir.mkdir(parents=True, exist_ok=True)
    board.to_csv(out_dir / "leaderboard.csv", index=False)
    tracker.log_parent_file(out_dir / "leaderboard.csv")
    for figure in study_figures(study, out_dir / "figures"):
        tracker.log_parent_file(figure, "figures")
    return board


def lead(config: SearchConfig, study, storage, tracker, data, data_dir, device, children, datasets):
    """The first worker's part: trials, then (with the others done) publish and crown. The
    parent run ends FINISHED, KILLED (interrupted: the exit code says by what) or FAILED.
    Returns (exit code, leaderboard, the Champion or None)."""
    out_dir = Path("reports") / config.study_name
    board, champion = None, None
    try:
        try:
            code = run_trials(config, study, storage, tracker, data, device, datasets)
            code = max([code, *workers.wait(children)])
        finally:
            workers.stop(children)
        if code == STORE_AWAY:  # the parent run is closed by the rerun that completes the study
            return code, pd.DataFrame(), None
        board = publish(study, tracker, out_dir)
        if code == 0 and finished_count(study) >= config.trials and config.champion:
            champion = crown(study, tracker, data_dir, device, config.champion, config.cuda_graphs)
        interrupts.check()  # a signal that came during the last steps still counts
    except KeyboardInterrupt:
        log.warning("interrupted: the running trial or champion ended as FAIL/KILLED; rerun")
        if board is None:
            board = publish(study, tracker, out_dir)
        tracker.finish_parent("KILLED")
        return interrupts.exit_code(), board, champion
    except BaseException:
        tracker.finish_parent("FAILED")
        raise
    tracker.finish_parent("FINISHED" if code == 0 else "FAILED")
    return code, board, champion


def study_params(config: SearchConfig, pruner, data_dir: Path) -> dict:
    """The parent run's params: how the study searches, on what data, with which libraries."""
    import mlflow

    return {
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
        "mlflow": mlflow.__version__,
    }


def search(config: SearchConfig, launcher: list[str] | None = None) -> SearchResult:
    """Run the search `config` describes; see the module's docstring.

    Bad settings raise BadInput before anything is created (no study, no file, no run);
    `fetch.DataError` says MNIST could not be put in place. A Ctrl-C or SIGTERM during the call
    ends the running trial or champion KILLED and returns exit code 130 or 143; the signal
    handlers (and torch's thread count) are the caller's again on return. With `workers` > 1,
    workers 2..N run `launcher` (default: `python -m mnist_search.study`) with this config's
    flags (`SearchConfig.to_argv`)."""
    try:
        device = resolve_device(config.device)
        if config.worker_id == 0:  # the first process checks for all it starts
            check_memory_for(config.workers)
    except ValueError as e:
        raise BadInput(str(e)) from None
    try:
        check_storage(config.storage)
    except ValueError as e:
        raise BadInput(f"cannot use --storage {config.storage!r}: {e}") from None
    data_dir = config.data_dir or default_data_dir()
    if data_dir.exists() and not data_dir.is_dir():
        raise BadInput(f"--data-dir {data_dir} is a file; give the folder MNIST lives in")
    tracker = open_tracker(config.study_name, config.tracking_uri, config.store_retry_seconds)
    ensure_mnist(data_dir)
    storage = open_storage(config.storage, config.store_retry_seconds)
    pruner = make_pruner(config.pruner, config.epochs)
    params = study_params(config, pruner, data_dir)
    study = open_study(
        config.study_name, storage, pruner, config.seed, tracker, params, config.space
    )
    data = load_data(data_dir, device)
    parts = mnist_datasets(
        raw_dir(data_dir), params["data_digest"],
        {"train-split": len(data.train), "validation-split": len(data.val)},
    )  # fmt: skip
    datasets = {"training": parts["train-split"], "validation": parts["validation-split"]}
    threads = torch.get_num_threads()
    if config.workers > 1:  # the matmuls of N trials share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.workers))
    board, champion = None, None
    try:
        with interrupts.deferred():  # Ctrl-C and `kill` stop at the next safe point
            if config.worker_id > 0:  # a worker: trials only; the first one reports and crowns
                try:
                    code = run_trials(config, study, storage, tracker, data, device, datasets)
                except KeyboardInterrupt:
                    code = interrupts.exit_code()
            else:
                command = launcher or [sys.executable, "-m", "mnist_search.study"]
                children = workers.spawn([*command, *config.to_argv()], config.workers)
                with tracker.parent_system_metrics():
                    code, board, champion = lead(
                        config, study, storage, tracker, data, data_dir, device, children,
                        datasets,
                    )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    if code == STORE_AWAY:  # reading the study would only wait for its store again
        return SearchResult(study, code, {}, pd.DataFrame())
    board = leaderboard(study) if board is None else board
    return SearchResult(study, code, study_summary(study), board, champion)
