"""`python -m mnist_search.study`: the Optuna study, logged to MLflow, then the champion.

TPE proposes a config, plain `fit` trains it, Hyperband prunes on validation accuracy after
every epoch, and every trial becomes a nested MLflow run under the study's parent run. Rerunning
the same command resumes the study until it has `--trials` finished (complete or pruned) trials;
it never has more, however many workers share it.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from pathlib import Path

from mnist_search import interrupts
from mnist_search.cli import SPACES, add_champion_flags, add_device_flags, check_champion_flags

DEFAULT_STORAGE = "optuna-journal.log"
PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute: the MLflow parent run
METRIC_NAME = "val_accuracy"  # the objective's name in Optuna's dashboard, CLI and plots


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mnist_search.study",
        description="Search MLP hyperparameters for MNIST with Optuna, track every trial in "
        "MLflow, then retrain, test and register the best.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    p.add_argument("--epochs", type=int, default=10, help="most epochs per trial")
    p.add_argument(
        "--space",
        choices=SPACES,
        default="mlp",
        help="the model families the sampler may choose: mlp (the original project's "
        "fully connected nets on plain pixels), cnn (small conv nets, augmented batches), all",
    )
    p.add_argument(
        "--study-name",
        default="mnist-mlp",
        help="the study to create or resume (`mnist-mlp` is the original project's MLP search)",
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
        choices=["hyperband", "median", "none"],
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


def make_pruner(name: str, epochs: int):
    import optuna

    if name == "hyperband":  # brackets of successive halving over 1..epochs
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
    return optuna.pruners.NopPruner()


def open_storage(url: str):
    """An Optuna storage from an RDB URL or a journal-file path."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" in url:  # the heartbeat fails trials of workers that died on any host
        return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120)
    return JournalStorage(JournalFileBackend(url))


def open_study(name: str, storage, pruner, seed: int, tracker, params: dict, space: str = "mlp"):
    """Create the study and its MLflow parent run exactly once, however many workers start
    together: creating a study is atomic in every Optuna storage, so the one worker whose
    create succeeds makes the parent run and records its id on the study; the others wait
    for that id and reopen the same run. A study resumes only in the space it was made in
    (ValueError otherwise): its trials' params are only meaningful there."""
    import optuna

    from mnist_search.space import study_space

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
        raise ValueError(
            f"study {name!r} searches --space {made_in}, not {space}: pass --space {made_in} "
            "to resume it, or a new --study-name for a new search"
        )
    run_id = study.user_attrs.get(PARENT_ATTR) or tracker.find_parent()
    if run_id is None:  # its creator died before making one
        run_id = tracker.create_parent(params)
        study.set_user_attr(PARENT_ATTR, run_id)
    tracker.reopen_parent(run_id)
    return study


def name_objective(study) -> None:
    """Label the objective `val_accuracy` rather than Optuna's "Objective 0"."""
    import warnings

    import optuna

    if study.metric_names != [METRIC_NAME]:
        with warnings.catch_warnings():  # experimental since Optuna 3.2, still in 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC_NAME])


def load_existing_study(name: str, storage_url: str):
    """A study that a former `study` command made, or ValueError naming what is missing."""
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=open_storage(storage_url))
    except KeyError:
        raise ValueError(f"no study {name!r} in {storage_url}; run the study first") from None


def fail_dead_trials(study, storage, tracker) -> list[int]:
    """Mark FAIL every RUNNING trial whose process (on this host) is gone, e.g. after kill -9,
    and close the MLflow runs of trials that are not running. Returns the trials it failed.
    (On an RDB storage, Optuna's heartbeat also catches dead workers on other hosts.)"""
    import optuna
    from optuna.trial import TrialState

    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
        if host == socket.gethostname() and pid is not None and not _alive(pid):
            try:
                storage.set_trial_user_attr(t._trial_id, "fail_reason", "process died")
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker failed it first
            failed.append(t.number)
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    tracker.close_orphans(lambda number: number in running)
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed worker stays a zombie until its parent reaps it: dead all the same
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # no /proc (not Linux): trust kill(pid, 0)
        return True


OVER_BUDGET = "over_budget"  # trial user attribute: given back before training


class OverBudget(Exception):
    """Raised by the objective for a trial that found the budget taken: it ends as FAIL."""

    def __init__(self, number: int, reason: str):
        super().__init__(reason)
        self.number = number


def places_taken_before(trial) -> int:
    """Trials numbered before `trial` that are finished (complete or pruned) or running.

    Every storage numbers trials in one order that all workers see: the journal is one
    append-only log, and an RDB storage locks the study's row while it numbers a new trial. So
    once a trial exists, every trial numbered before it is visible to its worker, and workers
    that all created a trial at the same moment agree on which ones came first."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    earlier = trial.study.get_trials(deepcopy=False, states=states)
    return sum(t.number < trial.number for t in earlier)


def make_objective(
    data,
    device,
    epochs: int,
    seed: int,
    tracker,
    cuda_graphs: bool = True,
    budget=None,
    space: str = "mlp",
):
    """The objective: config from the `space`, plain `fit`, with pruning and logging in the hook.
    With a `budget`, a trial that finds `budget` earlier trials finished or running is given
    back before training: FAIL with the user attribute `over_budget`, its run KILLED with
    `optuna_state=OVER_BUDGET`. So the study never has more than `budget` finished trials, however
    many workers on however many machines asked for the last place at the same moment."""
    import optuna

    from mnist_search.model import training_flops_per_sample
    from mnist_search.space import suggest_config
    from mnist_search.train import build_model, fit

    def give_back(trial: optuna.Trial, taken: int):
        reason = (
            f"over budget: {taken} earlier trials already finished or running fill "
            f"--trials {budget}; given back before training"
        )
        trial.set_user_attr(OVER_BUDGET, True)
        trial.set_user_attr("fail_reason", reason)
        run = tracker.start_trial(trial.number, {})
        trial.set_user_attr("mlflow_run_id", run.run_id)
        run.finish("KILLED", "OVER_BUDGET", reason)
        raise OverBudget(trial.number, reason)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        if budget is not None and (taken := places_taken_before(trial)) >= budget:
            give_back(trial, taken)
        config = suggest_config(trial, epochs, seed, space)
        flops = training_flops_per_sample(build_model(config))  # the trial's cost, comparable
        trial.set_user_attr("flops_per_sample", flops)  # across families (as bench counts it)
        run = tracker.start_trial(
            trial.number, {**trial.params, "family": config.family, "flops_per_sample": flops}
        )
        trial.set_user_attr("mlflow_run_id", run.run_id)
        last = {}  # the model and number of the latest epoch, for the weights artifact
        start = time.perf_counter()

        def on_epoch_end(epoch, metrics, model):
            run.log_epoch(metrics, step=epoch)
            best = max(last.get("best", 0.0), metrics["val_accuracy"])
            last.update(model=model, epoch=epoch, best=best)
            trial.report(metrics["val_accuracy"], epoch)
            interrupts.check()  # a Ctrl-C or SIGTERM received since the last check stops here
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}")

        def log_weights():
            # When training ended: the time of the trial's points on the parent run, the same
            # for every worker that logs them (see `progress_points`).
            trial.set_user_attr("end_ms", int(time.time() * 1000))
            meta = {"config": config.to_dict(), "mean": data.mean, "std": data.std}
            meta["epochs_trained"] = last["epoch"]
            run.log_weights(last["model"].state_dict(), meta)
            trial.set_user_attr("epochs_trained", last["epoch"])

        try:
            try:
                interrupts.check()  # one that came while the trial was set up: no epoch trained
                result = fit(config, data, device, on_epoch_end, cuda_graphs)
            except optuna.TrialPruned as e:
                log_weights()  # if this fails, the trial fails below, with the reason
                run.finish("KILLED", "PRUNED", str(e), {"best_val_accuracy": last["best"]})
                raise
            log_weights()
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            run.finish("KILLED", "INTERRUPTED", "interrupted by the user")
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            trial.set_user_attr("fail_reason", reason)
            run.finish("FAILED", "FAIL", reason)
            raise
        trial.set_user_attr("best_epoch", result.best_epoch)
        seconds = time.perf_counter() - start
        trial.set_user_attr("tracking_fraction", run.tracking_seconds / seconds)
        value = max(m["val_accuracy"] for m in result.history)
        run.finish("FINISHED", "COMPLETE", metrics={"best_val_accuracy": value})
        return value

    return objective


def leaderboard(study, top: int = 10):
    """The best finished trials as a pandas DataFrame, best first."""
    import pandas as pd
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "val_accuracy": t.value
                if t.value is not None
                else max(t.intermediate_values.values(), default=float("nan")),
                "epochs": t.user_attrs.get("epochs_trained"),
                "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
                **t.params,
            }
        )
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).sort_values("val_accuracy", ascending=False)
    return frame.head(top).reset_index(drop=True)


def progress_points(study) -> list[tuple[int, int, dict[str, float]]]:
    """The parent run's series: one point per finished trial, (trial number, when it ended in
    ms, {"trial_val_accuracy": its best epoch's, "best_val_accuracy": Optuna's best value over
    the completed trials numbered up to it}).

    Only trials numbered below every trial still running get a point: a trial that finishes
    late can raise the best-so-far of the trials numbered after it, so a point is logged only
    once nothing can change it, and every worker then computes the same point."""
    from optuna.trial import TrialState

    points, best = [], None
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if not t.state.is_finished():
            break
        if t.state == TrialState.FAIL:
            continue
        if t.state == TrialState.COMPLETE:
            best = t.value if best is None else max(best, t.value)
            accuracy = t.value
        else:  # pruned: Optuna's value is the last epoch's; the objective is the best epoch
            accuracy = max(t.intermediate_values.values(), default=float("nan"))
        values = {"trial_val_accuracy": accuracy}
        if best is not None:  # no best before the first completed trial
            values["best_val_accuracy"] = best
        ended = t.user_attrs.get("end_ms") or int(t.datetime_complete.timestamp() * 1000)
        points.append((t.number, ended, values))
    return points


def study_summary(study) -> dict[str, float]:
    """Trial counts, the epochs the trials trained, and the search time: the seconds during
    which at least one trial ran (parallel trials count once, the pauses between resumed runs
    not at all)."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials if t.datetime_complete)
    seconds, covered = 0.0, None  # covered: the end of the spans counted so far
    for start, end in spans:
        if covered is None or end > covered:
            seconds += (end - max(start, covered or start)).total_seconds()
            covered = end
    return {
        "n_complete": states.count("COMPLETE"),
        "n_pruned": states.count("PRUNED"),
        "n_failed": states.count("FAIL"),
        "epochs_trained": sum(t.user_attrs.get("epochs_trained", 0) for t in trials),
        "search_seconds": seconds,
    }


def running_count(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def spawn_workers(argv: list[str], workers: int) -> list:
    """Start workers 1..N-1 as child processes running this same command."""
    import subprocess

    # The interpreter and whatever ran this (`-m mnist_search.study`, or a script), as launched.
    launcher = sys.orig_argv[1 : len(sys.orig_argv) - len(sys.argv) + 1]
    base = [sys.executable, *launcher, *argv, "--no-champion"]
    return [subprocess.Popen([*base, "--worker-id", str(i)]) for i in range(1, workers)]


def finished_count(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


class _GiveBacksQuiet(logging.Filter):
    """Optuna logs every failed trial as a warning with its traceback; a trial given back over
    budget is no error, and `run_study` says so in one line instead."""

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


def run_study(args, study, storage, tracker, data, device) -> int:
    """Optimize until the study has `args.trials` finished trials, never more. Returns an exit
    code."""
    import optuna
    from tqdm import tqdm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = finished_count(study)
    # Reseed by progress: a resumed study must not replay the first run's random start-up trials.
    # Workers get their own streams, so they do not propose the same start-up trials.
    seed = args.seed + len(study.trials) + 1000 * args.worker_id
    study.sampler = optuna.samplers.TPESampler(seed=seed)
    start, failures_in_a_row = time.monotonic(), 0
    objective = make_objective(
        data,
        device,
        args.epochs,
        args.seed,
        tracker,
        args.cuda_graphs,
        budget=args.trials,
        space=args.space,
    )
    ours = []  # the trial each optimize call ran: other workers add theirs to study.trials
    bar = tqdm(
        total=args.trials,
        initial=done,
        desc=f"study {args.study_name}",
        unit="trial",
        disable=args.worker_id > 0,  # one progress bar: the first worker's
    )
    quiet = _GiveBacksQuiet()
    optuna_log = logging.getLogger("optuna.study._optimize")  # where Optuna logs failed trials
    optuna_log.addFilter(quiet)
    try:
        # A cheap first test: start a trial only while finished + running ones fall short.
        # Workers that pass it together may each start one; the objective then gives back
        # those beyond --trials, by trial number (a rerun tops up if a running one fails).
        while True:
            interrupts.check()
            fail_dead_trials(study, storage, tracker)  # a dead worker's trial frees its place
            if finished_count(study) + running_count(study) >= args.trials:
                break
            if args.timeout is not None and time.monotonic() - start > args.timeout:
                print(f"--timeout {args.timeout:g}s reached; rerun to finish", file=sys.stderr)
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
        optuna_log.removeFilter(quiet)
        bar.close()
    print(f"worker {args.worker_id} searched for {time.monotonic() - start:.1f} s")
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
    from mnist_search.report import study_figures

    for figure in study_figures(study, out_dir / "figures"):
        tracker.log_parent_file(figure, "figures")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.trials < 1 or args.epochs < 1 or args.workers < 1:
        parser.error("--trials, --epochs and --workers must be at least 1")
    if args.timeout is not None and args.timeout <= 0:
        parser.error("--timeout must be positive")
    check_champion_flags(parser, args)

    import optuna  # heavy imports only after the flags parse, so --help is instant
    import torch

    from mnist_search import data as mdata
    from mnist_search import fetch
    from mnist_search.tracking import StudyTracker, TrackingError
    from mnist_search.train import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    # Check both stores before creating either, so that a bad flag leaves nothing behind.
    journal = "://" not in args.storage
    try:
        if journal and not Path(args.storage).resolve().parent.is_dir():
            raise ValueError("the journal file's folder does not exist")
        storage = None if journal else open_storage(args.storage)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy and Optuna raise many kinds
        parser.error(f"cannot open --storage {args.storage!r}: {type(e).__name__}: {e}")
    try:
        tracker = StudyTracker(args.study_name, args.tracking_uri)
    except TrackingError as e:
        parser.error(str(e))
    data_dir = args.data_dir or fetch.default_data_dir()
    try:
        fetch.ensure_mnist(data_dir)
    except fetch.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    storage = storage or open_storage(args.storage)

    pruner = make_pruner(args.pruner, args.epochs)
    params = {
        "study_name": args.study_name,
        "seed": args.seed,
        "epochs": args.epochs,
        "space": args.space,
        "sampler": "TPESampler",
        "pruner": f"{args.pruner}: {type(pruner).__name__}",
        "objective": "max validation accuracy over epochs",
        "data_digest": fetch.data_digest(data_dir),
        "val_size": mdata.VAL_SIZE,
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "mlflow": __import__("mlflow").__version__,
    }
    try:
        study = open_study(args.study_name, storage, pruner, args.seed, tracker, params, args.space)
    except ValueError as e:
        parser.error(str(e))
    data = mdata.load_data(data_dir, device)
    if args.workers > 1:  # the matmuls of N trials share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.workers))
    with interrupts.deferred():  # Ctrl-C and `kill` stop at the next safe point, never mid-write
        if args.worker_id > 0:  # a child worker: trials only; the first worker reports and crowns
            try:
                return run_study(args, study, storage, tracker, data, device)
            except KeyboardInterrupt:
                return interrupts.exit_code()
        children = spawn_workers(sys.argv[1:] if argv is None else argv, args.workers)
        return search_and_crown(args, study, storage, tracker, data, data_dir, device, children)


def wait_for_workers(children: list) -> list[int]:
    """The worker processes' exit codes, once all have ended; a Ctrl-C meanwhile stops us."""
    while any(child.poll() is None for child in children):
        interrupts.check()
        time.sleep(0.2)
    return [child.returncode for child in children]


def stop_workers(children: list) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()  # SIGTERM: each ends its trial as interrupted
    for child in children:
        child.wait()


def search_and_crown(args, study, storage, tracker, data, data_dir, device, children) -> int:
    """The first worker's part: trials, then (with the others done) report and champion. The
    parent run ends FINISHED, KILLED (interrupted: the exit code says by what) or FAILED."""
    out_dir = Path("reports") / args.study_name
    reported = False
    try:
        try:
            code = run_study(args, study, storage, tracker, data, device)
            code = max([code, *wait_for_workers(children)])
        finally:
            stop_workers(children)
        report(study, tracker, out_dir)
        reported = True
        if code == 0 and finished_count(study) >= args.trials and not args.no_champion:
            from mnist_search.champion import crown

            crown(
                study, tracker, data_dir, device, args.register_as,
                cuda_graphs=args.cuda_graphs, ensemble=args.ensemble, seeds=args.seeds,
            )  # fmt: skip
        interrupts.check()  # a signal that came during the last steps still counts
    except KeyboardInterrupt:
        print("\ninterrupted: the running trial or champion ended as FAIL/KILLED; rerun to resume")
        if not reported:
            report(study, tracker, out_dir)
        tracker.finish_parent("KILLED")
        return interrupts.exit_code()
    except BaseException:
        tracker.finish_parent("FAILED")
        raise
    tracker.finish_parent("FINISHED" if code == 0 else "FAILED")
    return code


if __name__ == "__main__":
    sys.exit(main())
