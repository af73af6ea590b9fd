"""The search space: the one place where `trial.suggest_*` appears.

Three spaces: `mlp` (the original project's fully connected nets on plain pixels, unchanged),
`cnn` (small convolutional nets with augmented training batches) and `all` (the sampler also
picks the family). The champion rebuilds the best trial's config through this same function
(from the trial's stored params, via `optuna.trial.FixedTrial`), so the retrain can never drift
from the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mnist_search.train import TrainConfig

if TYPE_CHECKING:  # optuna is imported where used: `study --help` reads this module's names
    import optuna

SPACES = ("mlp", "cnn", "all")
DEFAULT_SPACE = "cnn"  # the best test accuracy within the MLP search's wall time (docs/results.md)
BATCH_SIZES = [128, 256, 512]  # below 128, steps are overhead-bound on a 2-core CPU
BEST_EPOCH = "best"  # a member retrains for the epoch count where its validation peaked
SEARCHED = "searched"  # a member retrains with its trial's own augmentation strength


@dataclass(frozen=True)
class SpaceDefaults:
    """What a flag left out means in a space."""

    epochs: int  # most epochs per trial
    pruner: str  # search.PRUNERS: how trials stop early
    ensemble: int  # how many best trials the champion averages
    retrain_epochs: int | str  # epochs each member retrains for, or BEST_EPOCH
    retrain_depth: int = 1  # conv blocks per stage of each CNN member retrained (the search's: 1)
    retrain_channels: tuple[int, ...] = ()  # each CNN member's conv widths retrained; (): searched
    retrain_augment: float | str = SEARCHED  # each CNN member's augmentation strength retrained
    retrain_lr_scale: float = 1.0  # each member retrains at its searched learning rate times this


CNN_STAGES = 2  # conv stages of the CNN space's nets: channels_0, channels_1 below

# `mlp` keeps the original search and its champion exactly. CNNs: 3 epochs per trial, pruned by
# successive halving, then the 4 best trials retrained for 10 epochs each (their cosine
# stretched), deeper and wider than searched (2 convs a stage, 24-48 channels) and at
# augmentation strength 0.5. The search cannot afford such nets; its best recipes can: on
# validation, 2 members so made scored 0.1 point over 4 as searched ("Members retrained deeper
# and wider"), augmentation 0.5 +0.04 over the trials' weaker strengths ("Stronger
# augmentation"). Trials of 3 epochs found recipes as good for these members as trials of 5
# (of 2, 0.03 point worse), in 0.86x the search's time, which pays for most of a third member:
# +0.03 on validation (docs/search-space.md, "A shorter search and a third member"); a fourth
# added 0.03 more on every seed, paid for where float32 replaced a slower bf16 ("A fourth
# member"). The members retrain at half their trials' learning rate, which was found for 3
# epochs of smaller nets: +0.03 over 5 seeds at the same cost ("Members at half their searched
# learning rate").
CNN_DEFAULTS = SpaceDefaults(
    epochs=3, pruner="halving", ensemble=4, retrain_epochs=10, retrain_depth=2,
    retrain_channels=(24, 48), retrain_augment=0.5, retrain_lr_scale=0.5,
)  # fmt: skip
DEFAULTS = {
    "mlp": SpaceDefaults(epochs=10, pruner="hyperband", ensemble=1, retrain_epochs=BEST_EPOCH),
    "cnn": CNN_DEFAULTS,
    "all": CNN_DEFAULTS,
}


def default_name(space: str) -> str:
    """The default name of a study and of its registered model: `mnist-mlp` for the original
    project's MLP search, as before there were other spaces; `mnist-cnn`, `mnist-all`."""
    return f"mnist-{space}"


def defaults_help(field: str) -> str:
    """`mlp: 10, cnn: 5, all: 5`: what leaving the flag of `field` out means in each space."""

    def shown(value) -> str:
        if value in ((), SEARCHED):
            return "as searched"
        if isinstance(value, tuple):
            return "-".join(map(str, value))
        return "the trial's best epoch" if value == BEST_EPOCH else str(value)

    return ", ".join(f"{space}: {shown(getattr(DEFAULTS[space], field))}" for space in SPACES)


def suggest_config(trial: optuna.Trial, epochs: int, seed: int, space: str = "mlp") -> TrainConfig:
    if space not in SPACES:
        raise ValueError(f"unknown search space {space!r}; use one of {SPACES}")
    family = trial.suggest_categorical("family", ["mlp", "cnn"]) if space == "all" else space
    if family == "mlp":
        n_layers = trial.suggest_int("n_layers", 1, 3)
        # log scale: 128 -> 256 matters as much as 512 -> 1024; 1024 caps the CPU cost
        net = {
            "hidden": [
                trial.suggest_int(f"width_{i}", 128, 1024, log=True) for i in range(n_layers)
            ]
        }
    else:
        # Widths capped so that an epoch costs about what a wide MLP's does: on 2 CPU cores an
        # 8-16 net trains about as fast as the MLP 784-512-256, a 24-48 one 4x slower
        net = {
            "channels": [
                trial.suggest_int("channels_0", 8, 16, log=True),
                trial.suggest_int("channels_1", 16, 48, log=True),
            ],
            "kernel": trial.suggest_categorical("kernel", [3, 5]),
            "hidden": [trial.suggest_int("head_width", 32, 192, log=True)],
        }
    return TrainConfig(
        family=family,
        **net,
        dropout=trial.suggest_float("dropout", 0.0, 0.5),
        activation=trial.suggest_categorical("activation", ["relu", "gelu", "silu"]),
        optimizer=trial.suggest_categorical("optimizer", ["adam", "adamw"]),
        lr=trial.suggest_float("lr", 2e-4, 1e-2, log=True),
        weight_decay=trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
        # not searched for CNNs, measured side by side instead (docs/search-space.md): cosine
        # beat a constant lr at the same config, and bf16 autocast trained 1.1-1.3x faster on an
        # AMD CPU with native bf16 at the same validation accuracy, but 1.1-1.5x slower on an
        # Intel one without AMX and 7-9x slower without native bf16 (so `auto`, which follows
        # machine.bf16_trains_faster); the MLP search stays as it was
        schedule=(
            trial.suggest_categorical("schedule", ["constant", "cosine"])
            if family == "mlp"
            else "cosine"
        ),
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.1),
        # the original MLP search trains on plain pixels: its space stays as it was
        augment=0.0 if space == "mlp" else trial.suggest_float("augment", 0.0, 1.0),
        batch_size=trial.suggest_categorical("batch_size", BATCH_SIZES),
        precision="fp32" if family == "mlp" else "auto",
        epochs=epochs,
        seed=seed,
    )


class StaleParams(ValueError):
    """A trial's params include some this version of the space no longer samples: the trial
    was made by an earlier mnist_search, and rebuilding it here would train something else."""


def config_from_params(params: dict, epochs: int, seed: int, space: str = "mlp") -> TrainConfig:
    """The config a finished trial trained, rebuilt from its params by the same function.
    Raises StaleParams where they do not fit the space: params it does not sample (FixedTrial
    would ignore them), or one it samples missing."""
    import optuna

    trial = optuna.trial.FixedTrial(params)
    fix = "the study was made by an earlier mnist_search; start a new --study-name"
    try:
        config = suggest_config(trial, epochs, seed, space)
    except ValueError as e:  # FixedTrial: a param the space samples is not there
        misfit = f"trial params do not fit this version's --space {space} ({e})"
        raise StaleParams(f"{misfit}: {fix}") from e
    if stale := sorted(set(params) - set(trial.params)):
        raise StaleParams(f"trial params {stale} are not in this version's --space {space}: {fix}")
    return config


def study_space(study: optuna.Study) -> str:
    """The space a study samples; studies made before there were several spaces are `mlp`."""
    return study.user_attrs.get("space", "mlp")


def check_rebuildable(study: optuna.Study) -> None:
    """Raise StaleParams if a completed trial of `study` could not be rebuilt in its space."""
    from optuna.trial import TrialState

    space = study_space(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        config_from_params(trial.params, 1, 0, space)
