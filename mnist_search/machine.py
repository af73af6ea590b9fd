"""What this machine offers a command: the torch device it trains on (`--device`), and whether
that device computes bfloat16 natively.

Imports nothing else of the package, and torch only when asked, so that any command's flags
can be checked before the heavy libraries load.
"""

from __future__ import annotations

from pathlib import Path
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
    return device.type == "cpu" and (_cpu_has("avx512_bf16") or _cpu_has("amx_tile"))


def bf16_trains_faster(device: torch.device) -> bool:
    """Whether bf16 autocast trains the CNN space's nets faster than float32 on `device`, from
    what this project's 2-core machines measured (docs/search-space.md, "Precision"): yes on an
    AMD CPU with AVX-512 BF16 (EPYC: a fit 1.14-1.26x faster), no on an Intel one without AMX
    (a Xeon whose hypervisor hides AMX: 1.1-1.5x slower). With AMX, whose tiles compute bf16
    convolutions and matmuls, yes (the Xeons with AMX ran the default in bf16; not timed
    against fp32). On a GPU, wherever it is native (not yet timed for these CNNs). A rule,
    not a timing at run time, so that a study trains the same way every time on one machine."""
    if device.type != "cpu":
        return native_bf16(device)
    return _cpu_has("amx_tile") or (_cpu_has("avx512_bf16") and cpu_vendor() == "AuthenticAMD")


def _cpu_has(feature: str) -> bool:
    """torch's own probe of a CPU feature (`avx512_bf16`, `amx_tile`), False where it has none."""
    import torch

    return getattr(torch.cpu, f"_is_{feature}_supported", lambda: False)()


def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's vendor id (GenuineIntel, AuthenticAMD), or "" where `cpuinfo` cannot say."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if "vendor_id" in line), "")


# The peak private memory of one worker process training the default CNNs on the CPU: its imports
# (torch, optuna, mlflow: about 390 MB; torchvision: 85), MNIST as uint8 pixels (46) and a
# trial's working set (experiments/control_plane.py measures it, docs/scale-out.md).
WORKER_MB = 700


def check_memory_for(workers: int, available_mb: float | None = None) -> None:
    """ValueError naming the limit if `workers` worker processes would not fit in this machine's
    available memory (psutil's `available`: free, and reclaimable without swapping)."""
    if available_mb is None:
        import psutil

        available_mb = psutil.virtual_memory().available / 2**20
    need = workers * WORKER_MB
    if need > available_mb:
        most = int(available_mb // WORKER_MB)
        raise ValueError(
            f"--workers {workers} needs about {need / 1024:.1f} GiB of memory ({WORKER_MB} MB "
            f"a worker), but this machine has {available_mb / 1024:.1f} GiB available: use "
            f"--workers {max(most, 1)} or fewer here, and more machines for more workers"
        )
