"""A study and its MLflow parent run, opened: `open_study` creates or resumes one for a search
(exactly once, however many workers start together), `open_existing` opens one that a former
search made, for the commands that add to it (champion, figures, the experiments).

Every refusal is a BadInput whose message names the flag to change; nothing is created by a
refusal (opening a journal file or SQLite database that is not there would create it, so such
stores are refused before they are opened).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import mlflow
import optuna

from mnist_search.space import StaleParams, check_rebuildable, study_space
from mnist_search.storage import load_existing_study, sqlite_path
from mnist_search.tracking import StudyTracker, TrackingError

PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute: the MLflow parent run
METRIC_NAME = "val_accuracy"  # the objective's name in Optuna's dashboard, CLI and plots


class BadInput(ValueError):
    """A setting that cannot work, found before anything was created; names the flag."""


def open_tracker(
    study_name: str, tracking_uri: str | None, retry_seconds: float | None = None
) -> StudyTracker:
    try:
        return StudyTracker(study_name, tracking_uri, retry_seconds)
    except TrackingError as e:
        raise BadInput(str(e)) from None


def name_objective(study: optuna.Study) -> None:
    """Label the objective `val_accuracy` rather than Optuna's "Objective 0"."""
    if study.metric_names != [METRIC_NAME]:
        with warnings.catch_warnings():  # experimental since Optuna 3.2, still in 5.0
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC_NAME])


def open_study(name: str, storage, pruner, seed: int, tracker, params: dict, space: str = "mlp"):
    """Create the study and its MLflow parent run exactly once, however many workers start
    together: creating a study is atomic in every Optuna storage, so the one worker whose
    create succeeds makes the parent run and records its id on the study; the others wait
    for that id and reopen the same run. A study resumes only in the space it was made in
    (BadInput otherwise): its trials' params are only meaningful there."""
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
        raise BadInput(
            f"study {name!r} searches --space {made_in}, not {space}: pass --space {made_in} "
            "to resume it, or a new --study-name for a new search"
        )
    try:
        check_rebuildable(study)
    except StaleParams as e:
        raise BadInput(f"study {name!r}: {e}") from None
    run_id = study.user_attrs.get(PARENT_ATTR) or tracker.find_parent()
    if run_id is None:  # its creator died before making one
        run_id = tracker.create_parent(params)
        study.set_user_attr(PARENT_ATTR, run_id)
    tracker.reopen_parent(run_id)
    return study


def open_existing(
    study_name: str, storage: str, tracking_uri: str | None
) -> tuple[optuna.Study, StudyTracker]:
    """(study, its StudyTracker) of a study a former search made, with its parent run found,
    or BadInput naming the flag: --study-name, --storage or --tracking-uri."""
    if not study_name:
        raise BadInput("--study-name must not be empty")
    if "://" not in storage and Path(storage).is_dir():
        raise BadInput(f"--storage {storage} is a folder: pass the study's journal file or RDB URL")
    try:
        study = load_existing_study(study_name, storage)
    except ValueError as e:  # its message names the flag
        raise BadInput(str(e)) from None
    except Exception as e:  # noqa: BLE001 - SQLAlchemy and Optuna raise many kinds
        raise BadInput(f"cannot open --storage {storage!r}: {type(e).__name__}: {e}") from None
    path = sqlite_path(tracking_uri or mlflow.get_tracking_uri())
    if path is not None and not path.exists():
        raise BadInput(
            f"no MLflow parent run for study {study_name!r}: the tracking store {path} does not "
            "exist; run the study first, or pass the --tracking-uri (or $MLFLOW_TRACKING_URI) "
            "it used"
        )
    tracker = open_tracker(study_name, tracking_uri)
    try:
        tracker.require_parent()
    except TrackingError as e:
        raise BadInput(str(e)) from None
    return study, tracker
