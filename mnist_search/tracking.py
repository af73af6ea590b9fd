"""Everything MLflow: one experiment per study, a parent run for the study, a child run per trial.

Run status tells the truth: a completed trial's run ends FINISHED, a pruned or interrupted one
KILLED, a failed one FAILED; the tag `optuna_state` (COMPLETE, PRUNED, FAIL, INTERRUPTED) says
which, and `fail_reason` why. Weights are a `state_dict` saved with `torch.save`, loadable with
`torch.load(..., weights_only=True)`, beside `config.json`, never a pickled model.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

ROLE_TAG = "mnist_search.role"  # study | trial | champion | explore
STUDY_TAG = "mnist_search.study"
PARENT_TAG = "mlflow.parentRunId"  # what makes the MLflow UI nest a run under another
WEIGHTS_DIR = "model"
# Opens the experiment on the MLflow UI's "Model training" view rather than its GenAI one.
TRAINING_EXPERIMENT = {"mlflow.experimentKind": "custom_model_development"}


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or written."""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _params(params: dict) -> list[Param]:
    return [Param(k, str(v)[:6000]) for k, v in params.items()]


# One try with a short timeout: an unreachable server is reported in seconds, not after
# MLflow's minutes of retries.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextmanager
def env_defaults(values: dict[str, str]) -> Iterator[None]:
    """Within the block, each variable of `values` the user has not set takes its value there;
    settings the user made are kept."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            del os.environ[key]


def log_epoch(client: MlflowClient, run_id: str, metrics: dict, step: int) -> None:
    """One epoch's metrics from `fit` (all but "epoch" itself), at `step`, in one call."""
    now = _now_ms()
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]
    client.log_batch(run_id, metrics=batch)


class TrialRun:
    """The child run of one trial; counts the seconds spent talking to MLflow."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id
        self.tracking_seconds = 0.0

    def _timed(self, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.tracking_seconds += time.perf_counter() - start

    def log_epoch(self, metrics: dict, step: int) -> None:
        self._timed(log_epoch, self.client, self.run_id, metrics, step)

    def log_weights(self, state_dict: dict, meta: dict) -> None:
        """`weights.pt` (a state_dict) and `config.json` under `model/` in the run's artifacts."""

        def write_and_upload():
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(
                    {k: v.detach().cpu() for k, v in state_dict.items()}, f"{tmp}/weights.pt"
                )
                Path(tmp, "config.json").write_text(json.dumps(meta, indent=2))
                self.client.log_artifacts(self.run_id, tmp, WEIGHTS_DIR)

        self._timed(write_and_upload)

    def finish(
        self,
        status: str,
        optuna_state: str,
        reason: str | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        tags = {"optuna_state": optuna_state}
        if reason:
            tags["fail_reason"] = reason[:5000]
        for key, value in tags.items():
            self._timed(self.client.set_tag, self.run_id, key, value)
        now = _now_ms()
        batch = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
        self._timed(
            self.client.log_batch,
            self.run_id,
            metrics=[*batch, Metric("tracking_seconds", self.tracking_seconds, now, 0)],
        )
        self.client.set_terminated(self.run_id, status)


class StudyTracker:
    """The MLflow side of one study: its experiment, its parent run and its children."""

    def __init__(self, study_name: str, tracking_uri: str | None = None):
        self.study_name = study_name
        try:
            with env_defaults(FAIL_FAST):
                self.client = MlflowClient(tracking_uri)
                self.experiment_id = self._experiment_id(study_name)
        except Exception as e:  # noqa: BLE001 - any failure here means the store is unusable
            uri = tracking_uri or mlflow.get_tracking_uri()
            raise TrackingError(
                f"cannot use the MLflow tracking store {uri!r}: {type(e).__name__}: "
                f"{str(e)[:300]}. Start the server or fix --tracking-uri / MLFLOW_TRACKING_URI."
            ) from e
        self.parent_id: str | None = None
        self.logged_steps: set[int] = set()  # the parent's series points this process logged

    def _experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, tags=TRAINING_EXPERIMENT)
        except mlflow.exceptions.MlflowException:  # another worker created it just now
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def find_parent(self) -> str | None:
        """The study's parent run, if one was made (status untouched)."""
        found = self.client.search_runs(
            [self.experiment_id],
            filter_string=(
                f"tags.`{ROLE_TAG}` = 'study' and tags.`{STUDY_TAG}` = '{self.study_name}'"
            ),
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        self.parent_id = found[0].info.run_id if found else None
        return self.parent_id

    def require_parent(self) -> str:
        """The study's parent run, or TrackingError: commands that add to a study need it."""
        if self.find_parent() is None:
            raise TrackingError(
                f"no MLflow parent run for study {self.study_name!r}; run the study first"
            )
        return self.parent_id

    def create_parent(self, params: dict) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"study-{self.study_name}",
            tags={ROLE_TAG: "study", STUDY_TAG: self.study_name},
        )
        self.parent_id = run.info.run_id
        self.client.log_batch(self.parent_id, params=_params(params))
        return self.parent_id

    def reopen_parent(self, run_id: str) -> str:
        self.parent_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def start_trial(self, number: int, params: dict) -> TrialRun:
        start = time.perf_counter()
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{number}",
            tags={
                PARENT_TAG: self.parent_id,
                ROLE_TAG: "trial",
                STUDY_TAG: self.study_name,
                "optuna_trial_number": str(number),
            },
        )
        trial_run = TrialRun(self.client, run.info.run_id)
        trial_run.tracking_seconds = time.perf_counter() - start
        trial_run._timed(self.client.log_batch, run.info.run_id, params=_params(params))
        return trial_run

    def close_orphans(self, trial_is_running) -> list[str]:
        """End as FAILED every trial run still RUNNING whose Optuna trial is not running any
        more: what a killed process leaves behind. `trial_is_running(number)` asks the study.
        (A trial is RUNNING before its run is created, so a starting trial is never closed.)"""
        running = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = 'trial' and attributes.status = 'RUNNING'",
        )
        closed = []
        for run in running:
            if trial_is_running(int(run.data.tags["optuna_trial_number"])):
                continue
            tags = {"optuna_state": "FAIL", "fail_reason": "process died mid-trial"}
            try:
                for key, value in tags.items():
                    if run.data.tags.get(key) != value:
                        self.client.set_tag(run.info.run_id, key, value)
                self.client.set_terminated(run.info.run_id, "FAILED")
            except mlflow.exceptions.MlflowException:
                continue  # another worker is closing the same run
            closed.append(run.info.run_id)
        return closed

    def log_parent_series(self, points: list[tuple[int, int, dict[str, float]]]) -> None:
        """Log (step, timestamp in ms, {metric: value}) points on the parent run, each step once
        per process. Workers on many machines log the same points: a point is final when it is
        computed, and every worker computes it identically, timestamp included, so the store
        keeps one copy of it (MLflow's SQL store skips a metric whose key, value, timestamp and
        step it already has) and the series has one point per step whoever logged it."""
        new = [point for point in points if point[0] not in self.logged_steps]
        batch = [Metric(k, float(v), ms, step) for step, ms, vals in new for k, v in vals.items()]
        for i in range(0, len(batch), 1000):  # MLflow's limit per log_batch
            self.client.log_batch(self.parent_id, metrics=batch[i : i + 1000])
        self.logged_steps.update(step for step, _, _ in new)

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        """Single-valued metrics on the parent run (the latest value is the one shown)."""
        now = _now_ms()
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        self.client.log_batch(self.parent_id, metrics=batch)

    def log_parent_file(self, local_path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.parent_id, str(local_path), artifact_path)

    def finish_parent(self, status: str = "FINISHED") -> None:
        if self.parent_id is not None:
            self.client.set_terminated(self.parent_id, status)


def load_weights(run_id: str, tracking_uri: str | None = None) -> tuple[dict, dict]:
    """A trial's (state_dict, meta) from its run, loaded with weights_only=True."""
    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, WEIGHTS_DIR, tmp))
        state_dict = torch.load(local / "weights.pt", weights_only=True)
        meta = json.loads((local / "config.json").read_text())
    return state_dict, meta
