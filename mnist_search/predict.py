"""`python -m mnist_search.predict IMAGE [IMAGE ...]`: the digit in each image file.

Any size and color mode, dark-on-light or light-on-dark: each image is made the way MNIST was
made (digit scaled into a 20x20 box, centered by mass in 28x28, light on dark) and fed to the
model as raw 0-255 pixels; the model normalizes them itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from mnist_search import cli
from mnist_search.space import DEFAULT_SPACE, default_name
from mnist_search.storage import sqlite_path


class ImageError(ValueError):
    """An image file could not be read or holds no digit."""


def to_mnist(image: Image.Image) -> np.ndarray:
    """A PIL image -> (28, 28) uint8, light digit on a dark background, MNIST-style."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    pixels = np.asarray(image.convert("L"), dtype=np.float32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > 127:  # a light background: dark ink on paper
        pixels, border = 255 - pixels, 255 - border
    pixels = np.clip(pixels - np.median(border), 0, 255)  # background to 0, as in MNIST
    ink = pixels > 0.2 * pixels.max() if pixels.max() > 0 else np.zeros_like(pixels, bool)
    if not ink.any():
        raise ImageError("no digit found (the image is blank)")
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    crop = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = 20 / max(crop.shape)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    box = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.LANCZOS)).clip(0, 255)
    ys, xs = np.indices(box.shape)
    mass = box.sum()
    top = int(round(14 - (ys * box).sum() / mass))
    left = int(round(14 - (xs * box).sum() / mass))
    top, left = min(max(top, 0), 28 - box.shape[0]), min(max(left, 0), 28 - box.shape[1])
    out = np.zeros((28, 28), np.float32)
    out[top : top + box.shape[0], left : left + box.shape[1]] = box
    return (out * (255 / out.max())).round().astype(np.uint8)


def load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            return to_mnist(image)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a bad file
        raise ImageError(f"cannot read image: {type(e).__name__}: {e}") from e


def load_model(model_uri: str):
    """The registered PyTorch model (a PixelClassifier), or a clear error."""
    import mlflow.pytorch

    try:
        return mlflow.pytorch.load_model(model_uri, map_location="cpu")  # exported in eval mode
    except Exception as e:  # noqa: BLE001 - MLflow raises many kinds for a bad URI
        raise LookupError(
            f"cannot load model {model_uri!r}: {str(e).splitlines()[0][:300]}. Run a study "
            f"first, or check --model-uri and --tracking-uri / MLFLOW_TRACKING_URI."
        ) from e


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mnist_search.predict",
        description="Predict the digit in each image file with a model from the registry.",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("images", nargs="+", type=Path, help="PNG/JPEG files, any size or colors")
    p.add_argument(
        "--model-uri",
        default=f"models:/{default_name(DEFAULT_SPACE)}@champion",
        help="an MLflow model: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, a path",
    )
    cli.add_tracking_flag(p)
    args = p.parse_args(argv)
    folders = [str(path) for path in args.images if path.is_dir()]
    if folders:
        p.error(f"folders, not image files: {', '.join(folders)}")
    missing = [str(path) for path in args.images if not path.is_file()]
    if missing:
        p.error(f"no such image file: {', '.join(missing)}")
    if not args.model_uri:
        p.error("--model-uri must not be empty")

    import mlflow
    import torch

    from mnist_search.tracking import FAIL_FAST, env_defaults

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    # A registry or run that lives in a SQLite file that is not there: opening it would create an
    # empty store (and leave it behind) only to say the model is not in it.
    store = {"models:/": mlflow.get_registry_uri(), "runs:/": mlflow.get_tracking_uri()}
    for scheme, uri in store.items():
        path = sqlite_path(uri) if args.model_uri.startswith(scheme) else None
        if path is not None and not path.exists():
            p.error(
                f"cannot load model {args.model_uri!r}: the MLflow store {path} does not exist. "
                "Run a study first, or check --model-uri and --tracking-uri / MLFLOW_TRACKING_URI."
            )
    try:
        with env_defaults(FAIL_FAST):  # an unreachable server: seconds, not minutes of retries
            model = load_model(args.model_uri)
    except LookupError as e:
        p.error(str(e))
    failed = 0
    for path in args.images:
        try:
            pixels = torch.from_numpy(load_image(path)).reshape(1, 784).float()  # raw 0-255
        except ImageError as e:
            print(f"{path}: error: {e}", file=sys.stderr)
            failed += 1
            continue
        with torch.no_grad():
            probs = model(pixels)[0]
        digit = int(probs.argmax())
        print(f"{path}: {digit} (p={probs[digit].item():.3f})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
