"""What this machine offers a command: the torch device it trains on (`--device`).

Imports nothing else of the package, and torch only when asked, so that any command's flags
can be checked before the heavy libraries load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """The device `--device NAME` means: auto is a CUDA GPU if one is visible, else the CPU.
    ValueError, naming the flag, for a name that is not one of DEVICES or a GPU that is not
    there."""
    import torch

    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r} for --device; use auto, cpu or cuda")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is visible; use cpu or auto")
    return torch.device(name)
