"""Flags that every command which trains shares; argparse only, so `--help` stays instant."""

from __future__ import annotations

import argparse


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """--device and --cuda-graphs / --no-cuda-graphs: the same for every command that trains."""
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on a GPU, replay each training step from a CUDA graph; --no-cuda-graphs launches "
        "its kernels one by one (slower: for comparison, and as an escape hatch)",
    )
