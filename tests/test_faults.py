"""Nothing lost: kill -9, Ctrl-C, concurrent workers, a full disk, corrupted data, bad input.

Faults about processes run real processes (a wrapper that points the verification at the
synthetic data's digests, then calls the real `main`). Bad input, flag by flag, is
test_cli.py's and test_study.py's.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient

from mnist_search import fetch
from mnist_search import study as mstudy
from mnist_search.search import SearchConfig, search
from mnist_search.storage import open_storage
from mnist_search.tracking import load_weights
from tests.helpers import assert_parent_series, every_worker_gets_a_trial, wrapper

STARTED = []  # every process a test here started; none outlives its test


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    yield
    for proc in STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    STARTED.clear()


def start(tmp, data_dir, *flags, champion=False, hooks=""):
    (tmp / "run_study.py").write_text(wrapper(hooks))
    cmd = [sys.executable, str(tmp / "run_study.py"), "--data-dir", str(data_dir)]
    cmd += ["--storage", str(tmp / "s.journal"), "--device", "cpu", "--space", "mlp", *flags]
    cmd += [] if champion else ["--no-champion"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
    pipe = subprocess.PIPE
    STARTED.append(subprocess.Popen(cmd, cwd=tmp, env=env, stdout=pipe, stderr=pipe, text=True))
    return STARTED[-1]


def run_in_process(tmp, data_dir, **settings) -> int:
    """The same search in this process (quicker to start), on the same stores as `start`."""
    storage = str(tmp / "s.journal")
    config = SearchConfig(
        data_dir=data_dir, storage=storage, device="cpu", champion=None, space="mlp", **settings
    )
    return search(config).exit_code


def load(tmp):
    return optuna.load_study(study_name="mnist-mlp", storage=open_storage(str(tmp / "s.journal")))


def wait_for(tmp, condition, proc, limit=600):
    """Poll the study until `condition(trials)` holds; `limit` only bounds a hang."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if (tmp / "s.journal").exists():
            try:
                if found := condition(load(tmp).trials):
                    return found
            except KeyError:  # the study is not created yet
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    pytest.fail("condition not reached")


# Trials that cannot end by themselves: whenever the test signals, one is mid-trial.
ENDLESS = ["--trials", "3", "--epochs", "1000000", "--pruner", "none"]


def mid_trial(trials):
    """The trial running with an epoch done, if there is one."""
    return next((t for t in trials if t.state.name == "RUNNING" and t.intermediate_values), None)


def assert_one_to_one(tmp, study):
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("mnist-mlp")
    runs = client.search_runs([exp.experiment_id], "tags.`mnist_search.role` = 'trial'")
    assert sorted(r.info.run_id for r in runs) == sorted(
        t.user_attrs["mlflow_run_id"] for t in study.trials
    )
    by_id = {r.info.run_id: r for r in runs}
    expected = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": ("FAILED", "KILLED")}
    for t in study.trials:
        run = by_id[t.user_attrs["mlflow_run_id"]]
        assert run.info.status in expected[t.state.name], (t.number, t.state, run.info.status)
    return by_id


@pytest.mark.slow
def test_kill_9_mid_trial_then_rerun_loses_nothing(in_tmp, synthetic_mnist):
    tmp_path = in_tmp
    assert run_in_process(tmp_path, synthetic_mnist, trials=1, epochs=2) == 0
    before = {t.number: t for t in load(tmp_path).trials}
    proc = start(tmp_path, synthetic_mnist, *ENDLESS)
    killed = wait_for(tmp_path, mid_trial, proc).number
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    assert run_in_process(tmp_path, synthetic_mnist, trials=3, epochs=2) == 0
    study = load(tmp_path)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3
    assert study.trials[killed].state.name == "FAIL"
    assert study.trials[killed].user_attrs["fail_reason"] == "process died"
    by_id = assert_one_to_one(tmp_path, study)
    killed_run = by_id[study.trials[killed].user_attrs["mlflow_run_id"]]
    assert killed_run.info.status == "FAILED"  # it died: not KILLED, which says "stopped"
    assert killed_run.data.tags["optuna_state"] == "FAIL"
    assert killed_run.data.tags["fail_reason"] == "process died mid-trial"
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    for number, trial in before.items():  # everything finished before the kill is intact
        assert study.trials[number].value == trial.value
        run_id = trial.user_attrs["mlflow_run_id"]
        assert by_id[run_id].info.status == "FINISHED"
        state_dict, meta = load_weights(run_id, f"sqlite:///{tmp_path}/mlflow.db")
        assert meta["epochs_trained"] == 2 and state_dict


@pytest.mark.slow
def test_sigint_ends_the_trial_as_interrupted_and_a_rerun_resumes(in_tmp, synthetic_mnist):
    tmp_path = in_tmp
    assert run_in_process(tmp_path, synthetic_mnist, trials=1, epochs=2) == 0
    proc = start(tmp_path, synthetic_mnist, *ENDLESS)
    running = wait_for(tmp_path, mid_trial, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "val_accuracy" in out  # the leaderboard so far
    study = load(tmp_path)
    (interrupted,) = [t for t in study.trials if t.state.name == "FAIL"]
    assert interrupted.number == running.number
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(interrupted.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna_state"] == "INTERRUPTED"
    exp = client.get_experiment_by_name("mnist-mlp")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`mnist_search.role` = 'study'")
    assert parent.info.status == "KILLED"

    assert run_in_process(tmp_path, synthetic_mnist, trials=3, epochs=2) == 0
    study = load(tmp_path)
    assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == 3
    assert_one_to_one(tmp_path, study)


# A hook: the champion's first upload (its figures) waits for a signal, then goes on. The test
# signals once the marker exists, so the signal lands while the champion is in an MLflow call.
HOLD_IN_THE_CHAMPIONS_UPLOAD = """
import pathlib
from mlflow import MlflowClient
from mnist_search import interrupts
_log_artifacts = MlflowClient.log_artifacts
def log_artifacts(self, run_id, local_dir, artifact_path=None):
    if artifact_path == "figures":
        pathlib.Path("in-the-champions-upload").touch()
        deadline = time.monotonic() + 600
        while interrupts.received() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    return _log_artifacts(self, run_id, local_dir, artifact_path)
MlflowClient.log_artifacts = log_artifacts
"""


@pytest.mark.slow
def test_sigint_during_the_champion_leaves_no_run_running_and_exits_130(tmp_path, synthetic_mnist):
    flags = ["--trials", "2", "--epochs", "2"]
    proc = start(
        tmp_path, synthetic_mnist, *flags, champion=True, hooks=HOLD_IN_THE_CHAMPIONS_UPLOAD
    )
    deadline = time.monotonic() + 600  # bounds a hang only
    while not (tmp_path / "in-the-champions-upload").exists():
        assert proc.poll() is None, proc.communicate()
        if time.monotonic() > deadline:
            pytest.fail("the champion never began its first upload")
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "interrupted" in err

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("mnist-mlp")
    runs = client.search_runs([exp.experiment_id])
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    role = {r.info.run_id: r.data.tags["mnist_search.role"] for r in runs}
    (champion_run,) = [r for r in runs if role[r.info.run_id] == "champion"]
    assert champion_run.info.status == "KILLED"
    (parent,) = [r for r in runs if role[r.info.run_id] == "study"]
    assert parent.info.status == "KILLED"
    # the upload under way when the signal came was not cut short; the next step never began
    uploaded = {a.path for a in client.list_artifacts(champion_run.info.run_id, "figures")}
    assert len(uploaded) == 3
    assert not client.list_artifacts(champion_run.info.run_id, "export")
    assert not (tmp_path / "exports").exists()
    assert not client.search_registered_models()


@pytest.mark.slow
def test_workers_share_one_study_without_losing_or_doubling_trials(tmp_path, synthetic_mnist):
    flags = ["--trials", "9", "--epochs", "20", "--pruner", "none", "--workers", "3"]
    proc = start(tmp_path, synthetic_mnist, *flags, hooks=every_worker_gets_a_trial(3))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "database is locked" not in err
    study = load(tmp_path)
    assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == 9
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    # the only FAIL allowed: a trial that a worker started beyond --trials and gave back
    assert all(t.user_attrs.get("over_budget") for t in study.trials if t.state.name == "FAIL")
    assert len({t.user_attrs["pid"] for t in study.trials}) == 3  # all three did trials
    assert_one_to_one(tmp_path, study)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")  # each worker logged its share
    assert_parent_series(client, study, study.user_attrs["mlflow_parent_run_id"])


def test_full_disk_while_logging_weights_fails_that_trial_only(
    in_tmp, synthetic_mnist, monkeypatch
):
    config = SearchConfig(
        data_dir=synthetic_mnist, storage=str(in_tmp / "s.journal"), champion=None, epochs=2,
        device="cpu", pruner="none", trials=2, space="mlp",
    )  # fmt: skip
    assert search(config).exit_code == 0

    real = MlflowClient.log_artifacts
    calls = []

    def full_once(self, run_id, local_dir, artifact_path=None):
        calls.append(run_id)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(self, run_id, local_dir, artifact_path)

    monkeypatch.setattr(MlflowClient, "log_artifacts", full_once)
    assert search(dataclasses.replace(config, trials=3)).exit_code == 0
    storage = open_storage(str(in_tmp / "s.journal"))
    study = optuna.load_study(study_name="mnist-mlp", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    failed = study.trials[2]
    assert "No space left" in failed.user_attrs["fail_reason"]
    client = MlflowClient()
    assert client.get_run(failed.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    for t in study.trials[:2]:  # finished trials keep their weights
        assert load_weights(t.user_attrs["mlflow_run_id"])[0]


def test_corrupted_data_is_refused_before_any_training(in_tmp, synthetic_mnist, capsys):
    path = fetch.raw_dir(synthetic_mnist) / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    argv = ["--data-dir", str(synthetic_mnist), "--storage", str(in_tmp / "s.journal")]
    assert mstudy.main(argv + ["--no-champion", "--trials", "1"]) == 1
    assert "t10k-images-idx3-ubyte does not match" in capsys.readouterr().err
    assert not (in_tmp / "s.journal").exists()  # no study, no trial


def test_trial_weights_are_never_unpickled(in_tmp):
    """A weights artifact that smuggles code is refused: load_weights uses weights_only."""
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > pwned.txt",))

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("evil")).info.run_id
    folder = in_tmp / "model"
    folder.mkdir()
    torch.save({"w": Evil()}, folder / "weights.pt")
    (folder / "config.json").write_text(json.dumps({"config": {}}))
    client.log_artifacts(run_id, str(folder), "model")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_weights(run_id)
    assert not (in_tmp / "pwned.txt").exists()
