"""The study end to end on tiny synthetic data, in tmp_path."""

import dataclasses
import signal
import threading

import optuna
import pytest
from mlflow import MlflowClient

from mnist_search import search as msearch
from mnist_search import study as mstudy
from mnist_search.data import Split, load_data
from mnist_search.model import training_flops_per_sample
from mnist_search.objective import make_objective
from mnist_search.search import SearchConfig, run_trials, search
from mnist_search.space import config_from_params
from mnist_search.storage import open_storage
from mnist_search.studies import PARENT_ATTR, BadInput, open_study
from mnist_search.summary import progress_points
from mnist_search.tracking import StudyTracker, load_weights
from mnist_search.train import TrainConfig, build_model, evaluate
from tests.helpers import add_earlier_cnn_trial, assert_parent_series


def run(in_tmp, data_dir, **settings) -> int:
    """The search as a notebook calls it: a config, no champion, two epochs per trial; the
    MLP space (study mnist-mlp) unless `settings` says otherwise."""
    storage = str(in_tmp / "study.journal")
    settings.setdefault("space", "mlp")
    config = SearchConfig(
        data_dir=data_dir, storage=storage, device="cpu", champion=None, epochs=2, **settings
    )
    return search(config).exit_code


def load(in_tmp, name="mnist-mlp"):
    storage = open_storage(str(in_tmp / "study.journal"))
    return optuna.load_study(study_name=name, storage=storage)


def trial_runs(client, study_name="mnist-mlp"):
    exp = client.get_experiment_by_name(study_name)
    runs = client.search_runs([exp.experiment_id], "tags.`mnist_search.role` = 'trial'")
    return sorted(runs, key=lambda r: int(r.data.tags["optuna_trial_number"]))


def test_every_trial_is_a_child_run_with_metrics_and_weights(in_tmp, synthetic_mnist, monkeypatch):
    pruners = []  # the pruner each trial is really asked with
    ask = optuna.study.Study.ask

    def spy(self, *args, **kwargs):
        pruners.append(type(self.pruner).__name__)
        return ask(self, *args, **kwargs)

    monkeypatch.setattr(optuna.study.Study, "ask", spy)
    assert run(in_tmp, synthetic_mnist, trials=3) == 0
    assert pruners == ["HyperbandPruner"] * 3
    study, client = load(in_tmp), MlflowClient()
    exp = client.get_experiment_by_name("mnist-mlp")
    parents = client.search_runs([exp.experiment_id], "tags.`mnist_search.role` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["data_digest"]
    assert study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    runs = trial_runs(client)
    assert len(runs) == len(study.trials) == 3
    data = load_data(synthetic_mnist)
    for trial, r in zip(study.trials, runs, strict=True):
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert trial.user_attrs["mlflow_run_id"] == r.info.run_id
        assert r.data.tags["optuna_state"] == trial.state.name
        # the sampled params, plus the family, the trial's cost and the precision it ran in
        flops = trial.user_attrs["flops_per_sample"]
        expected = trial.params | {"family": "mlp", "flops_per_sample": flops, "precision": "fp32"}
        assert {k: str(v) for k, v in expected.items()} == r.data.params
        config = config_from_params(trial.params, 1, 0)
        assert flops == training_flops_per_sample(build_model(config))
        history = client.get_metric_history(r.info.run_id, "val_accuracy")
        assert [m.step for m in history] == list(range(1, trial.user_attrs["epochs_trained"] + 1))
        best = max(m.value for m in history)  # the objective, on the run so its table sorts by it
        assert r.data.metrics["best_val_accuracy"] == pytest.approx(best)
        for key in ("train_loss", "val_loss", "epoch_seconds"):
            assert len(client.get_metric_history(r.info.run_id, key)) == len(history)
        # the weights rebuild a model that scores exactly what the run logged last
        state_dict, meta = load_weights(r.info.run_id)
        model = build_model(TrainConfig(**meta["config"]))
        model.load_state_dict(state_dict)
        assert evaluate(model, data.val)["accuracy"] == pytest.approx(history[-1].value)
    assert (in_tmp / "reports/mnist-mlp/leaderboard.csv").exists()
    assert study.metric_names == ["val_accuracy"]  # what Optuna's dashboard and plots show

    # the parent run tells the study's story: its series, its counts, its time
    assert_parent_series(client, study, parents[0].info.run_id)
    summary, states = parents[0].data.metrics, [t.state.name for t in study.trials]
    assert summary["n_complete"] == states.count("COMPLETE")
    assert summary["n_pruned"] == states.count("PRUNED")
    assert summary["n_failed"] == states.count("FAIL") == 0
    assert summary["epochs_trained"] == sum(t.user_attrs["epochs_trained"] for t in study.trials)
    one_at_a_time = sum(
        (t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials
    )
    assert summary["search_seconds"] == pytest.approx(one_at_a_time)


def test_the_parent_series_is_final_whichever_worker_logs_it_and_in_whatever_order(in_tmp):
    """Trial 0 ends after trial 1; two workers both log what they see, twice over."""
    study = optuna.create_study(direction="maximize")
    workers = [StudyTracker("series"), StudyTracker("series")]
    parent = workers[0].create_parent({})
    workers[1].reopen_parent(parent)

    def log_all():
        for worker in workers:
            worker.log_parent_series(progress_points(study))

    trials = [study.ask() for _ in range(5)]
    study.tell(trials[1], 0.90)
    log_all()  # trial 0 still runs: it may yet beat 0.90, so nothing is final
    assert MlflowClient().get_metric_history(parent, "best_val_accuracy") == []
    study.tell(trials[0], 0.95)
    trials[2].report(0.97, step=1)
    study.tell(trials[2], state=optuna.trial.TrialState.PRUNED)  # its 0.97 is no Optuna value
    log_all()
    study.tell(trials[3], state=optuna.trial.TrialState.FAIL)  # no point
    study.tell(trials[4], 0.96)
    log_all()
    workers[1].logged_steps.clear()  # a worker restarted: it logs every point again
    log_all()
    history = MlflowClient().get_metric_history(parent, "best_val_accuracy")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 0.95), (1, 0.95), (2, 0.95), (4, 0.96)
    ]  # fmt: skip
    assert_parent_series(MlflowClient(), study, parent)


def test_rerun_with_more_trials_continues_the_same_study(in_tmp, synthetic_mnist, capsys):
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    assert run(in_tmp, synthetic_mnist, trials=3) == 0
    # a library call: the study's Ctrl-C / SIGTERM handlers did not outlive it
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    assert run(in_tmp, synthetic_mnist, trials=5) == 0
    study = load(in_tmp)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    params = [t.params for t in study.trials]
    assert params[3] != params[0]  # the resumed sampler did not replay the first trials
    client = MlflowClient()
    assert len(trial_runs(client)) == 5
    exp = client.get_experiment_by_name("mnist-mlp")
    assert len(client.search_runs([exp.experiment_id], "tags.`mnist_search.role` = 'study'")) == 1
    # resuming in another space is refused, naming the flag to pass; nothing recorded changes
    with pytest.raises(BadInput, match="pass --space mlp"):
        run(in_tmp, synthetic_mnist, trials=6, space="cnn", study_name="mnist-mlp")
    assert len(load(in_tmp).trials) == 5 and len(trial_runs(client)) == 5


def test_a_study_whose_trials_an_earlier_space_made_is_not_resumed(in_tmp, synthetic_mnist):
    """A CNN study of the version that still searched the schedule: its trials would rebuild
    as other configs, so resuming (and crowning) it is refused before anything is made."""
    study = optuna.create_study(
        study_name="mnist-cnn", storage=open_storage(str(in_tmp / "study.journal"))
    )
    study.set_user_attr(PARENT_ATTR, StudyTracker("mnist-cnn").create_parent({}))
    add_earlier_cnn_trial(study)
    with pytest.raises(BadInput, match=r"trial params \['schedule'\] .* start a new --study-name"):
        run(in_tmp, synthetic_mnist, trials=2, space="cnn")
    assert len(load(in_tmp, "mnist-cnn").trials) == 1
    assert trial_runs(MlflowClient(), "mnist-cnn") == []


def test_pruned_and_failed_trials_are_recorded_as_such(in_tmp, synthetic_mnist):
    tracker = StudyTracker("prune-test")
    tracker.create_parent({})
    data = load_data(synthetic_mnist)
    objective = make_objective(data, "cpu", epochs=3, seed=0, tracker=tracker)
    # a pruner that prunes everything after the first epoch
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(2.0))
    study.optimize(objective, n_trials=1)
    # a diverging trial (its loss becomes NaN) fails with its reason, and the study goes on
    features = data.train.features()
    features[0, 0] = float("nan")
    data = dataclasses.replace(data, train=Split(features, data.train.y))
    objective = make_objective(data, "cpu", epochs=3, seed=0, tracker=tracker)
    study.optimize(objective, n_trials=1, catch=(Exception,))
    pruned, failed = study.trials
    assert pruned.state.name == "PRUNED" and failed.state.name == "FAIL"
    assert "NonFiniteLossError" in failed.user_attrs["fail_reason"]
    client = MlflowClient()
    pruned_run = client.get_run(pruned.user_attrs["mlflow_run_id"])
    assert pruned_run.info.status == "KILLED"
    assert pruned_run.data.tags["optuna_state"] == "PRUNED"
    assert len(client.get_metric_history(pruned_run.info.run_id, "val_accuracy")) == 1
    assert load_weights(pruned_run.info.run_id)[1]["epochs_trained"] == 1
    failed_run = client.get_run(failed.user_attrs["mlflow_run_id"])
    assert failed_run.info.status == "FAILED"
    assert "loss became" in failed_run.data.tags["fail_reason"]


STUDY_ERROR = "python -m mnist_search.study: error: "


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--trials", "0"], "--trials must be at least 1"),
        (["--trials", "x"], "argument --trials: invalid int value: 'x'"),
        (["--epochs", "-1"], "--epochs must be at least 1"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--workers", "100000"], "--workers 100000 needs about"),
        (["--store-retry-seconds", "-1"], "--store-retry-seconds must be 0 or more, not -1"),
        (["--ensemble", "0"], "--ensemble must be at least 1"),
        (["--retrain-epochs", "0"], "--retrain-epochs must be at least 1"),
        (["--retrain-channels", "8", "16", "32"], "--retrain-channels 8 16 32: give 2 widths"),
        (["--seeds", "0"], "--seeds must be at least 1, not 0"),
        (["--trials", "0", "--epochs", "0"], "--trials and --epochs must be at least 1"),
        (["--timeout", "0"], "--timeout must be positive, not 0"),
        (["--space", "rnn"], "argument --space: invalid choice: 'rnn'"),
        (["--pruner", "asha"], "argument --pruner: invalid choice: 'asha'"),
        (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
        (["--study-name="], "--study-name is empty; give it a name"),
        (["--register-as", " "], "--register-as is empty; give it a name"),
        (["--storage="], "--storage is empty; give it a name"),
        (["--device", "tpu"], "unknown device 'tpu' for --device; use auto, cpu or cuda"),
        (["--storage", "nosuchdb://x/y"], "cannot use --storage 'nosuchdb://x/y': cannot connect"),
        (["--storage", "sqlite:////no/such/folder/x.db"], "cannot use --storage 'sqlite:////no/"),
        (["--storage", "/no/such/folder/study.journal"], "cannot use --storage '/no/such/folder/"),
        (["--storage", "sub"], "cannot use --storage 'sub': sub is a folder; give a journal"),
        (["--storage", "sqlite:///sub"], "cannot use --storage 'sqlite:///sub': sub is a folder"),
        (["--tracking-uri", "http://127.0.0.1:9"], "cannot use the MLflow tracking store"),
        (["--tracking-uri", "./mlruns"], "cannot use the MLflow tracking store './mlruns'"),
        (
            ["--storage", "sqlite:///o.db", "--tracking-uri", "http://127.0.0.1:9"],
            "cannot use the MLflow tracking store 'http://127.0.0.1:9'",
        ),
        (["--data-dir", "file"], "--data-dir file is a file; give the folder MNIST lives in"),
    ],
)
def test_bad_flags_exit_2_with_a_message_and_create_nothing(in_tmp, flags, message, capsys):
    (in_tmp / "sub").mkdir()  # a folder where a file is due
    (in_tmp / "file").write_text("")  # a file where a folder is due
    before = set(in_tmp.iterdir())
    with pytest.raises(SystemExit) as exit_:
        mstudy.main(["--no-champion", *flags])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # not argparse's usage line
    assert error.startswith(STUDY_ERROR + message)
    assert any(f.split("=")[0] in error for f in flags if f.startswith("--"))  # names its flag
    assert set(in_tmp.iterdir()) == before  # nothing created


def test_a_pruned_trial_whose_weights_cannot_be_saved_fails_with_the_reason(
    in_tmp, synthetic_mnist, monkeypatch
):
    tracker = StudyTracker("prune-full-disk")
    tracker.create_parent({})
    objective = make_objective(load_data(synthetic_mnist), "cpu", 3, 0, tracker)

    def full(self, run_id, local_dir, artifact_path=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MlflowClient, "log_artifacts", full)
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(2.0))
    study.optimize(objective, n_trials=1, catch=(Exception,))
    (trial,) = study.trials
    assert trial.state.name == "FAIL" and "No space left" in trial.user_attrs["fail_reason"]
    run = MlflowClient().get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED"  # closed with the reason, not left RUNNING
    assert "No space left" in run.data.tags["fail_reason"]


@pytest.mark.parametrize(
    "kind",
    ["journal", "sqlite", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.slow])],
)
def test_workers_released_together_on_the_last_place_train_one_trial(
    kind, in_tmp, synthetic_mnist, monkeypatch, request, capfd, caplog
):
    """The race of issue 12, forced: three workers all see one place left, all start a trial,
    and all their trials exist before any is counted. Exactly one trains; the others are given
    back, whatever the storage. Workers are threads, each with its own storage connection and
    MLflow client, as separate processes or machines would have."""
    url = {
        "journal": lambda: str(in_tmp / "race.journal"),
        "sqlite": lambda: f"sqlite:///{in_tmp}/race.db",
        "postgres": lambda: f"{request.getfixturevalue('postgres')}/optuna",
    }[kind]()
    budget, workers = 3, 3
    NOP = optuna.pruners.NopPruner()
    study = open_study("race", open_storage(url), NOP, 0, StudyTracker("race"), {"kind": kind})
    for value in (0.5, 0.6):  # two finished trials: one place left
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=value))

    saw_a_free_place = threading.Barrier(workers, timeout=300)  # timeouts bound hangs only
    all_trials_exist = threading.Barrier(workers, timeout=300)
    ask, places_taken_before = optuna.study.Study.ask, msearch.places_taken_before
    calls = []

    def ask_together(self, *args, **kwargs):
        calls.append(threading.get_ident())
        saw_a_free_place.wait()  # every worker passed the loop's check before any trial starts
        return ask(self, *args, **kwargs)

    def count_together(trial):
        all_trials_exist.wait()  # every worker's trial is RUNNING before any counts
        return places_taken_before(trial)

    monkeypatch.setattr(optuna.study.Study, "ask", ask_together)
    monkeypatch.setattr(msearch, "places_taken_before", count_together)
    data = load_data(synthetic_mnist)
    codes = {}

    def worker(i: int):
        storage = open_storage(url)
        tracker = StudyTracker("race")
        tracker.parent_id = study.user_attrs[PARENT_ATTR]
        mine = optuna.load_study(study_name="race", storage=storage, pruner=NOP)
        config = SearchConfig(study_name="race", space="mlp", trials=budget, epochs=2, worker_id=i)
        try:
            codes[i] = run_trials(config, mine, storage, tracker, data, "cpu")
        except BaseException as e:  # noqa: BLE001 - reported below, with the worker
            codes[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == dict.fromkeys(range(workers), 0)
    assert len(calls) == workers  # one trial each: the loop's check stopped them afterwards

    trials = optuna.load_study(study_name="race", storage=open_storage(url)).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * budget + ["FAIL"] * (workers - 1)
    assert not trials[2].user_attrs.get("over_budget")  # the first new trial took the place
    client = MlflowClient()
    for t in trials[budget:]:
        assert t.user_attrs["over_budget"] and "over budget" in t.user_attrs["fail_reason"]
        assert "epochs_trained" not in t.user_attrs and not t.params  # never trained
        run = client.get_run(t.user_attrs["mlflow_run_id"])
        assert run.info.status == "KILLED" and run.data.tags["optuna_state"] == "OVER_BUDGET"
        assert run.data.tags["fail_reason"] == t.user_attrs["fail_reason"]
    notices = [r.getMessage() for r in caplog.records if r.name == "mnist_search"]
    assert sorted(m for m in notices if "given back before training" in m) == sorted(
        f"trial {t.number}: {t.user_attrs['fail_reason']}" for t in trials[budget:]
    )  # one line each, in the log the study command prints
    assert "Traceback" not in capfd.readouterr().err  # a trial given back is no error


def test_timeout_stops_starting_trials_and_a_rerun_finishes(in_tmp, synthetic_mnist, caplog):
    assert run(in_tmp, synthetic_mnist, trials=3, timeout=1e-9) == 0
    assert load(in_tmp).trials == []  # the budget of time was spent before the first trial
    assert "--timeout 1e-09s reached; rerun to finish" in caplog.messages
    assert run(in_tmp, synthetic_mnist, trials=3) == 0
    assert [t.state.name for t in load(in_tmp).trials].count("FAIL") == 0
    assert len(load(in_tmp).trials) == 3


def test_the_median_pruner_and_the_space_of_both_families_run(in_tmp, synthetic_mnist, monkeypatch):
    pruners, ask = [], optuna.study.Study.ask

    def spy(self, *args, **kwargs):
        pruners.append(type(self.pruner).__name__)
        return ask(self, *args, **kwargs)

    monkeypatch.setattr(optuna.study.Study, "ask", spy)
    assert run(in_tmp, synthetic_mnist, trials=4, pruner="median", space="all") == 0
    assert pruners == ["MedianPruner"] * 4
    study = load(in_tmp, "mnist-all")
    runs = trial_runs(MlflowClient(), "mnist-all")
    for trial, r in zip(study.trials, runs, strict=True):
        config = config_from_params(trial.params, 2, 0, "all")  # the family is a param here
        assert config.family == trial.params["family"] == r.data.params["family"]
        assert trial.user_attrs["flops_per_sample"] == training_flops_per_sample(
            build_model(config)
        )


def test_the_figures_command_draws_a_finished_study_onto_its_parent_run(
    in_tmp, synthetic_mnist, capsys
):
    from mnist_search import figures

    assert run(in_tmp, synthetic_mnist, trials=2, pruner="none") == 0  # two complete
    capsys.readouterr()
    argv = ["--study-name", "mnist-mlp", "--storage", str(in_tmp / "study.journal")]
    assert figures.main([*argv, "--out", str(in_tmp / "drawn")]) == 0
    printed = capsys.readouterr().out.split()
    names = {"optimization_history.png", "intermediate_values.png", "parallel_coordinate.png",
             "slice_lr_batch_size.png", "param_importances.png"}  # fmt: skip
    assert {p.split("/")[-1] for p in printed} == names
    assert all(p.startswith(str(in_tmp / "drawn")) for p in printed)
    parent = load(in_tmp).user_attrs[PARENT_ATTR]
    logged = {a.path for a in MlflowClient().list_artifacts(parent, "figures")}
    assert logged == {f"figures/{name}" for name in names}
