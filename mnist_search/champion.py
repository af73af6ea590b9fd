"""The champion: retrain the best trial on all 60,000 training images, test it once, export it,
register it in the MLflow Model Registry.

Runs at the end of every study, or on demand:
`python -m mnist_search.champion --study-name NAME [--storage ...] [--tracking-uri ...]`.
This is the only place the test set is read.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient

from mnist_search import interrupts
from mnist_search.cli import (
    DEFAULT_SPACE,
    SPACE_DEFAULTS,
    HelpFormatter,
    add_champion_flags,
    add_device_flags,
    check_champion_flags,
    default_name,
)
from mnist_search.data import load_data
from mnist_search.fetch import data_digest, load_images
from mnist_search.model import PixelClassifier, training_flops_per_sample
from mnist_search.space import StaleParams, check_rebuildable, config_from_params, study_space
from mnist_search.storage import DEFAULT_STORAGE
from mnist_search.tracking import env_defaults, lifecycle
from mnist_search.train import TrainConfig, fit

PREDICTION_DEVICE = "MLFLOW_DEFAULT_PREDICTION_DEVICE"  # where MLflow's pyfunc loads a model
# The registered model's description: Markdown, one line per paragraph (the registry page
# keeps line breaks).
MODEL_DESCRIPTION = "\n\n".join(
    [
        "The best network (or ensemble of networks) an `mnist_search` Optuna study found for "
        "MNIST digits, retrained on all 60,000 training images and tested once on the 10,000 "
        "test images.",
        "**@champion**: version {version}, test accuracy {accuracy}. The alias goes to a new "
        "version only when its test accuracy is at least the champion's; a worse one becomes "
        "**@challenger**. Each version's description gives its study, trial, architecture, "
        "parameters, test accuracy and data.",
        "**Input**: raw pixels, float32, shape (N, 784): N 28x28 grayscale images flattened row "
        "by row, values 0-255 (the normalization is inside the model). **Output**: float32, "
        "shape (N, 10), the class probabilities; the digit is their argmax.",
        '**Load**: `mlflow.pyfunc.load_model("models:/{name}@champion").predict(x)`, or '
        "`mlflow.pytorch.load_model(...)` for a PyTorch module. Saved as `pt2` (torch.export): "
        "loading runs no pickle and needs no `mnist_search`. On a GPU machine load the pyfunc "
        'with `model_config={{"device": "cpu"}}`. Serve: '
        "`mlflow models serve -m models:/{name}@champion --env-manager local`.",
    ]
)


def test_report(model: PixelClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy, per-class accuracy, confusion matrix and mistakes of `model` on raw images."""
    with torch.no_grad():
        probs = model(images)  # (N, 10)
    pred = probs.argmax(1)
    confusion = torch.zeros(10, 10, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    wrong = (pred != labels).nonzero().squeeze(1)
    return {
        "accuracy": (pred == labels).float().mean().item(),
        "per_class": (confusion.diag() / confusion.sum(1)).tolist(),
        "confusion": pd.DataFrame(
            confusion.numpy(),
            index=pd.Index(range(10), name="true"),
            columns=pd.Index(range(10), name="predicted"),
        ),
        "misclassified": wrong.tolist(),
        "probs": probs,
    }


def model_figures(report: dict, images, labels, out: Path) -> Path:
    """Confusion heatmap, per-class accuracy and the most confident mistakes, in out/champion."""
    from mnist_search import report as figures

    folder = out / "champion"
    folder.mkdir(parents=True, exist_ok=True)
    figures.confusion_heatmap(report["confusion"].to_numpy(), folder / "confusion_matrix.png")
    figures.per_class_accuracy(report["per_class"], folder / "per_class_accuracy.png")
    figures.confident_mistakes(images, labels, report["probs"], folder / "confident_mistakes.png")
    return folder


def export_folder(model: PixelClassifier, meta: dict, test_images, out: Path):
    """Weights (weights_only-loadable), config and ONNX; loads without this package."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "weights.pt")
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    example = test_images[:8].float()
    try:
        torch.onnx.export(
            copy.deepcopy(model),  # the exporter can leave its tracing hooks on what it is given
            (example,),
            str(out / "model.onnx"),
            input_names=["pixels"],
            output_names=["probabilities"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
        )
    except ImportError as e:
        print(f"ONNX export skipped ({e}); install the [onnx] extra", file=sys.stderr)
    return out


def onnx_max_error(model: PixelClassifier, onnx_path: Path, images: torch.Tensor) -> float | None:
    """Largest absolute difference between ONNX Runtime's and PyTorch's probabilities; None,
    with a note, where ONNX Runtime is not installed (the export needs only `onnx`)."""
    try:
        import onnxruntime
    except ImportError as e:
        print(f"ONNX check skipped ({e}); install the [onnx] extra", file=sys.stderr)
        return None

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = images.reshape(len(images), -1).float().numpy()
    (onnx_probs,) = session.run(None, {"pixels": x})
    with torch.no_grad():
        torch_probs = model(torch.from_numpy(x)).numpy()
    return float(np.abs(onnx_probs - torch_probs).max())


def version_description(tags: dict, configs: list[TrainConfig], parameters: int) -> str:
    """A registered version's description (Markdown): what it is, how good, from what. An
    ensemble's parameter table has one column per member."""
    dicts = [c.to_dict() for c in configs]
    rows = "\n".join(f"| `{k}` | " + " | ".join(str(d[k]) for d in dicts) + " |" for k in dicts[0])
    what = (
        f"Trial {tags['trial']}"
        if len(configs) == 1
        else (
            f"An ensemble (mean of the probabilities) of trials {tags['trial'].replace('-', ', ')}"
        )
    )
    architecture = " + ".join(c.describe() for c in configs)
    return (
        # plain text first: the registry's versions table shows the start, unrendered
        f"Test accuracy {float(tags['test_accuracy']):.2%} ({tags['test_accuracy']}) on the "
        f"10,000 MNIST test images.\n\n{what} of the Optuna study "
        f"`{tags['study']}`, retrained on all 60,000 training images (data digest "
        f"`{tags['data_digest']}`).\n\nArchitecture: {architecture}; {parameters:,} parameters."
        f"\n\n| parameter | {' | '.join(f'trial {n}' for n in tags['trial'].split('-'))} |\n"
        f"|---|{'---|' * len(configs)}\n{rows}\n"
    )


def register(
    client: MlflowClient,
    name: str,
    run_id: str,
    model: PixelClassifier,
    example,
    tags: dict,
    description: str = "",
):
    """Log with the PyTorch flavor and register; the alias goes to the better model. The
    registered model's description names the champion; the version gets `description`."""
    from mlflow.models import infer_signature

    x = example.reshape(len(example), -1).float().numpy()  # (N, 784) raw pixels 0-255
    with torch.no_grad():
        probs = model(torch.from_numpy(x)).numpy()
    # MLflow checks the input example by loading the model back, on the GPU when there is one,
    # but the exported weights live on the CPU: run that check (only) on the CPU.
    with mlflow.start_run(run_id=run_id), env_defaults({PREDICTION_DEVICE: "cpu"}):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(x, probs),
            input_example=x[:2],
            # pt2 (torch.export): loading runs no pickle and needs no mnist_search installed
            serialization_format="pt2",
            registered_model_name=name,
        )
    version = info.registered_model_version
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    try:
        current = client.get_model_version_by_alias(name, "champion")
        current_accuracy = float(current.tags.get("test_accuracy", "nan"))
    except mlflow.exceptions.MlflowException:
        current, current_accuracy = None, float("nan")
    new_accuracy = float(tags["test_accuracy"])
    if current is None or not new_accuracy < current_accuracy:
        alias = "champion"
    else:
        alias = "challenger"
    client.set_registered_model_alias(name, alias, str(version))
    if description:
        client.update_model_version(name, str(version), description)
    champion_version, champion_accuracy = (
        (version, new_accuracy) if alias == "champion" else (current.version, current_accuracy)
    )
    text = MODEL_DESCRIPTION.format(
        name=name, version=champion_version, accuracy=f"{champion_accuracy:.2%}"
    )
    client.update_registered_model(name, text)
    return str(version), alias


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


def retrain_configs(study, members: list, epochs: int | None = None) -> list[TrainConfig]:
    """Each member's config rebuilt through the search space, with the study's own seed, for
    `epochs` epochs (its schedule stretched to them), or by default for the epoch count where
    its validation accuracy peaked."""
    seed = study.user_attrs.get("seed", 0)
    return [
        config_from_params(
            t.params,
            epochs or t.user_attrs.get("best_epoch", t.user_attrs.get("epochs_trained")),
            seed,
            study_space(study),
        )
        for t in members
    ]


def retrain(configs, data, device, cuda_graphs: bool, on_epoch_end=None) -> PixelClassifier:
    """The shipped model: each config trained on `data.train`, averaged in one PixelClassifier."""
    nets = []
    for i, config in enumerate(configs):
        hook = None if on_epoch_end is None else functools.partial(on_epoch_end, i)
        nets.append(fit(config, data, device, hook, cuda_graphs).model.cpu())
    return PixelClassifier(nets, data.mean, data.std).eval()


def crown(
    study,
    tracker,
    data_dir: Path,
    device,
    register_as: str | None = None,
    export_root: Path = Path("exports"),
    cuda_graphs: bool = True,
    ensemble: int | None = None,
    retrain_epochs: int | None = None,
    seeds: int = 1,
) -> dict:
    """Retrain the study's `ensemble` best trials on all training images, each for
    `retrain_epochs`, test once, export, register as `register_as` (default: the study's name).
    `ensemble` and `retrain_epochs` default to those of the study's space (cli.SPACE_DEFAULTS).
    With `seeds` > 1, the same recipe is also retrained with
    seeds + 1, + 2, ... and tested, to report the spread of test accuracy over seeds; only the
    first model ships.

    A Ctrl-C or SIGTERM caught by `interrupts.deferred()` stops it between two steps (or
    retrain epochs) as KeyboardInterrupt, with its run KILLED; any other error leaves it FAILED.
    """
    register_as = register_as or study.study_name
    defaults = SPACE_DEFAULTS[study_space(study)]
    members = members_of(study, ensemble or defaults["ensemble"])
    configs = retrain_configs(study, members, retrain_epochs or defaults["retrain_epochs"])
    numbers = [t.number for t in members]
    name = "-".join(map(str, numbers))
    run = tracker.start_run("champion", f"champion-trial{'s' if len(members) > 1 else ''}-{name}")
    with lifecycle(run):
        params = {"trials": name, "ensemble": len(members), "seeds": seeds}
        for i, config in enumerate(configs):  # one member: its params as they are
            prefix = f"member_{i}." if len(configs) > 1 else ""
            params |= {f"{prefix}{k}": v for k, v in config.to_dict().items()}
        run.log_params(params)
        interrupts.check()
        start = time.perf_counter()
        data = load_data(data_dir, device, val_size=0)

        def on_epoch_end(member, epoch, metrics, _model):
            if len(configs) > 1:
                metrics = {f"member_{member}.{k}": v for k, v in metrics.items() if k != "epoch"}
            run.log_metrics(metrics, step=epoch)
            interrupts.check()

        model = retrain(configs, data, device, cuda_graphs, on_epoch_end)
        retrain_seconds = time.perf_counter() - start
        interrupts.check()

        images, labels = load_images(data_dir, train=False)  # the one read of the test set
        images = images.reshape(len(images), -1)  # (N, 784) raw uint8 pixels
        report = test_report(model, images, labels)
        metrics = {
            "test_accuracy": report["accuracy"],
            "test_errors": len(report["misclassified"]),
            "val_accuracy_in_search": members[0].value,
            "retrain_seconds": retrain_seconds,
            "epochs": sum(c.epochs for c in configs),
            "parameters": sum(p.numel() for p in model.parameters()),
            "flops_per_sample": sum(training_flops_per_sample(net) for net in model.nets),
        }
        if seeds > 1:  # the spread: the same recipe, other seeds; none of these ships
            spread = [report["accuracy"]]
            for offset in range(1, seeds):
                other = [dataclasses.replace(c, seed=c.seed + offset) for c in configs]
                spread.append(
                    test_report(retrain(other, data, device, cuda_graphs), images, labels)[
                        "accuracy"
                    ]
                )
            metrics |= {
                "test_accuracy_seed_mean": sum(spread) / len(spread),
                "test_accuracy_seed_min": min(spread),
                "test_accuracy_seed_max": max(spread),
            }
            for offset, accuracy in enumerate(spread):
                run.log_metrics({"test_accuracy_by_seed": accuracy}, step=offset)
        run.log_metrics(metrics)
        tracker.log_parent_metrics({"test_accuracy": report["accuracy"]})  # the study's row
        per_class = enumerate(report["per_class"])
        run.log_metrics({f"test_accuracy_class_{digit}": acc for digit, acc in per_class})
        interrupts.check()
        figures = model_figures(report, images, labels, Path("reports") / register_as)
        run.log_artifacts(figures, "figures")
        interrupts.check()
        with tempfile.TemporaryDirectory() as tmp:
            report["confusion"].to_csv(f"{tmp}/confusion_matrix.csv")
            Path(tmp, "misclassified_test_indices.json").write_text(
                json.dumps(report["misclassified"])
            )
            run.log_artifacts(tmp, "test")
        interrupts.check()

        meta = {
            "members": [
                {"trial": t.number, "config": c.to_dict()}
                for t, c in zip(members, configs, strict=True)
            ],
            "mean": data.mean,
            "std": data.std,
            "input": "raw pixels 0-255: model.onnx takes (N, 784) float32; weights.pt fits "
            "mnist_search.model.PixelClassifier, which also takes (N, 28, 28) and uint8",
            "output": "class probabilities (N, 10), the mean of the members'; the digit is "
            "their argmax",
            "study": study.study_name,
        }
        out = export_folder(model, meta, images, export_root / register_as)
        if (out / "model.onnx").exists():
            error = onnx_max_error(model, out / "model.onnx", images)
            if error is not None:
                metrics["onnx_max_abs_error"] = error
                run.log_metrics({"onnx_max_abs_error": error})
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        run.log_artifacts(out, "export")
        interrupts.check()

        tags = {
            "study": study.study_name,
            "trial": name,
            "family": "+".join(sorted({c.family for c in configs})),
            "test_accuracy": f"{report['accuracy']:.6f}",
            "data_digest": data_digest(data_dir),
        }
        description = version_description(tags, configs, metrics["parameters"])
        version, alias = register(
            run.client, register_as, run.run_id, model, images[:8], tags, description
        )
    what = f"trial {name}" if len(members) == 1 else f"ensemble of trials {name}"
    print(
        f"champion: {what}, {metrics['epochs']} epochs retrained on 60,000 images in "
        f"{retrain_seconds:.0f}s; test accuracy {report['accuracy']:.4f} "
        f"({metrics['test_errors']} wrong of {len(labels):,})\n"
        f"registered as models:/{register_as}/{version} with alias @{alias}\n"
        f"exported to {out}/"
    )
    if seeds > 1:
        print(
            f"over {seeds} seeds: test accuracy mean {metrics['test_accuracy_seed_mean']:.4f}, "
            f"min {metrics['test_accuracy_seed_min']:.4f}, "
            f"max {metrics['test_accuracy_seed_max']:.4f}"
        )
    return {**metrics, "version": version, "alias": alias, "export_dir": out, "run_id": run.run_id}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mnist_search.champion",
        description="Retrain a study's best trial (or best trials, as an ensemble) on all "
        "training data, test once, export and register it.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--study-name", default=default_name(DEFAULT_SPACE))
    p.add_argument("--storage", default=DEFAULT_STORAGE)
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--data-dir", type=Path, default=None)
    add_device_flags(p)
    add_champion_flags(p)
    args = p.parse_args(argv)
    check_champion_flags(p, args)
    if args.register_as == "":
        p.error("--register-as must not be empty")

    from mnist_search.cli import check_folder, open_existing_study
    from mnist_search.fetch import DataError, default_data_dir, ensure_mnist
    from mnist_search.train import resolve_device

    data_dir = args.data_dir or default_data_dir()
    check_folder(p, "--data-dir", data_dir)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        p.error(str(e))
    study, tracker = open_existing_study(p, args.study_name, args.storage, args.tracking_uri)
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        p.error(f"--study-name {args.study_name!r} has no completed trial to retrain; run it first")
    try:
        check_rebuildable(study)
    except StaleParams as e:
        p.error(f"--study-name {args.study_name!r}: {e}")
    try:  # before the champion's run is made: unverified or missing files end it here
        ensure_mnist(data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with interrupts.deferred():  # Ctrl-C and `kill` stop between steps, never mid-write
        try:
            crown(
                study, tracker, data_dir, device, args.register_as,
                cuda_graphs=args.cuda_graphs, ensemble=args.ensemble,
                retrain_epochs=args.retrain_epochs, seeds=args.seeds,
            )  # fmt: skip
        except KeyboardInterrupt:
            print("interrupted: the champion's run ended KILLED; rerun to crown", file=sys.stderr)
            return interrupts.exit_code()
    return 0


if __name__ == "__main__":
    sys.exit(main())
