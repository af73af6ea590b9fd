"""Everything MLflow: one experiment per study, a parent run for the study, a child run per trial.

Run status tells the truth: a completed trial's run ends FINISHED, a pruned or interrupted one
KILLED, a failed one FAILED; the tag `optuna_state` (COMPLETE, PRUNED, FAIL, INTERRUPTED) says
which, and `fail_reason` why. Weights are a `state_dict` saved with `torch.save`, loadable with
`torch.load(..., weights_only=True)`, beside `config.json`, never a pickled model. Models are
MLflow 3 logged models in `pt2` (torch.export) form: loadable without this package and without
unpickling, with the metrics that chose them linked to them and to the dataset they were
computed on. The datasets a run trained and was scored on are its inputs (`mnist_datasets`).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.data.dataset import Dataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param

from mnist_search import retry
from mnist_search.retry import Retrier

ROLE_TAG = "mnist_search.role"  # study | trial | champion | explore
STUDY_TAG = "mnist_search.study"
PARENT_TAG = "mlflow.parentRunId"  # what makes the MLflow UI nest a run under another
WEIGHTS_DIR = "model"
DATASET_CONTEXT = "mlflow.data.context"  # what a run did with an input dataset
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


# While the command runs, unless the user set them: no MLflow "View run" links for every run
# ended on a tracking server, and MLflow's own HTTP retries short, so that
# --store-retry-seconds bounds how long a store may be away.
QUIET = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


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


class Run:
    """One MLflow run, through an explicit client; counts the seconds spent talking to MLflow.

    Start it with `StudyTracker.start_run` or `create_run`, and end it with `lifecycle`: that is
    the one place a run's status is decided. `summary` holds the metrics logged as it ends.
    """

    def __init__(
        self, client: MlflowClient, run_id: str, state_tag: str | None = None, experiment_id=None
    ):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.state_tag = state_tag  # the tag that names how it ended (trials: optuna_state)
        self.summary: dict[str, float] = {}
        self.tracking_seconds = 0.0

    def _timed(self, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.tracking_seconds += time.perf_counter() - start

    def log_params(self, params: dict) -> None:
        self._timed(self.client.log_batch, self.run_id, params=_params(params))

    def log_metrics(self, metrics: dict, step: int = 0) -> int:
        """Metrics at `step`, in one call (all but an "epoch" entry: that is the step). Returns
        their timestamp, by which `log_model` links the same points to a model."""
        now = _now_ms()
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "epoch"]
        self._timed(self.client.log_batch, self.run_id, metrics=batch)
        return now

    def log_datasets(self, datasets: dict[str, Dataset]) -> None:
        """The run's inputs: each dataset with its context (training, validation, test, ...)."""
        inputs = [
            DatasetInput(d._to_mlflow_entity(), [InputTag(DATASET_CONTEXT, context)])
            for context, d in datasets.items()
        ]
        log = functools.partial(self.client.log_inputs, self.run_id, datasets=inputs)
        self._timed(retry_collisions, log)  # other workers' first trials log the same ones

    def log_model(
        self, model: torch.nn.Module, name: str, step: int, example: torch.Tensor,
        linked: tuple[dict[str, float], int, Dataset] | None = None, params: dict | None = None,
    ) -> str:  # fmt: skip
        """`model` as a logged model of this run's experiment, output of this run at `step`, saved
        as `pt2` (torch.export traced on `example`); `linked` = (metrics, their timestamp, the
        dataset they were computed on) links those points of the run to the model. Returns its
        model id: `mlflow.pytorch.load_model(f"models:/{id}")` loads it."""
        return self._timed(self._log_model, model, name, step, example, linked, params)

    def _log_model(self, model, name, step, example, linked, params) -> str:
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import infer_signature

        x = example.float().numpy()
        with torch.no_grad():
            signature = infer_signature(x, model(example.float()).numpy())
        params = {k: str(v)[:6000] for k, v in (params or {}).items()}
        logged = self.client.create_logged_model(self.experiment_id, name, self.run_id, params)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                mlflow.pytorch.save_model(
                    model, f"{tmp}/model", serialization_format="pt2", input_example=x[:2],
                    signature=signature,
                    # named, not inferred: inferring imports every module (about 30 s here)
                    pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                )  # fmt: skip
                self.client.log_model_artifacts(logged.model_id, f"{tmp}/model")
        except BaseException:
            self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        self.client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        self.client.log_outputs(self.run_id, [LoggedModelOutput(logged.model_id, step=step)])
        if linked is not None:
            metrics, timestamp, dataset = linked
            # the same points as the run's (key, value, timestamp, step): the run keeps one copy
            batch = [
                Metric(k, float(v), timestamp, step, model_id=logged.model_id,
                       dataset_name=dataset.name, dataset_digest=dataset.digest)
                for k, v in metrics.items()
            ]  # fmt: skip
            self.client.log_batch(self.run_id, metrics=batch)
        return logged.model_id

    def log_artifacts(self, local: Path | str, artifact_path: str | None = None) -> None:
        """A file, or a folder's contents, under `artifact_path` in the run's artifacts."""
        log = self.client.log_artifacts if Path(local).is_dir() else self.client.log_artifact
        self._timed(log, self.run_id, str(local), artifact_path)

    def log_weights(self, state_dict: dict, meta: dict) -> None:
        """`weights.pt` (a state_dict) and `config.json` under `model/` in the run's artifacts."""
        with tempfile.TemporaryDirectory() as tmp:
            cpu = {k: v.detach().cpu() for k, v in state_dict.items()}
            torch.save(cpu, f"{tmp}/weights.pt")
            Path(tmp, "config.json").write_text(json.dumps(meta, indent=2))
            self.log_artifacts(tmp, WEIGHTS_DIR)

    def end(self, status: str, state: str, reason: str | None = None) -> None:
        tags = {self.state_tag: state} if self.state_tag else {}
        if reason:
            tags["fail_reason"] = reason[:5000]
        for key, value in tags.items():
            self._timed(self.client.set_tag, self.run_id, key, value)
        self.log_metrics({**self.summary, "tracking_seconds": self.tracking_seconds})
        self.client.set_terminated(self.run_id, status)


@contextmanager
def lifecycle(
    run: Run,
    stopped: dict[type[BaseException], str] | None = None,
    on_failure: Callable[[str], object] | None = None,
    leave: tuple[type[BaseException], ...] = (),
) -> Iterator[Run]:
    """The one way a tracked run ends; every exception propagates.

    A clean exit ends it FINISHED (state COMPLETE). KeyboardInterrupt (a Ctrl-C or SIGTERM,
    see `interrupts`) ends it KILLED (INTERRUPTED), and so does an exception of a type in
    `stopped`, with that type's state (a pruned trial: PRUNED). An exception of a type in
    `leave` leaves the run as it is: someone else has ended it. Any other error ends it FAILED
    (FAIL) with the tag `fail_reason`, which `on_failure` also receives unless the error is a
    store that stayed away (writing the reason there would only wait again). The state goes in
    the run's `state_tag`, if it has one.
    """
    stopped = stopped or {}
    try:
        yield run
    except leave:
        raise
    except KeyboardInterrupt:
        run.end("KILLED", "INTERRUPTED", "interrupted by the user")
        raise
    except tuple(stopped) as e:
        state = next(name for kind, name in stopped.items() if isinstance(e, kind))
        run.end("KILLED", state, str(e))
        raise
    except BaseException as e:
        reason = f"{type(e).__name__}: {e}"
        if on_failure is not None and not isinstance(e, retry.StoreUnavailable):
            on_failure(reason)
        if not (isinstance(e, retry.StoreUnavailable) and e.store == TRACKING_STORE):
            run.end("FAILED", "FAIL", reason)
        raise
    run.end("FINISHED", "COMPLETE")


def create_run(
    client: MlflowClient, experiment_id: str, run_name: str, tags: dict, state_tag=None
) -> Run:
    start = time.perf_counter()
    created = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run = Run(client, created.info.run_id, state_tag, experiment_id)
    run.tracking_seconds = time.perf_counter() - start
    return run


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of the experiment `name`, created (for the model-training view) if need be."""
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, tags=TRAINING_EXPERIMENT)
    except mlflow.exceptions.MlflowException:  # another worker created it just now
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def tracking_away(error: BaseException) -> bool:
    """A tracking store that is away rather than refusing a request: a refused, dropped or timed
    out connection, a server answering 5xx (its database restarting), a locked SQLite file."""
    import requests

    if isinstance(error, ConnectionError | TimeoutError | requests.exceptions.RequestException):
        return True
    if isinstance(error, mlflow.exceptions.MlflowException):
        text = str(error)
        return error.error_code in ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE") or any(
            sign in text for sign in ("Max retries exceeded", "database is locked")
        )
    return False


TRACKING_STORE = "MLflow tracking store"
STOPPED = (
    "its worker sent no heartbeat for longer than the grace period (it died, or was paused) "
    "and another worker failed its trial"
)
REQUEST_TAG = "mnist_search.request"  # a create's own id: a retry finds what a lost answer made


def retry_collisions(call, tries: int = 5):
    """`call()`, which inserts what other workers may be inserting at the same instant (the same
    metric points, the same datasets): the store checks for an existing row and inserts in two
    steps, so two identical inserts can collide on its unique key; a second try finds the
    other's copy and skips it."""
    for attempt in range(1, tries + 1):
        try:
            return call()
        except mlflow.exceptions.MlflowException as e:
            collided = any(s in str(e) for s in ("duplicate key value", "UNIQUE constraint"))
            if not collided or attempt == tries:
                raise
            time.sleep(0.2 * attempt)


class RetryingClient:
    """An MlflowClient whose calls are retried while the tracking store is away (`retry`). The
    calls that create something are tagged with a request id, and a retry first looks for what
    an earlier try may have made, so nothing is created twice."""

    def __init__(self, client: MlflowClient, retrier: Retrier):
        self._client, self.retrier = client, retrier

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr
        return functools.partial(self.retrier, attr)

    def _create_once(self, create, find):
        """`create()`, and on a retry `find()` first: what the lost answer of an earlier try
        had made, if it had (None otherwise)."""
        tries = []

        def attempt():
            if tries and (found := find()) is not None:
                return found
            tries.append(1)
            return create()

        return self.retrier(attempt)

    def create_run(self, experiment_id: str, run_name: str, tags: dict):
        request = uuid.uuid4().hex
        tags = {**tags, REQUEST_TAG: request}

        def find():
            runs = self._client.search_runs(
                [experiment_id], f"tags.`{REQUEST_TAG}` = '{request}'", max_results=1
            )
            return runs[0] if runs else None

        create = functools.partial(self._client.create_run, experiment_id, run_name=run_name)
        return self._create_once(functools.partial(create, tags=tags), find)

    def create_logged_model(self, experiment_id: str, name: str, source_run_id: str, params):
        request = uuid.uuid4().hex

        def find():
            found = self._client.search_logged_models(
                [experiment_id], filter_string=f"tags.`{REQUEST_TAG}` = '{request}'"
            )
            return found[0] if found else None

        create = functools.partial(
            self._client.create_logged_model, experiment_id, name=name,
            source_run_id=source_run_id, params=params, tags={REQUEST_TAG: request},
        )  # fmt: skip
        return self._create_once(create, find)

    def create_model_version(self, name: str, source: str, run_id: str, tags: dict, model_id):
        def find():
            versions = self._client.search_model_versions(f"name = '{name}'")
            return next((v for v in versions if v.source == source), None)

        create = functools.partial(
            self._client.create_model_version, name, source, run_id, tags, model_id=model_id
        )
        return self._create_once(create, find)


class StudyTracker:
    """The MLflow side of one study: its experiment, its parent run and its children. Its
    client retries while the tracking store is away, for `retry_seconds` (`retry`)."""

    def __init__(
        self, study_name: str, tracking_uri: str | None = None, retry_seconds: float | None = None
    ):
        self.study_name = study_name
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        try:
            with env_defaults(FAIL_FAST):
                client = MlflowClient(tracking_uri)
                self.experiment_id = experiment_id(client, study_name)
        except Exception as e:  # noqa: BLE001 - any failure here means the store is unusable
            uri = tracking_uri or mlflow.get_tracking_uri()
            raise TrackingError(
                f"cannot use the MLflow tracking store {uri!r}: {type(e).__name__}: "
                f"{str(e)[:300]}. Start the server or fix --tracking-uri / MLFLOW_TRACKING_URI."
            ) from e
        retrier = Retrier(
            "MLflow tracking store", tracking_away, retry.retry_seconds(retry_seconds)
        )
        self.client = RetryingClient(client, retrier)
        self.parent_id: str | None = None
        self.logged_steps: set[int] = set()  # the parent's series points this process logged

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

    def start_run(self, role: str, run_name: str, tags: dict | None = None, state_tag=None) -> Run:
        """A run nested under the study's parent run."""
        tags = {
            PARENT_TAG: self.parent_id,
            ROLE_TAG: role,
            STUDY_TAG: self.study_name,
            **(tags or {}),
        }
        return create_run(self.client, self.experiment_id, run_name, tags, state_tag)

    def start_trial(self, number: int, params: dict) -> Run:
        run = self.start_run(
            "trial", f"trial-{number}", {"optuna_trial_number": str(number)}, "optuna_state"
        )
        run.log_params(params)
        return run

    def close_orphans(self, trial_is_running, died=lambda number: False) -> list[str]:
        """End as FAILED every trial run still RUNNING whose Optuna trial is not running any
        more: what a killed or paused process leaves behind. `trial_is_running(number)` and
        `died(number)` (its process is known to be gone) ask the study. (A trial is RUNNING
        before its run is created, so a starting trial is never closed.)"""
        running = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = 'trial' and attributes.status = 'RUNNING'",
        )
        closed = []
        for run in running:
            number = int(run.data.tags["optuna_trial_number"])
            if trial_is_running(number):
                continue
            reason = "process died mid-trial" if died(number) else STOPPED
            tags = {"optuna_state": "FAIL", "fail_reason": reason}
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
            part = batch[i : i + 1000]  # other workers may be logging it at the same instant
            retry_collisions(functools.partial(self.client.log_batch, self.parent_id, metrics=part))
        self.logged_steps.update(step for step, _, _ in new)

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        """Single-valued metrics on the parent run (the latest value is the one shown)."""
        now = _now_ms()
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        self.client.log_batch(self.parent_id, metrics=batch)

    def log_parent_file(self, local_path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.parent_id, str(local_path), artifact_path)

    @contextmanager
    def parent_system_metrics(self, interval: float = 10.0) -> Iterator[None]:
        """While the block runs, MLflow samples this machine's CPU, memory, disk, network (and GPU,
        where there is one) every `interval` seconds onto the parent run (`system/...`): one
        thread in the process that leads the study, none per trial."""
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            self.parent_id, interval, resume_logging=True, tracking_uri=self.tracking_uri
        )
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

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


def mnist_datasets(raw_dir: Path, digest: str, counts: dict[str, int]) -> dict[str, Dataset]:
    """MLflow datasets, named `mnist-PART`, for the parts of MNIST a run uses, {part: images}
    such as {"train-split": 49999, "validation-split": 10001}: each with the data digest (the
    registry's `data_digest` tag), the verified IDX files as its source, and the shape of its
    images and labels as its schema."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import Schema, TensorSpec

    with warnings.catch_warnings():  # a local folder is a "local" source however it is named
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(Path(raw_dir).resolve().as_uri())
    return {
        part: MetaDataset(
            source,
            name=f"mnist-{part}",
            digest=digest,
            schema=Schema(
                [
                    TensorSpec(np.dtype(np.uint8), (count, 28, 28), "images"),
                    TensorSpec(np.dtype(np.int64), (count,), "labels"),
                ]
            ),
        )
        for part, count in counts.items()
    }
