"""One lifecycle for every tracked run: how it ends is decided in one place."""

from contextlib import nullcontext

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from mnist_search.tracking import StudyTracker, create_run, experiment_id, lifecycle


class Pruned(Exception):
    pass


def ended(run_id):
    run = MlflowClient().get_run(run_id)
    return run.info.status, run.data.tags.get("optuna_state"), run.data.tags.get("fail_reason")


@pytest.mark.parametrize(
    "raised, status, state, reason",
    [
        (None, "FINISHED", "COMPLETE", None),
        (Pruned("pruned after epoch 2"), "KILLED", "PRUNED", "pruned after epoch 2"),
        (KeyboardInterrupt(), "KILLED", "INTERRUPTED", "interrupted by the user"),
        (OSError(28, "No space left"), "FAILED", "FAIL", "OSError: [Errno 28] No space left"),
    ],
)
def test_a_clean_exit_a_stop_an_interrupt_and_an_error_end_the_run_as_such(
    in_tmp, raised, status, state, reason
):
    client = MlflowClient()
    run = create_run(client, experiment_id(client, "e"), "r", {}, state_tag="optuna_state")
    failures = []
    with pytest.raises(type(raised)) if raised else nullcontext():
        with lifecycle(run, {Pruned: "PRUNED"}, on_failure=failures.append) as same:
            same.summary["best_val_accuracy"] = 0.5
            if raised:
                raise raised
    assert ended(run.run_id) == (status, state, reason)
    assert failures == ([reason] if status == "FAILED" else [])
    metrics = client.get_run(run.run_id).data.metrics
    assert metrics["best_val_accuracy"] == 0.5 and metrics["tracking_seconds"] > 0


def test_a_run_without_a_state_tag_only_ends_with_a_status(in_tmp):
    client = MlflowClient()
    run = create_run(client, experiment_id(client, "e"), "champion", {})
    with pytest.raises(ValueError), lifecycle(run):
        raise ValueError("bad")
    assert ended(run.run_id) == ("FAILED", None, "ValueError: bad")


def test_parent_points_another_worker_inserted_at_the_same_instant_are_kept_once(
    in_tmp, monkeypatch
):
    """Workers log the same points on the parent run; when two identical inserts collide on the
    store's unique key, the loser tries again, and the store keeps one copy."""
    tracker = StudyTracker("s")
    tracker.create_parent({})
    log_batch, calls = tracker.client.log_batch, []

    def the_other_worker_wins(run_id, metrics):
        calls.append(run_id)
        if len(calls) == 1:  # the other worker's copy lands first, then ours collides
            log_batch(run_id, metrics=metrics)
            raise MlflowException('duplicate key value violates unique constraint "metric_pk"')
        return log_batch(run_id, metrics=metrics)

    monkeypatch.setattr(tracker.client, "log_batch", the_other_worker_wins)
    tracker.log_parent_series([(0, 1000, {"best": 0.9}), (1, 2000, {"best": 0.95})])
    history = MlflowClient().get_metric_history(tracker.parent_id, "best")
    assert len(calls) == 2 and [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.95)]
    monkeypatch.setattr(tracker.client, "log_batch", lambda *a, **k: 1 / 0)  # not a collision
    with pytest.raises(ZeroDivisionError):
        tracker.log_parent_series([(2, 3000, {"best": 0.96})])
