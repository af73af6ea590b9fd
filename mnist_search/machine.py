"""What this machine offers a command: the torch device it trains on (`--device`), and whether
that device computes bfloat16 natively.

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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: a CUDA GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX. Elsewhere bf16 autocast is emulated: on a 2-core AVX2 CPU it trained a
    CNN 7-9x slower than float32 (python -m mnist_search.bench, its bf16 row)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch's own CPU probes
    return device.type == "cpu" and any(getattr(torch.cpu, p, lambda: False)() for p in probes)
