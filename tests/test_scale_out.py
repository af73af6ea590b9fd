"""Many workers on one PostgreSQL study, tracked by an MLflow server: the real thing, on loopback.

Needs PostgreSQL's server binaries (Debian's `postgresql` package; `.ci/run` installs it when it
is missing) and psycopg 3 (the `postgres` extra). Starts a throw-away cluster and `mlflow server`
on free loopback ports, runs 3 workers on tiny synthetic data, SIGKILLs one mid-trial, and
checks that nothing else is lost. Everything it starts is stopped whatever happens.
"""

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from mnist_search import data as mdata
from tests.conftest import assert_parent_series, free_port, wait_for_http
from tests.test_faults import WRAPPER

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
PG_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)


def as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to its own user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres(tmp_path):
    """A throw-away cluster on 127.0.0.1 with databases `optuna` and `mlflow`; yields its URL."""
    if PG_BIN is None:
        pytest.skip("PostgreSQL server binaries not found: apt-get install postgresql")
    pytest.importorskip("psycopg", reason="pip install -e '.[postgres]'")
    root = Path(tempfile.mkdtemp(prefix="mnist-search-pg-"))  # outside pytest's 0700 folders
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
    data, port = root / "data", free_port()
    run = lambda cmd: subprocess.run(as_postgres(cmd), check=True, capture_output=True)  # noqa: E731
    run([f"{PG_BIN}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"])
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
    run(
        [f"{PG_BIN}/pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]
    )
    try:
        for db in ("optuna", "mlflow"):
            run([f"{PG_BIN}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db])
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            as_postgres([f"{PG_BIN}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"])
        )
        shutil.rmtree(root, ignore_errors=True)


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
        wait_for_http(f"{url}/health", server, 180, (tmp_path / "mlflow-server.log").read_text)
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


def test_three_workers_on_postgres_and_a_tracking_server(
    postgres, mlflow_server, tmp_path, synthetic_mnist
):
    storage_url = f"{postgres}/optuna"
    (tmp_path / "run_study.py").write_text(WRAPPER.format(digests=mdata.OFFICIAL_SHA256))
    cmd = [sys.executable, str(tmp_path / "run_study.py"), "--data-dir", str(synthetic_mnist)]
    # trials of a few seconds each, so that the kill lands with work still left to do
    cmd += ["--storage", storage_url, "--study-name", "scale", "--trials", "9", "--epochs", "100"]
    cmd += ["--pruner", "none", "--device", "cpu", "--no-champion"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    workers = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for _ in range(3)
    ]
    watcher = optuna.storages.RDBStorage(storage_url)  # one connection pool, reused
    try:
        victim = None
        deadline = time.monotonic() + 240
        while victim is None and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name="scale", storage=watcher).trials
            except KeyError:
                continue
            done = [t for t in trials if t.state.name == "COMPLETE"]
            busy = [t for t in trials if t.state.name == "RUNNING" and t.intermediate_values]
            pids = {w.pid for w in workers}
            finished = len(done)
            if done and busy and busy[0].user_attrs.get("pid") in pids and finished <= 4:
                victim = busy[0]
        assert victim is not None, "no worker was mid-trial in time"
        os.kill(victim.user_attrs["pid"], signal.SIGKILL)
        for w in workers:
            _, err = w.communicate(timeout=300)
            if w.pid != victim.user_attrs["pid"]:
                assert w.returncode == 0, err
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()

    study = optuna.load_study(study_name="scale", storage=watcher)
    states = [t.state.name for t in study.trials]
    where = {t.number: (t.state.name, t.user_attrs.get("pid")) for t in study.trials}
    assert states.count("COMPLETE") == 9, (victim.number, victim.user_attrs, where)
    assert "RUNNING" not in states
    assert study.trials[victim.number].state.name == "FAIL"
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
