"""Many workers on one PostgreSQL study, tracked by an MLflow server: the real thing, on loopback.

Needs PostgreSQL's server binaries (Debian's `postgresql` package; `.ci/run` installs it when it
is missing) and psycopg 3 (the `postgres` extra). Starts a throw-away cluster and `mlflow server`
on free loopback ports, runs 3 workers on tiny synthetic data, SIGKILLs one mid-trial, and
checks that nothing else is lost. Everything it starts is stopped whatever happens.
"""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient

from tests.helpers import (
    assert_parent_series,
    every_worker_gets_a_trial,
    free_port,
    wait_for_http,
    wrapper,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """`mlflow server` backed by the cluster, serving artifacts itself; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"{postgres}/mlflow", "--workers", "1"]
    cmd += ["--artifacts-destination", str(tmp_path / "artifacts")]
    log = open(tmp_path / "mlflow-server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        # the first start migrates the database
        wait_for_http(f"{url}/health", server, 600, (tmp_path / "mlflow-server.log").read_text)
        yield url
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn workers
            server.wait(timeout=20)
        except ProcessLookupError:  # it had already exited
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


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
    flags += ["--trials", "9", "--epochs", "20", "--pruner", "none", "--device", "cpu"]
    flags += ["--no-champion"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
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
        for w in workers[1:]:
            _, err = w.communicate(timeout=600)
            assert w.returncode == 0, err
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
    assert all(t.user_attrs.get("over_budget") for t in others)  # given back, not failed
    assert len({t.user_attrs["pid"] for t in study.trials}) == 3

    client = MlflowClient(mlflow_server)
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
