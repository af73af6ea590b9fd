"""A trial: its config from the search space, plain `fit`, and the trial's MLflow run.

Pruning and logging reach `fit` through its epoch hook; how the run ends (FINISHED, KILLED for a
pruned or interrupted trial, FAILED) is `tracking.lifecycle`'s decision. A trial that starts
beyond the budget is given back before training (`give_back`).
"""

from __future__ import annotations

import os
import socket
import time

import optuna
from optuna.trial import TrialState

from mnist_search import interrupts
from mnist_search.model import PixelClassifier, training_flops_per_sample
from mnist_search.space import suggest_config
from mnist_search.tracking import lifecycle
from mnist_search.train import build_model, fit, forward_precision

OVER_BUDGET = "over_budget"  # trial user attribute: given back before training


def places_taken_before(trial: optuna.Trial) -> int:
    """Trials numbered before `trial` that are finished (complete or pruned) or running.

    Every storage numbers trials in one order that all workers see: the journal is one
    append-only log, and an RDB storage locks the study's row while it numbers a new trial. So
    once a trial exists, every trial numbered before it is visible to its worker, and workers
    that all created a trial at the same moment agree on which ones came first."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    earlier = trial.study.get_trials(deepcopy=False, states=states)
    return sum(t.number < trial.number for t in earlier)


def give_back(trial: optuna.Trial, tracker, budget: int, taken: int) -> str:
    """Mark `trial` as given back before training: the user attributes `over_budget` and
    `fail_reason`, and an MLflow run ended KILLED with `optuna_state=OVER_BUDGET`. Returns the
    reason; the caller tells the study the trial FAILED."""
    reason = (
        f"over budget: {taken} earlier trials already finished or running fill "
        f"--trials {budget}; given back before training"
    )
    trial.set_user_attr(OVER_BUDGET, True)
    trial.set_user_attr("fail_reason", reason)
    run = tracker.start_trial(trial.number, {})
    trial.set_user_attr("mlflow_run_id", run.run_id)
    run.end("KILLED", "OVER_BUDGET", reason)  # it never did any work to end otherwise
    return reason


def make_objective(
    data, device, epochs: int, seed: int, tracker, cuda_graphs=True, space="mlp", datasets=None
):
    """The objective: config from the `space`, plain `fit`, with pruning and logging in the
    hook. Returns the best validation accuracy over the trial's epochs; raises TrialPruned
    when the pruner stops it; any other error ends its run FAILED with the `fail_reason`.
    `datasets` ({"training": ..., "validation": ...}, MLflow datasets) become each trial run's
    inputs, and a completed trial's best epoch becomes a logged model linked to validation."""

    def train(trial: optuna.Trial, config, run) -> float:
        start = time.perf_counter()
        best = {"val_accuracy": -1.0}  # the best epoch so far: its metrics, time and weights

        def on_epoch_end(epoch, metrics, model) -> bool:
            # first the study: a trial another worker failed (this process was paused past the
            # heartbeat's grace period) raises UpdateFinishedTrialError here, before any write
            trial.report(metrics["val_accuracy"], epoch)
            stamp = run.log_metrics(metrics, step=epoch)
            if metrics["val_accuracy"] > best["val_accuracy"]:
                weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best.update(metrics, epoch=epoch, stamp=stamp, weights=weights)
            interrupts.check()  # a Ctrl-C or SIGTERM received since the last check stops here
            return trial.should_prune()

        interrupts.check()  # one that came while the trial was set up: no epoch trained
        result = fit(config, data, device, on_epoch_end, cuda_graphs)
        # When training ended: the time of the trial's point on the parent run, the same for
        # every worker that logs it (see `summary.progress_points`).
        trial.set_user_attr("end_ms", int(time.time() * 1000))
        trained = len(result.history)
        meta = {"config": config.to_dict(), "mean": data.mean, "std": data.std}
        run.log_weights(result.model.state_dict(), {**meta, "epochs_trained": trained})
        trial.set_user_attr("epochs_trained", trained)
        value = max(m["val_accuracy"] for m in result.history)
        run.summary["best_val_accuracy"] = value
        if result.stopped:
            raise optuna.TrialPruned(f"pruned after epoch {trained}")
        trial.set_user_attr("best_epoch", result.best_epoch)
        if datasets:
            logging_start = time.perf_counter()
            trial.set_user_attr("mlflow_model_id", log_checkpoint(trial, config, run, best))
            trial.set_user_attr("checkpoint_seconds", time.perf_counter() - logging_start)
        seconds = time.perf_counter() - start
        trial.set_user_attr("tracking_fraction", run.tracking_seconds / seconds)
        trial.set_user_attr("tracking_seconds", run.tracking_seconds)
        return value

    def objective(trial: optuna.Trial) -> float:
        config = suggest_config(trial, epochs, seed, space)
        flops = training_flops_per_sample(build_model(config))  # the trial's cost, comparable
        trial.set_user_attr("flops_per_sample", flops)  # across families (as bench counts it)
        params = {**trial.params, "family": config.family, "flops_per_sample": flops,
                  "precision": forward_precision(config, device)}  # fmt: skip
        run = tracker.start_trial(trial.number, params)
        trial.set_user_attr("mlflow_run_id", run.run_id)
        failed = lambda reason: trial.set_user_attr("fail_reason", reason)  # noqa: E731
        taken_over = (optuna.exceptions.UpdateFinishedTrialError,)  # its run is not ours now
        with lifecycle(run, {optuna.TrialPruned: "PRUNED"}, failed, leave=taken_over):
            if datasets:
                run.log_datasets(datasets)
            return train(trial, config, run)

    def log_checkpoint(trial: optuna.Trial, config, run, best: dict) -> str:
        """The best epoch's network as a raw-pixel model (`trial-N`), its validation metrics
        linked to it and to the validation dataset. Returns its model id."""
        net = build_model(config)
        net.load_state_dict(best["weights"])
        model = PixelClassifier(net.cpu(), data.mean, data.std).eval()
        example = data.val.x[:8].cpu().float()  # raw pixels 0-255, (8, 784)
        linked = {k: best[k] for k in ("val_accuracy", "val_loss")}
        return run.log_model(
            model, f"trial-{trial.number}", best["epoch"], example,
            (linked, best["stamp"], datasets["validation"]), trial.params,
        )  # fmt: skip

    return objective


def mark_worker(trial: optuna.Trial) -> None:
    """Which process runs `trial`: the user attributes `host` and `pid`, by which the workers of
    a machine free the places of trials whose process died (`workers.fail_dead_trials`)."""
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
