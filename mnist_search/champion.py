"""The champion: a study's best trials retrained on all 60,000 training images, tested once, and
shipped. Three steps under one `ChampionConfig`, each returning what the next one takes:

    retrain(configs, data, ...)  -> list of models   one PixelClassifier per seed, the first ships
    test_once(models, data_dir)  -> Scores           the test set read once, every model scored
    ship.ship(run, model, ...)   -> Shipped          export folder, ONNX check, registry version

`crown` runs them inside one tracked MLflow run, nested under the study's parent run.
`python -m mnist_search.champion --study-name NAME` crowns a study a former search made.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mnist_search import cli, interrupts
from mnist_search.data import SPLIT_SEED, VAL_SIZE, Data, load_data, stratified_split
from mnist_search.fetch import data_digest, image_count, load_images, raw_dir
from mnist_search.model import PixelClassifier, training_flops_per_sample
from mnist_search.ship import ModelCard, Shipped, ship
from mnist_search.space import (
    BEST_EPOCH,
    CNN_STAGES,
    DEFAULT_SPACE,
    DEFAULTS,
    SEARCHED,
    config_from_params,
    default_name,
    defaults_help,
    study_space,
)
from mnist_search.storage import DEFAULT_STORAGE
from mnist_search.studies import BadInput
from mnist_search.tracking import QUIET, Run, env_defaults, lifecycle, mnist_datasets
from mnist_search.train import TrainConfig, fit, forward_precision


@dataclass(frozen=True)
class ChampionConfig:
    """How the champion is made and named: the champion flags of `study` and `champion`.
    Checked when made; `resolved` fills what was left out with the study's space's defaults."""

    ensemble: int | None = None  # the K best distinct trials, averaged; None: the space's
    retrain_epochs: int | str | None = None  # per member, or BEST_EPOCH; None: the space's
    retrain_depth: int | None = None  # conv blocks per stage of CNN members; None: the space's
    retrain_channels: tuple[int, ...] | None = None  # CNN members' widths, (): as searched;
    # None: the space's
    retrain_augment: float | str | None = None  # CNN members' augmentation strength, or
    # SEARCHED; None: the space's
    retrain_lr_scale: float | None = None  # each member retrains at its searched learning rate
    # times this; None: the space's
    seeds: int = 1  # retrain and test with this many seeds; only the first seed's model ships
    register_as: str | None = None  # the registered model's name; None: the study's

    def __post_init__(self):
        for flag in ("ensemble", "seeds"):
            value = getattr(self, flag)
            if value is not None and value < 1:
                raise BadInput(f"--{flag} must be at least 1, not {value}")
        epochs = self.retrain_epochs
        if epochs is not None and epochs != BEST_EPOCH and epochs < 1:
            raise BadInput(f"--retrain-epochs must be at least 1, not {epochs}")
        if self.retrain_depth is not None and self.retrain_depth < 1:
            raise BadInput(f"--retrain-depth must be at least 1, not {self.retrain_depth}")
        if self.retrain_channels is not None:
            widths = tuple(self.retrain_channels)
            object.__setattr__(self, "retrain_channels", widths)
            if widths and (len(widths) != CNN_STAGES or min(widths) < 1):
                raise BadInput(
                    f"--retrain-channels {' '.join(map(str, widths))}: give {CNN_STAGES} widths "
                    "of at least 1, one per conv stage, or 'searched'"
                )
        augment = self.retrain_augment
        if augment not in (None, SEARCHED) and not 0 <= augment <= 1:
            raise BadInput(
                f"--retrain-augment is a strength from 0 to 1 or 'searched', not {augment}"
            )
        scale = self.retrain_lr_scale
        if scale is not None and not 0 < scale < math.inf:
            raise BadInput(f"--retrain-lr-scale must be a positive factor, not {scale}")
        if self.register_as is not None and not self.register_as.strip():
            raise BadInput("--register-as is empty; give it a name")

    def resolved(self, space: str, study_name: str) -> ChampionConfig:
        defaults, channels = DEFAULTS[space], self.retrain_channels
        return dataclasses.replace(
            self,
            ensemble=self.ensemble or defaults.ensemble,
            retrain_epochs=self.retrain_epochs or defaults.retrain_epochs,
            retrain_depth=self.retrain_depth or defaults.retrain_depth,
            retrain_channels=defaults.retrain_channels if channels is None else channels,
            retrain_augment=(
                defaults.retrain_augment if self.retrain_augment is None else self.retrain_augment
            ),
            retrain_lr_scale=self.retrain_lr_scale or defaults.retrain_lr_scale,
            register_as=self.register_as or study_name,
        )


@dataclass
class Scores:
    """What the test set says of each retrained model (one per seed; the first ships)."""

    images: torch.Tensor  # (N, 784) raw uint8 test pixels
    labels: torch.Tensor  # (N,)
    probs: list[torch.Tensor]  # each model's (N, 10) probabilities

    def accuracy(self, i: int = 0) -> float:
        return (self.predictions(i) == self.labels).float().mean().item()

    def predictions(self, i: int = 0) -> torch.Tensor:
        return self.probs[i].argmax(1)

    def confusion(self, i: int = 0) -> torch.Tensor:
        """(10, 10): row = true digit, column = predicted."""
        confusion = torch.zeros(10, 10, dtype=torch.long)
        ones = torch.ones_like(self.labels)
        return confusion.index_put_((self.labels, self.predictions(i)), ones, accumulate=True)

    def per_class(self, i: int = 0) -> list[float]:
        confusion = self.confusion(i)
        return (confusion.diag() / confusion.sum(1)).tolist()

    def misclassified(self, i: int = 0) -> list[int]:
        return (self.predictions(i) != self.labels).nonzero().squeeze(1).tolist()


@dataclass
class Champion:
    """What `crown` made: its trials, its test figures, and where it was shipped."""

    trials: list[int]
    metrics: dict[str, float]  # test_accuracy, test_errors, retrain_seconds, epochs, ...
    shipped: Shipped
    run_id: str

    @property
    def test_accuracy(self) -> float:
        return self.metrics["test_accuracy"]

    def summary(self) -> str:
        name = "-".join(map(str, self.trials))
        what = f"trial {name}" if len(self.trials) == 1 else f"ensemble of trials {name}"
        m, shipped = self.metrics, self.shipped
        seeds = f" x {m['seeds']:.0f} seeds" if "seeds" in m else ""
        lines = [
            f"champion: {what}, {m['epochs']:.0f} epochs{seeds} retrained on "
            f"{m['train_images']:,.0f} images in "
            f"{m['retrain_seconds']:.0f}s; test accuracy {m['test_accuracy']:.4f} "
            f"({m['test_errors']:.0f} wrong of {m['test_images']:,.0f})",
            f"registered as models:/{shipped.name}/{shipped.version} with alias @{shipped.alias}",
            f"exported to {shipped.export_dir}/",
        ]
        if "test_accuracy_seed_mean" in m:
            mean, low, high = (m[f"test_accuracy_seed_{k}"] for k in ("mean", "min", "max"))
            lines.append(
                f"over {m['seeds']:.0f} seeds: test accuracy mean {mean:.4f}, min {low:.4f}, "
                f"max {high:.4f}"
            )
        return "\n".join(lines)


def members_of(study, k: int) -> list:
    """The `k` best completed trials with distinct params, best first (fewer if the study has
    fewer): the members of an ensemble of `k`, chosen on validation accuracy alone."""
    from optuna.trial import TrialState

    best, seen = [], set()
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    for trial in sorted(complete, key=lambda t: t.value, reverse=True):
        key = tuple(sorted(trial.params.items()))
        if key not in seen:
            seen.add(key)
            best.append(trial)
    if not best:
        raise ValueError(f"study {study.study_name!r} has no completed trial to retrain")
    return best[:k]


def retrain_configs(
    study, members: list, epochs: int | str, depth: int = 1, channels: tuple[int, ...] = (),
    augment: float | str = SEARCHED, lr_scale: float = 1.0,
) -> list[TrainConfig]:  # fmt: skip
    """Each member's config rebuilt through the search space, with the study's own seed, for
    `epochs` epochs (its schedule stretched to them), or, for BEST_EPOCH, for the epoch count
    where its validation accuracy peaked, at its searched learning rate times `lr_scale`; a CNN
    member with `depth` conv blocks a stage and, if given, `channels` for its searched widths
    and `augment` for its searched strength."""
    seed, configs = study.user_attrs.get("seed", 0), []
    for t in members:
        config = config_from_params(
            t.params,
            t.user_attrs.get("best_epoch", t.user_attrs.get("epochs_trained"))
            if epochs == BEST_EPOCH
            else epochs,
            seed,
            study_space(study),
        )
        config = dataclasses.replace(config, lr=config.lr * lr_scale)
        if config.family == "cnn":
            config = dataclasses.replace(
                config,
                depth=depth,
                channels=channels or config.channels,
                augment=config.augment if augment == SEARCHED else augment,
            )
        configs.append(config)
    return configs


def retrain(
    configs: list[TrainConfig], data: Data, device, seeds: int = 1, cuda_graphs: bool = True,
    on_epoch_end=None,
) -> list[PixelClassifier]:  # fmt: skip
    """Step 1. For seeds offsets 0..seeds-1, every config trained on `data.train` with its seed
    + offset, averaged in one PixelClassifier; `on_epoch_end(member, epoch, metrics, net)` hears
    the first seed's epochs (the model that ships)."""
    models = []
    for offset in range(seeds):
        nets = []
        for i, config in enumerate(configs):
            seeded = dataclasses.replace(config, seed=config.seed + offset)
            hook = functools.partial(on_epoch_end, i) if on_epoch_end and offset == 0 else None
            nets.append(fit(seeded, data, device, hook, cuda_graphs).model.cpu())
            interrupts.check()
        models.append(PixelClassifier(nets, data.mean, data.std).eval())
    return models


def test_once(models: list[PixelClassifier], data_dir: Path) -> Scores:
    """Step 2. The 10,000 test images, read once, and every model's probabilities on them."""
    images, labels = load_images(data_dir, train=False)
    images = images.reshape(len(images), -1)  # (N, 784) raw uint8 pixels
    with torch.no_grad():
        probs = [model(images) for model in models]
    return Scores(images, labels, probs)


test_once.__test__ = False  # a pipeline step, not a test for pytest to collect


def score_metrics(scores: Scores) -> dict[str, float]:
    """The shipped model's test accuracy and errors, and the spread over seeds if several."""
    metrics = {
        "test_accuracy": scores.accuracy(),
        "test_errors": len(scores.misclassified()),
        "test_images": len(scores.labels),
    }
    if len(scores.probs) > 1:
        spread = [scores.accuracy(i) for i in range(len(scores.probs))]
        metrics |= {
            "seeds": len(spread),
            "test_accuracy_seed_mean": sum(spread) / len(spread),
            "test_accuracy_seed_min": min(spread),
            "test_accuracy_seed_max": max(spread),
        }
    return metrics


def log_scores(run: Run, scores: Scores, reports: Path) -> None:
    """On the champion's run: per-class accuracy, each seed's accuracy, the confusion matrix and
    the misclassified indices (`test/`), and the figures (`figures/`, also under `reports`)."""
    from mnist_search import figures

    run.log_metrics({f"test_accuracy_class_{d}": a for d, a in enumerate(scores.per_class())})
    for i in range(len(scores.probs)):
        run.log_metrics({"test_accuracy_by_seed": scores.accuracy(i)}, step=i)
    interrupts.check()
    confusion = scores.confusion().numpy()
    reports.mkdir(parents=True, exist_ok=True)
    figures.confusion_heatmap(confusion, reports / "confusion_matrix.png")
    figures.per_class_accuracy(scores.per_class(), reports / "per_class_accuracy.png")
    figures.confident_mistakes(
        scores.images, scores.labels, scores.probs[0], reports / "confident_mistakes.png"
    )
    run.log_artifacts(reports, "figures")
    interrupts.check()
    with tempfile.TemporaryDirectory() as tmp:
        import pandas as pd

        digits = range(10)
        table = pd.DataFrame(
            confusion, pd.Index(digits, name="true"), pd.Index(digits, name="predicted")
        )
        table.to_csv(f"{tmp}/confusion_matrix.csv")
        Path(tmp, "misclassified_test_indices.json").write_text(json.dumps(scores.misclassified()))
        run.log_artifacts(tmp, "test")


def champion_datasets(data_dir: Path, digest: str, labels: torch.Tensor) -> dict:
    """The champion run's inputs, by context: all 60,000 training images (what it trains on), the
    validation split that chose its members (`labels`: the training labels), the test images."""
    held_out = len(stratified_split(labels, VAL_SIZE, SPLIT_SEED)[1])
    counts = {"train": len(labels), "validation-split": held_out}
    parts = mnist_datasets(
        raw_dir(data_dir), digest, counts | {"test": image_count(data_dir, False)}
    )
    return {
        "training": parts["train"],
        "validation": parts["validation-split"],
        "test": parts["test"],
    }


def crown(
    study, tracker, data_dir: Path, device, config: ChampionConfig = ChampionConfig(),
    cuda_graphs: bool = True, export_root: Path = Path("exports"),
) -> Champion:  # fmt: skip
    """Retrain the study's best trials as `config` says, test once, ship; the champion's MLflow
    run records each step. A Ctrl-C or SIGTERM caught by `interrupts.deferred()` stops it
    between two steps (or retrain epochs) as KeyboardInterrupt, with its run KILLED; any
    other error leaves it FAILED."""
    config = config.resolved(study_space(study), study.study_name)
    members = members_of(study, config.ensemble)
    configs = retrain_configs(
        study, members, config.retrain_epochs, config.retrain_depth, config.retrain_channels,
        config.retrain_augment, config.retrain_lr_scale,
    )  # fmt: skip
    # precision "auto" resolved here, so that the run and the export say what trained
    configs = [dataclasses.replace(c, precision=forward_precision(c, device)) for c in configs]
    numbers = [t.number for t in members]
    name = "-".join(map(str, numbers))
    run = tracker.start_run("champion", f"champion-trial{'s' if len(members) > 1 else ''}-{name}")
    with lifecycle(run):
        params = {"trials": name, **dataclasses.asdict(config)}
        for i, member in enumerate(configs):  # one member: its params as they are
            prefix = f"member_{i}." if len(configs) > 1 else ""
            params |= {f"{prefix}{k}": v for k, v in member.to_dict().items()}
        run.log_params(params)
        interrupts.check()

        def on_epoch_end(member, epoch, metrics, _net):
            if len(configs) > 1:
                metrics = {f"member_{member}.{k}": v for k, v in metrics.items() if k != "epoch"}
            run.log_metrics(metrics, step=epoch)
            interrupts.check()

        start = time.perf_counter()
        data = load_data(data_dir, device, val_size=0)
        digest = data_digest(data_dir)
        inputs = champion_datasets(data_dir, digest, data.train.y.cpu())
        run.log_datasets(inputs)
        models = retrain(configs, data, device, config.seeds, cuda_graphs, on_epoch_end)
        seconds = time.perf_counter() - start
        interrupts.check()

        scores = test_once(models, data_dir)
        model = models[0]
        metrics = score_metrics(scores) | {
            "val_accuracy_in_search": members[0].value,
            "train_images": len(data.train),
            "retrain_seconds": seconds,
            "epochs": sum(c.epochs for c in configs),  # of the shipped model's members
            "parameters": sum(p.numel() for p in model.parameters()),
            "flops_per_sample": sum(training_flops_per_sample(net) for net in model.nets),
        }
        stamp = run.log_metrics(metrics)
        tracker.log_parent_metrics({"test_accuracy": metrics["test_accuracy"]})  # study's row
        log_scores(run, scores, Path("reports") / config.register_as / "champion")
        interrupts.check()

        card = ModelCard(config.register_as, study.study_name, numbers, configs, metrics, digest)
        test_figures = {k: metrics[k] for k in ("test_accuracy", "test_errors")}
        shipped = ship(
            run, model, card, scores.images, export_root / config.register_as,
            (test_figures, stamp, inputs["test"]),
        )  # fmt: skip
    return Champion(numbers, metrics, shipped, run.run_id)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mnist_search.champion",
        description="Retrain a study's best trial (or best trials, as an ensemble) on all "
        "training data, test once, export and register it.",
        formatter_class=cli.HelpFormatter,
    )
    cli.add_study_flags(p, default_name(DEFAULT_SPACE), DEFAULT_STORAGE)
    cli.add_data_dir_flag(p)
    cli.add_device_flags(p)
    cli.add_champion_flags(p, defaults_help)
    return p


def main(argv: list[str] | None = None) -> int:
    from mnist_search.space import StaleParams, check_rebuildable
    from mnist_search.studies import open_existing

    p = build_parser()
    args = p.parse_args(argv)
    try:
        config = ChampionConfig(**{name: getattr(args, name) for name in cli.CHAMPION_FLAGS})
        study, tracker = open_existing(args.study_name, args.storage, args.tracking_uri)
    except BadInput as e:
        p.error(str(e))
    data_dir, device = cli.data_dir(p, args), cli.device(p, args)
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        p.error(f"--study-name {args.study_name!r} has no completed trial to retrain; run it first")
    try:
        check_rebuildable(study)
    except StaleParams as e:
        p.error(f"--study-name {args.study_name!r}: {e}")
    if not cli.mnist_ready(data_dir):  # before the champion's run is made
        return 1
    with interrupts.deferred(), env_defaults(QUIET):  # Ctrl-C stops between steps
        try:
            champion = crown(study, tracker, data_dir, device, config, args.cuda_graphs)
        except KeyboardInterrupt:
            print("interrupted: the champion's run ended KILLED; rerun to crown", file=sys.stderr)
            return interrupts.exit_code()
    print(champion.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
