"""What a study has found so far, read from its trials: the leaderboard, the parent run's
series, and the counts and search time. Functions of a study, no side effects."""

from __future__ import annotations

import pandas as pd
from optuna.trial import TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def finished_count(study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def running_count(study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def best_accuracy(trial) -> float:
    """A finished trial's best epoch: Optuna's value for a pruned trial is its last epoch's."""
    if trial.state == TrialState.COMPLETE:
        return trial.value
    return max(trial.intermediate_values.values(), default=float("nan"))


def leaderboard(study, top: int = 10) -> pd.DataFrame:
    """The best finished trials, best first."""
    rows = [
        {
            "trial": t.number,
            "state": t.state.name,
            "val_accuracy": best_accuracy(t),
            "epochs": t.user_attrs.get("epochs_trained"),
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
            **t.params,
        }
        for t in study.get_trials(deepcopy=False, states=FINISHED)
    ]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows).sort_values("val_accuracy", ascending=False)
    return frame.head(top).reset_index(drop=True)


def progress_points(study) -> list[tuple[int, int, dict[str, float]]]:
    """The parent run's series: one point per finished trial, (trial number, when it ended in
    ms, {"trial_val_accuracy": its best epoch's, "best_val_accuracy": Optuna's best value over
    the completed trials numbered up to it}).

    Only trials numbered below every trial still running get a point: a trial that finishes
    late can raise the best-so-far of the trials numbered after it, so a point is logged only
    once nothing can change it, and every worker then computes the same point."""
    points, best = [], None
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if not t.state.is_finished():
            break
        if t.state == TrialState.FAIL:
            continue
        if t.state == TrialState.COMPLETE:
            best = t.value if best is None else max(best, t.value)
        values = {"trial_val_accuracy": best_accuracy(t)}
        if best is not None:  # no best before the first completed trial
            values["best_val_accuracy"] = best
        ended = t.user_attrs.get("end_ms") or int(t.datetime_complete.timestamp() * 1000)
        points.append((t.number, ended, values))
    return points


def study_summary(study) -> dict[str, float]:
    """Trial counts, the epochs the trials trained, and the search time: the seconds during
    which at least one trial ran (parallel trials count once, the pauses between resumed runs
    not at all)."""
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials if t.datetime_complete)
    seconds, covered = 0.0, None  # covered: the end of the spans counted so far
    for start, end in spans:
        if covered is None or end > covered:
            seconds += (end - max(start, covered or start)).total_seconds()
            covered = end
    return {
        "n_complete": states.count("COMPLETE"),
        "n_pruned": states.count("PRUNED"),
        "n_failed": states.count("FAIL"),
        "epochs_trained": sum(t.user_attrs.get("epochs_trained", 0) for t in trials),
        "search_seconds": seconds,
    }
