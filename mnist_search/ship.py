"""Ship a champion: the export folder (weights, config, ONNX checked against PyTorch), then the
MLflow logged model and its registry version, whose alias follows `choose_alias`.

`ship` is the champion's third step (see `champion`); a `ModelCard` says what is shipped.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch

from mnist_search import interrupts
from mnist_search.model import PixelClassifier
from mnist_search.tracking import Run
from mnist_search.train import TrainConfig

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


@dataclass
class ModelCard:
    """What is shipped: its registered name, the study and trials it came from, their configs,
    how it tested, and the data it was trained and tested on."""

    name: str
    study: str
    trials: list[int]
    configs: list[TrainConfig]
    metrics: dict[str, float]
    data_digest: str

    def tags(self) -> dict[str, str]:
        return {
            "study": self.study,
            "trial": "-".join(map(str, self.trials)),
            "family": "+".join(sorted({c.family for c in self.configs})),
            "test_accuracy": f"{self.metrics['test_accuracy']:.6f}",
            "data_digest": self.data_digest,
        }

    def meta(self, model: PixelClassifier) -> dict:
        """config.json of the export folder: enough to rebuild the model without this package."""
        return {
            "members": [
                {"trial": n, "config": c.to_dict()}
                for n, c in zip(self.trials, self.configs, strict=True)
            ],
            "mean": model.mean.item(),
            "std": model.std.item(),
            "input": "raw pixels 0-255: model.onnx takes (N, 784) float32; weights.pt fits "
            "mnist_search.model.PixelClassifier, which also takes (N, 28, 28) and uint8",
            "output": "class probabilities (N, 10), the mean of the members'; the digit is "
            "their argmax",
            "study": self.study,
        }

    def inference(self) -> str:
        """The measured cost of `model.onnx` on the CPU that exported it, as a sentence."""
        m = self.metrics
        if "onnx_ms_per_image_batch_1" not in m:
            return ""
        return (
            f" With ONNX Runtime on the CPU that exported it: "
            f"{m['onnx_ms_per_image_batch_1']:.2f} ms per image one at a time, "
            f"{m['onnx_images_per_s_batch_1000']:,.0f} images/s 1,000 at a time."
        )

    def description(self) -> str:
        """A registered version's description (Markdown): what it is, how good, from what. An
        ensemble's parameter table has one column per member."""
        dicts = [c.to_dict() for c in self.configs]
        rows = "\n".join(
            f"| `{k}` | " + " | ".join(str(d[k]) for d in dicts) + " |" for k in dicts[0]
        )
        numbers = ", ".join(map(str, self.trials))
        what = (
            f"Trial {numbers}"
            if len(self.trials) == 1
            else f"An ensemble (mean of the probabilities) of trials {numbers}"
        )
        accuracy = self.tags()["test_accuracy"]
        return (
            # plain text first: the registry's versions table shows the start, unrendered
            f"Test accuracy {float(accuracy):.2%} ({accuracy}) on the "
            f"{self.metrics['test_images']:,.0f} MNIST test images.\n\n{what} of the Optuna "
            f"study `{self.study}`, retrained on all 60,000 training images (data digest "
            f"`{self.data_digest}`).\n\nArchitecture: "
            f"{' + '.join(c.describe() for c in self.configs)}; "
            f"{self.metrics['parameters']:,.0f} parameters.{self.inference()}\n\n"
            f"| parameter | {' | '.join(f'trial {n}' for n in self.trials)} |\n"
            f"|---|{'---|' * len(self.configs)}\n{rows}\n"
        )


@dataclass
class Shipped:
    """Where a champion went: its registry version and alias, and its export folder."""

    name: str
    version: str
    alias: str  # champion | challenger
    export_dir: Path
    onnx_max_abs_error: float | None  # ONNX Runtime against PyTorch; None: not checked


def export_folder(model: PixelClassifier, meta: dict, example: torch.Tensor, out: Path) -> Path:
    """Weights (weights_only-loadable), config and ONNX; loads without this package."""
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "weights.pt")
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    try:
        torch.onnx.export(
            copy.deepcopy(model),  # the exporter can leave its tracing hooks on what it is given
            (example[:8].float(),),
            str(out / "model.onnx"),
            input_names=["pixels"],
            output_names=["probabilities"],
            dynamo=True,  # the torch.export-based exporter, which takes dynamic_shapes
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
        )
    except ImportError as e:
        print(f"ONNX export skipped ({e}); install onnx and onnxscript", file=sys.stderr)
    return out


def onnx_max_error(model: PixelClassifier, onnx_path: Path, images: torch.Tensor) -> float | None:
    """Largest absolute difference between ONNX Runtime's and PyTorch's probabilities; None,
    with a note, where ONNX Runtime is not installed (the export needs only `onnx`)."""
    try:
        import onnxruntime
    except ImportError as e:
        print(f"ONNX check skipped ({e}); install onnxruntime", file=sys.stderr)
        return None

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = images.reshape(len(images), -1).float().numpy()
    (onnx_probs,) = session.run(None, {"pixels": x})
    with torch.no_grad():
        torch_probs = model(torch.from_numpy(x)).numpy()
    return float(np.abs(onnx_probs - torch_probs).max())


def onnx_speed(onnx_path: Path, images: torch.Tensor) -> dict[str, float] | None:
    """What the exported model costs to run with ONNX Runtime on this machine's CPU: the median
    milliseconds per image one at a time (200 calls), and images per second 1,000 at a time
    (the median of 5 calls), after a warm-up. None where ONNX Runtime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    import statistics
    import time

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = images.reshape(len(images), -1)[:1000].float().numpy()

    def seconds(batch) -> float:
        start = time.perf_counter()
        session.run(None, {"pixels": batch})
        return time.perf_counter() - start

    seconds(x[:1])
    seconds(x)  # warm-up
    one = statistics.median(seconds(x[i % len(x) : i % len(x) + 1]) for i in range(200))
    many = statistics.median(seconds(x) for _ in range(5))
    return {"onnx_ms_per_image_batch_1": 1000 * one, "onnx_images_per_s_batch_1000": len(x) / many}


def choose_alias(new_accuracy: float, champion_accuracy: float | None) -> str:
    """`champion` for a new version at least as accurate as the current champion (or the first
    one), else `challenger`: the champion is never replaced by a worse model."""
    if champion_accuracy is None or not new_accuracy < champion_accuracy:
        return "champion"
    return "challenger"


def current_champion(client, name: str) -> tuple[str, float] | None:
    """(version, test accuracy) of `name`@champion, or None if there is none yet."""
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        return None
    return str(version.version), float(version.tags.get("test_accuracy", "nan"))


def register(
    run: Run, model: PixelClassifier, card: ModelCard, example, linked=None
) -> tuple[str, str]:
    """Log `model` on `run` as a logged model (pt2) and register it as `card.name`; the alias
    follows `choose_alias`. `linked` (metrics, when the run logged them, the dataset they were
    computed on) links those points to the model. Returns (version, alias)."""
    client = run.client
    x = example.reshape(len(example), -1)[:8].float()  # (N, 784) raw pixels 0-255
    model_id = run.log_model(model, card.name, 0, x, linked)
    try:
        client.create_registered_model(card.name)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    created = client.create_model_version(
        card.name, f"models:/{model_id}", run.run_id, card.tags(), model_id=model_id
    )
    version = str(created.version)
    current = current_champion(client, card.name)
    accuracy = float(card.tags()["test_accuracy"])
    alias = choose_alias(accuracy, None if current is None else current[1])
    client.set_registered_model_alias(card.name, alias, version)
    client.update_model_version(card.name, version, card.description())
    champion_version, champion_accuracy = (version, accuracy) if alias == "champion" else current
    text = MODEL_DESCRIPTION.format(
        name=card.name, version=champion_version, accuracy=f"{champion_accuracy:.2%}"
    )
    client.update_registered_model(card.name, text)
    return version, alias


def ship(
    run: Run, model: PixelClassifier, card: ModelCard, test_images, out: Path, linked=None
) -> Shipped:
    """Step 3. The export folder (ONNX checked on `test_images`) logged as `export/`, then the
    logged model (with the `linked` metrics, see `register`) and its registry version."""
    out = export_folder(model, card.meta(model), test_images, out)
    error, speed = None, None
    if (out / "model.onnx").exists():
        error = onnx_max_error(model, out / "model.onnx", test_images)
        speed = onnx_speed(out / "model.onnx", test_images)
    extra = ({} if error is None else {"onnx_max_abs_error": error}) | (speed or {})
    if extra:
        run.log_metrics(extra)
    card.metrics |= extra  # in metrics.json and the version's description
    (out / "metrics.json").write_text(json.dumps(card.metrics, indent=2))
    run.log_artifacts(out, "export")
    interrupts.check()
    version, alias = register(run, model, card, test_images, linked)
    return Shipped(card.name, version, alias, out, error)
