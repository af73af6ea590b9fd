"""Nothing lost: kill -9, Ctrl-C, concurrent workers, a full disk, corrupted data, bad input.

Faults about processes run real processes (a wrapper that points the verification at the
synthetic data's digests, then calls the real `main`). Bad input tried, per CLI:
  study:    --trials 0, --epochs -1, --device tpu, unreachable/invalid --storage, unreachable
            --tracking-uri, --timeout 0, --workers 0 (test_study.py has most of these)
  train:    --epochs 0, --batch-size 0, --dropout 1.5, --device tpu
  predict:  an image path that does not exist, an unknown model URI (test_champion.py)
  champion: a study that does not exist
  bench:    --samples 10
"""

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient

from mnist_search import champion, train
from mnist_search import data as mdata
from mnist_search import study as mstudy
from mnist_search.tracking import load_weights
from tests.conftest import assert_parent_series

WRAPPER = """
import sys
from mnist_search import data
data.OFFICIAL_SHA256 = {digests!r}
data.VAL_SIZE = 100
from mnist_search.study import main
sys.exit(main(sys.argv[1:]))
"""


def start(tmp, data_dir, *flags):
    (tmp / "run_study.py").write_text(WRAPPER.format(digests=mdata.OFFICIAL_SHA256))
    cmd = [sys.executable, str(tmp / "run_study.py"), "--data-dir", str(data_dir)]
    cmd += ["--storage", str(tmp / "s.journal"), "--device", "cpu", "--no-champion", *flags]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
    pipe = subprocess.PIPE
    return subprocess.Popen(cmd, cwd=tmp, env=env, stdout=pipe, stderr=pipe, text=True)


def load(tmp):
    return optuna.load_study(
        study_name="mnist-mlp", storage=mstudy.open_storage(str(tmp / "s.journal"))
    )


def wait_for(tmp, condition, proc, limit=120):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if (tmp / "s.journal").exists():
            try:
                if condition(load(tmp).trials):
                    return
            except KeyError:  # the study is not created yet
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.kill()
    pytest.fail("condition not reached")


def mid_trial(trials):
    """At least one trial finished, and another is running with an epoch done."""
    states = [t.state.name for t in trials]
    running = [t for t in trials if t.state.name == "RUNNING" and t.intermediate_values]
    return "COMPLETE" in states and running


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
def test_kill_9_mid_trial_then_rerun_loses_nothing(tmp_path, synthetic_mnist):
    flags = ["--trials", "3", "--epochs", "150", "--pruner", "none"]
    proc = start(tmp_path, synthetic_mnist, *flags)
    wait_for(tmp_path, mid_trial, proc)
    before = {t.number: t for t in load(tmp_path).trials if t.state.name == "COMPLETE"}
    killed = next(t.number for t in load(tmp_path).trials if t.state.name == "RUNNING")
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    rerun = start(tmp_path, synthetic_mnist, *flags)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    study = load(tmp_path)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3
    assert study.trials[killed].state.name == "FAIL"
    assert study.trials[killed].user_attrs["fail_reason"] == "process died"
    by_id = assert_one_to_one(tmp_path, study)
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    for number, trial in before.items():  # everything finished before the kill is intact
        assert study.trials[number].value == trial.value
        run_id = trial.user_attrs["mlflow_run_id"]
        assert by_id[run_id].info.status == "FINISHED"
        state_dict, meta = load_weights(run_id, f"sqlite:///{tmp_path}/mlflow.db")
        assert meta["epochs_trained"] == 150 and state_dict


@pytest.mark.slow
def test_sigint_ends_the_trial_as_interrupted_and_a_rerun_resumes(tmp_path, synthetic_mnist):
    flags = ["--trials", "3", "--epochs", "150", "--pruner", "none"]
    proc = start(tmp_path, synthetic_mnist, *flags)
    wait_for(tmp_path, mid_trial, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in out and "val_accuracy" in out  # the leaderboard so far
    study = load(tmp_path)
    (interrupted,) = [t for t in study.trials if t.state.name == "FAIL"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(interrupted.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna_state"] == "INTERRUPTED"
    exp = client.get_experiment_by_name("mnist-mlp")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`mnist_search.role` = 'study'")
    assert parent.info.status == "KILLED"

    rerun = start(tmp_path, synthetic_mnist, "--trials", "3", "--epochs", "2")
    assert rerun.wait(timeout=300) == 0
    study = load(tmp_path)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 3
    assert_one_to_one(tmp_path, study)


@pytest.mark.slow
def test_workers_share_one_study_without_losing_or_doubling_trials(tmp_path, synthetic_mnist):
    # trials long enough (a second or two) that the children are up before the first is done
    flags = ["--trials", "9", "--epochs", "80", "--pruner", "none", "--workers", "3"]
    proc = start(tmp_path, synthetic_mnist, *flags)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "database is locked" not in err
    study = load(tmp_path)
    assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == 9
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "FAIL")]
    assert len({t.user_attrs["pid"] for t in study.trials}) == 3  # all three did trials
    assert_one_to_one(tmp_path, study)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")  # each worker logged its share
    assert_parent_series(client, study, study.user_attrs["mlflow_parent_run_id"])


def test_full_disk_while_logging_weights_fails_that_trial_only(
    in_tmp, synthetic_mnist, monkeypatch
):
    argv = ["--data-dir", str(synthetic_mnist), "--storage", str(in_tmp / "s.journal")]
    argv += ["--no-champion", "--epochs", "2", "--device", "cpu", "--pruner", "none"]
    assert mstudy.main(argv + ["--trials", "2"]) == 0

    real = MlflowClient.log_artifacts
    calls = []

    def full_once(self, run_id, local_dir, artifact_path=None):
        calls.append(run_id)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(self, run_id, local_dir, artifact_path)

    monkeypatch.setattr(MlflowClient, "log_artifacts", full_once)
    assert mstudy.main(argv + ["--trials", "3"]) == 0
    storage = mstudy.open_storage(str(in_tmp / "s.journal"))
    study = optuna.load_study(study_name="mnist-mlp", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    failed = study.trials[2]
    assert "No space left" in failed.user_attrs["fail_reason"]
    client = MlflowClient()
    assert client.get_run(failed.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    for t in study.trials[:2]:  # finished trials keep their weights
        assert load_weights(t.user_attrs["mlflow_run_id"])[0]


def test_corrupted_data_is_refused_before_any_training(in_tmp, synthetic_mnist, capsys):
    path = mdata.raw_dir(synthetic_mnist) / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    argv = ["--data-dir", str(synthetic_mnist), "--storage", str(in_tmp / "s.journal")]
    assert mstudy.main(argv + ["--no-champion", "--trials", "1"]) == 1
    assert "t10k-images-idx3-ubyte does not match" in capsys.readouterr().err
    assert not (in_tmp / "s.journal").exists()  # no study, no trial


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--dropout", "1.5"], "0 <= --dropout < 1"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_train_cli_rejects_nonsense(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_champion_cli_rejects_an_unknown_study(in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_:
        champion.main(["--study-name", "nope", "--storage", str(in_tmp / "s.journal")])
    assert exit_.value.code == 2 and "nope" in capsys.readouterr().err


def test_champion_and_report_need_the_studys_mlflow_run(in_tmp, capsys):
    from mnist_search import report

    journal = str(in_tmp / "s.journal")
    study = optuna.create_study(study_name="bare", storage=mstudy.open_storage(journal))
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=0.5))
    argv = [
        "--study-name",
        "bare",
        "--storage",
        journal,
        "--tracking-uri",
        f"sqlite:///{in_tmp}/m.db",
    ]
    for main in (champion.main, report.main):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "no MLflow parent run for study 'bare'" in capsys.readouterr().err


def test_workers_flag_and_bench_reject_nonsense(capsys):
    from mnist_search import bench

    with pytest.raises(SystemExit) as exit_:
        mstudy.main(["--workers", "0"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--samples", "10"])
    assert exit_.value.code == 2 and "--samples" in capsys.readouterr().err


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


def test_an_interrupt_during_store_io_is_held_until_it_is_safe():
    from types import SimpleNamespace

    def stack(*files):  # innermost first
        frame = None
        for name in reversed(files):
            frame = SimpleNamespace(f_code=SimpleNamespace(co_filename=name), f_back=frame)
        return frame

    ours = f"{os.sep}site{os.sep}mnist_search{os.sep}"
    interrupts = mstudy.Interrupts()
    in_io = stack("/x/sqlalchemy/engine/base.py", "/x/mlflow/store/x.py", ours + "tracking.py")
    interrupts._handle(signal.SIGINT, in_io)  # held, not raised
    assert interrupts.pending == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        interrupts.check()
    interrupts.check()  # raised once only
    training = stack("/x/torch/nn/functional.py", ours + "train.py", "/x/optuna/study/_optimize.py")
    with pytest.raises(KeyboardInterrupt):  # in training: stop at once
        interrupts._handle(signal.SIGTERM, training)
