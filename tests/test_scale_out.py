"""Many workers on one PostgreSQL study, tracked by an MLflow server: the real thing, on loopback.

Needs PostgreSQL's server binaries (Debian's `postgresql` package; `.ci/run` installs it when it
is missing) and psycopg 3 (the `postgres` extra). Starts a throw-away cluster and `mlflow server`
on free loopback ports, runs 3 workers on tiny synthetic data, SIGKILLs one mid-trial, and
checks that nothing else is lost. Everything it starts is stopped whatever happens.
"""

import functools
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import optuna
import pytest
from mlflow import MlflowClient

from mnist_search import storage as mstorage
from tests.helpers import (
    TrackingServer,
    assert_parent_series,
    every_worker_gets_a_trial,
    wrapper,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    server = TrackingServer(postgres, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# Hooks that make the kill land mid-trial, with work left to do, however loaded the machine:
# the victim's first trial holds after its first epoch until the test kills it, and the other
# workers start their second trials only once the test has killed it.
VICTIM = """
from mnist_search import train as _train
_fit = _train.fit
def fit(config, data, device="cpu", on_epoch_end=None, cuda_graphs=True):
    def then_hold(epoch, metrics, model):
        on_epoch_end(epoch, metrics, model)
        time.sleep(600)  # mid-trial, with an epoch reported, until the test kills this process
    return _fit(config, data, device, then_hold, cuda_graphs)
_train.fit = fit
"""
SURVIVOR = """
import pathlib
from mnist_search import train as _train
_fit = _train.fit
fits = []
def fit(*args, **kwargs):
    fits.append(1)
    deadline = time.monotonic() + 600
    while len(fits) > 1 and not pathlib.Path("victim-killed").exists():
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return _fit(*args, **kwargs)
_train.fit = fit
"""


def test_three_workers_on_postgres_and_a_tracking_server(
    postgres, mlflow_server, tmp_path, synthetic_mnist
):
    storage_url = f"{postgres}/optuna"
    flags = ["--data-dir", str(synthetic_mnist), "--storage", storage_url, "--study-name", "scale"]
    flags += ["--trials", "9", "--epochs", "3", "--pruner", "none", "--device", "cpu"]
    flags += ["--no-champion"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.url}
    workers = []
    for role in (VICTIM, SURVIVOR, SURVIVOR):
        script = tmp_path / f"worker{len(workers)}.py"
        script.write_text(wrapper(every_worker_gets_a_trial(3) + role))
        workers.append(
            subprocess.Popen(
                [sys.executable, str(script), *flags],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        )
    watcher = optuna.storages.RDBStorage(storage_url)  # one connection pool, reused
    try:
        victim = None
        deadline = time.monotonic() + 600  # bounds a hang only
        while victim is None:
            assert workers[0].poll() is None, workers[0].communicate()
            assert time.monotonic() < deadline, "the victim never began a trial"
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name="scale", storage=watcher).trials
            except KeyError:
                continue
            busy = [t for t in trials if t.state.name == "RUNNING" and t.intermediate_values]
            victim = next((t for t in busy if t.user_attrs.get("pid") == workers[0].pid), None)
        workers[0].kill()
        workers[0].communicate()
        (tmp_path / "victim-killed").touch()
        logs = []  # the survivors' stderr, to say why a trial failed
        for w in workers[1:]:
            _, err = w.communicate(timeout=600)
            assert w.returncode == 0, err
            logs.append(err[-3000:])
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.communicate()

    study = optuna.load_study(study_name="scale", storage=watcher)
    states = [t.state.name for t in study.trials]
    where = {t.number: (t.state.name, t.user_attrs.get("pid")) for t in study.trials}
    assert states.count("COMPLETE") == 9, (victim.number, victim.user_attrs, where)
    assert "RUNNING" not in states
    assert study.trials[victim.number].state.name == "FAIL"
    assert study.trials[victim.number].user_attrs["fail_reason"] == "process died"
    others = [t for t in study.trials if t.state.name == "FAIL" and t.number != victim.number]
    given_back = all(t.user_attrs.get("over_budget") for t in others)  # given back, not failed
    reasons = [(t.number, t.user_attrs.get("fail_reason")) for t in others]
    assert given_back, f"victim {victim.number}, failed {reasons}, stderr:\n" + "\n".join(logs)
    assert len({t.user_attrs["pid"] for t in study.trials}) == 3

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("scale")
    parents = client.search_runs([exp.experiment_id], "tags.`mnist_search.role` = 'study'")
    assert len(parents) == 1
    assert study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    runs = client.search_runs([exp.experiment_id], "tags.`mnist_search.role` = 'trial'")
    assert sorted(r.info.run_id for r in runs) == sorted(
        t.user_attrs["mlflow_run_id"] for t in study.trials
    )
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in runs)
    assert_parent_series(client, study, parents[0].info.run_id)  # logged by three workers
    status = {r.info.run_id: r.info.status for r in runs}
    assert status[victim.user_attrs["mlflow_run_id"]] == "FAILED"
    for t in study.trials:
        if t.state.name == "COMPLETE":
            assert status[t.user_attrs["mlflow_run_id"]] == "FINISHED"
            files = client.list_artifacts(t.user_attrs["mlflow_run_id"], "model")
            assert {f.path for f in files} == {"model/weights.pt", "model/config.json"}
    for t in others:
        assert status[t.user_attrs["mlflow_run_id"]] == "KILLED"


# --- store outages and a frozen worker, each forced at a chosen point ---------------------------


def wait_for_file(path, procs, limit=600):
    """Until `path` exists; fail if a process in `procs` exits first (`limit` bounds a hang)."""
    deadline = time.monotonic() + limit
    while not path.exists():
        for proc in procs:
            assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.2)


def start_worker(tmp_path, synthetic_mnist, storage, hooks, *flags, tracking=None):
    (tmp_path / "worker.py").write_text(wrapper(hooks))
    cmd = [sys.executable, str(tmp_path / "worker.py"), "--data-dir", str(synthetic_mnist)]
    cmd += ["--storage", storage, "--device", "cpu", "--no-champion", "--pruner", "none", *flags]
    uri = tracking or f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    pipe = subprocess.PIPE
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=pipe, stderr=pipe, text=True)


def assert_whole(study, client, trials: int, failed: int = 0) -> None:
    """`trials` finished, `failed` FAIL, none RUNNING; one finished MLflow run per trial."""
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == trials, states
    assert states.count("FAIL") == failed and "RUNNING" not in states, states
    exp = client.get_experiment_by_name(study.study_name)
    runs = client.search_runs([exp.experiment_id], "tags.`mnist_search.role` = 'trial'")
    assert sorted(r.info.run_id for r in runs) == sorted(
        t.user_attrs["mlflow_run_id"] for t in study.trials
    )
    assert not [r for r in runs if r.info.status == "RUNNING"]
    parents = client.search_runs([exp.experiment_id], "tags.`mnist_search.role` = 'study'")
    assert [p.info.status for p in parents] == ["FINISHED"]


# The worker's first epoch report waits, once, until the test has taken the database down: the
# write then meets a stopped server, and goes through once it is back.
REPORT_MEETS_A_STOPPED_DATABASE = """
import pathlib
from mnist_search import rdb
_report = rdb.RetryingRDBStorage.set_trial_intermediate_value
def set_trial_intermediate_value(self, *args):
    if not pathlib.Path("report-waiting").exists():
        pathlib.Path("report-waiting").touch()
        deadline = time.monotonic() + 600
        while not pathlib.Path("db-down").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return _report(self, *args)
rdb.RetryingRDBStorage.set_trial_intermediate_value = set_trial_intermediate_value
"""


def test_a_database_restart_during_an_epoch_report_costs_no_trial(
    postgres, tmp_path, synthetic_mnist
):
    storage = f"{postgres}/optuna"
    flags = ["--study-name", "outage", "--trials", "3", "--epochs", "3", "--space", "mlp"]
    hook = REPORT_MEETS_A_STOPPED_DATABASE
    worker = start_worker(tmp_path, synthetic_mnist, storage, hook, *flags)
    wait_for_file(tmp_path / "report-waiting", [worker])
    postgres.stop()
    (tmp_path / "db-down").touch()
    time.sleep(5)  # the report is being retried against a stopped server
    postgres.start()
    _, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err
    assert "the Optuna storage (database) is unreachable" in err and "Traceback" not in err
    study = optuna.load_study(study_name="outage", storage=storage)
    assert_whole(study, MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), trials=3)
    first = study.trials[0]
    assert sorted(first.intermediate_values) == [1, 2, 3]  # the report landed, once

    # away for longer than --store-retry-seconds: the trial fails with one line naming the
    # store, the worker exits 75, and a rerun completes the study
    for marker in ("report-waiting", "db-down"):
        (tmp_path / marker).unlink()
    flags[flags.index("--trials") + 1] = "4"
    away = start_worker(
        tmp_path, synthetic_mnist, storage, hook, *flags, "--store-retry-seconds", "3"
    )
    wait_for_file(tmp_path / "report-waiting", [away])
    postgres.stop()
    (tmp_path / "db-down").touch()
    _, err = away.communicate(timeout=600)
    postgres.start()
    assert away.returncode == 75, err
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith("error: the Optuna storage (database) did not answer for 3 s (")
    assert "--store-retry-seconds" in line and "Traceback" not in err
    stranded = optuna.load_study(study_name="outage", storage=storage).trials[3]
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(
        stranded.user_attrs["mlflow_run_id"]
    )
    assert run.info.status == "FAILED" and "did not answer" in run.data.tags["fail_reason"]
    rerun = start_worker(tmp_path, synthetic_mnist, storage, "", *flags)
    _, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    study = optuna.load_study(study_name="outage", storage=storage)
    assert_whole(study, MlflowClient(f"sqlite:///{tmp_path}/mlflow.db"), trials=4, failed=1)
    assert study.trials[3].user_attrs["fail_reason"] == "process died"  # found by the rerun


# The worker's first metrics of epoch 1 wait, once, until the tracking server is down.
LOG_MEETS_A_STOPPED_SERVER = """
import pathlib
from mnist_search import tracking
_log_metrics = tracking.Run.log_metrics
def log_metrics(self, metrics, step=0):
    if step == 1 and not pathlib.Path("log-waiting").exists():
        pathlib.Path("log-waiting").touch()
        deadline = time.monotonic() + 600
        while not pathlib.Path("tracking-down").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return _log_metrics(self, metrics, step)
tracking.Run.log_metrics = log_metrics
"""


def test_a_tracking_server_restart_during_a_trial_costs_no_trial(
    postgres, mlflow_server, tmp_path, synthetic_mnist
):
    storage = f"{postgres}/optuna"
    flags = ["--study-name", "blink", "--trials", "2", "--epochs", "3", "--space", "mlp"]
    worker = start_worker(
        tmp_path, synthetic_mnist, storage, LOG_MEETS_A_STOPPED_SERVER, *flags,
        tracking=mlflow_server.url,
    )  # fmt: skip
    wait_for_file(tmp_path / "log-waiting", [worker])
    mlflow_server.stop()
    (tmp_path / "tracking-down").touch()
    time.sleep(5)  # the epoch's metrics are being retried against a stopped server
    mlflow_server.start()
    out, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err
    assert "the MLflow tracking store is unreachable" in err and "Traceback" not in err
    assert "View run" not in out + err  # one line per event, none per run
    study = optuna.load_study(study_name="blink", storage=storage)
    client = MlflowClient(mlflow_server.url)
    assert_whole(study, client, trials=2)
    run_id = study.trials[0].user_attrs["mlflow_run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1, 2, 3]


# Heartbeats every second, a trial without one for 3 s is stale; the worker's first epoch hook
# waits (where the test freezes it) until the test says it may go on.
FREEZES_MID_TRIAL = """
import pathlib
from mnist_search import storage, train
storage.HEARTBEAT = (1, 3)
_fit = train.fit
def fit(config, data, device="cpu", on_epoch_end=None, cuda_graphs=True):
    def hold_once(epoch, metrics, model):
        if not pathlib.Path("frozen-here").exists():
            pathlib.Path("frozen-here").touch()
            deadline = time.monotonic() + 600
            while not pathlib.Path("go-on").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return on_epoch_end(epoch, metrics, model)
    return _fit(config, data, device, hold_once, cuda_graphs)
train.fit = fit
"""


def test_a_worker_frozen_past_the_grace_period_says_so_and_goes_on(
    postgres, tmp_path, synthetic_mnist, monkeypatch
):
    """SIGSTOP mid-trial; the test then does what every other worker does before each trial
    (`optuna.storages.fail_stale_trials`) once the heartbeat is stale; SIGCONT. The frozen
    worker must not write into the trial that was failed, nor crash: one line, then the rest of
    the budget."""
    storage = f"{postgres}/optuna"
    flags = ["--study-name", "frozen", "--trials", "3", "--epochs", "2", "--space", "mlp"]
    worker = start_worker(tmp_path, synthetic_mnist, storage, FREEZES_MID_TRIAL, *flags)
    wait_for_file(tmp_path / "frozen-here", [worker])
    worker.send_signal(signal.SIGSTOP)
    monkeypatch.setattr(mstorage, "HEARTBEAT", (1, 3))  # the grace period the worker has
    other = mstorage.open_storage(storage)
    study = optuna.load_study(study_name="frozen", storage=other)
    deadline = time.monotonic() + 600  # bounds a hang only
    while study.trials[0].state.name == "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(1)
        with warnings.catch_warnings():  # experimental since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # as another worker's next trial would
    (tmp_path / "go-on").touch()
    worker.send_signal(signal.SIGCONT)
    _, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err
    assert "Traceback" not in err
    assert err.count("another worker failed it while this process was paused") == 1
    study = optuna.load_study(study_name="frozen", storage=storage)
    frozen = study.trials[0]
    assert frozen.state.name == "FAIL" and not frozen.intermediate_values  # nothing written
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert_whole(study, client, trials=3, failed=1)
    run = client.get_run(frozen.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "no heartbeat" in run.data.tags["fail_reason"]
    assert not client.get_metric_history(run.info.run_id, "val_accuracy")  # not written into


def all_at_once(calls) -> list[Exception]:
    """Run each call in its own thread, all released at one instant; the errors they raised."""
    ready, errors = threading.Barrier(len(calls)), []

    def run(call) -> None:
        ready.wait()
        try:
            call()
        except Exception as e:  # noqa: BLE001 - collected, and the test says which
            errors.append(e)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_workers_opening_a_new_database_together_all_get_the_study(postgres):
    """Workers started together on an empty database each create Optuna's schema; the ones that
    collide with another's CREATE try again instead of crashing (16 workers did, once)."""
    url = f"{postgres}/optuna"

    def open_one() -> None:
        optuna.create_study(study_name="together", storage=mstorage.open_storage(url),
                            load_if_exists=True)  # fmt: skip

    errors = all_at_once([open_one] * 8)
    assert not errors, errors
    assert len(optuna.get_all_study_names(url)) == 1


def test_trial_runs_logging_the_same_datasets_at_one_instant_all_get_them(
    postgres, mlflow_server, tmp_path
):
    """Every worker's first trial logs the study's datasets at about the same moment (three
    workers failed a trial so, once): the store checks for an existing dataset and inserts it in
    two steps, so inserts collide; the loser tries again and finds the winner's copy."""
    from mnist_search.tracking import StudyTracker, mnist_datasets

    datasets = mnist_datasets(tmp_path, "d" * 16, {"train-split": 50, "validation-split": 10})
    tracker = StudyTracker("together", mlflow_server.url)
    tracker.create_parent({})
    runs = [tracker.start_trial(i, {}) for i in range(8)]
    errors = all_at_once([functools.partial(run.log_datasets, datasets) for run in runs])
    assert not errors, errors
    client = MlflowClient(mlflow_server.url)
    for run in runs:
        inputs = client.get_run(run.run_id).inputs.dataset_inputs
        assert sorted(i.dataset.name for i in inputs) == sorted(f"mnist-{p}" for p in datasets)
