"""`python -m mnist_search.bench`: training throughput, ours against the usual way and the ceiling.

In one run, on the same MLP (784-512-256-10, dropout 0.2, Adam) and the same real MNIST images:
1. the usual way: torchvision's MNIST with per-sample ToTensor + Normalize + flatten through a
   DataLoader (batch 128, shuffle);
2. our path (`fit` on device-resident tensors) at batch 128 and 512; on a GPU, where `fit`
   replays each step from a CUDA graph, also the same steps launched eagerly at batch 128;
3. the ceiling: measured matmul FLOP/s on the same device and threads, divided by the MLP's
   training FLOPs per sample (6 x weights: forward, and backward for inputs and weights);
4. a CNN of the search space (16-32 channels, 5x5, head 128) at batch 128, without and with
   random affine augmentation at full strength (the difference is augmentation's cost), and
   with its forward pass in bf16 (autocast), as the search trains CNNs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mnist_search import cli
from mnist_search.train import TrainConfig, build_model, fit, forward_precision

if TYPE_CHECKING:  # imported where used, so --help is instant
    import torch

    from mnist_search.data import Data

HIDDEN = (512, 256)
CNN_CONFIG = TrainConfig(family="cnn", channels=(16, 32), kernel=5, hidden=(128,), batch_size=128)


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def usual_way(data_dir: Path, samples: int, device: torch.device) -> float:
    """Samples/s of the textbook loop: PIL images transformed one by one in a DataLoader."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    from mnist_search.model import MLP

    transform = transforms.Compose(
        [
            transforms.ToTensor(),
            transforms.Normalize((0.1307,), (0.3081,)),
            transforms.Lambda(lambda x: x.view(-1)),  # (1, 28, 28) -> (784,)
        ]
    )
    dataset = datasets.MNIST(str(data_dir), train=True, download=False, transform=transform)
    loader = DataLoader(dataset, batch_size=128, shuffle=True)
    torch.manual_seed(0)
    model = MLP(HIDDEN, 0.2).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen, start = 0, time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(y)
        if seen >= samples:
            break
    _sync(device)
    return seen / (time.perf_counter() - start)


def ours(data: Data, batch_size: int, device: torch.device, config=None, cuda_graphs=True) -> float:
    """Samples/s of `fit` itself over `data.train` (give it no validation split), in the second
    of two epochs: the first pays for warm-up and, on a GPU, for recording the CUDA graph. The
    net is the MLP unless `config` names another."""
    config = config or TrainConfig(hidden=HIDDEN, dropout=0.2, lr=1e-3, batch_size=batch_size)
    result = fit(dataclasses.replace(config, epochs=2), data, device, cuda_graphs=cuda_graphs)
    return len(data.train) / result.history[-1]["epoch_seconds"]


def matmul_flops(device: torch.device, n: int, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of square float32 matmuls, the MLP's dominant kernel."""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)
    _sync(device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        runs += 1
    _sync(device)
    return 2 * n**3 * runs / (time.perf_counter() - start)


def bench(data_dir: Path, device: torch.device, samples: int) -> dict[str, tuple[str, float]]:
    """{key: (row label, samples/s)}; keys usual, eager128 (GPU only), ours128, ours512, ceiling,
    cnn128, cnn128aug."""
    from mnist_search.data import Data, load_data
    from mnist_search.model import MLP, training_flops_per_sample

    data = load_data(data_dir, device)
    subset = Data(data.train.head(samples), None, data.mean, data.std)
    gpu = device.type == "cuda"
    n = 4096 if gpu else 1024  # a GPU needs big matrices to reach its peak
    flops = matmul_flops(device, n)
    per_sample = training_flops_per_sample(MLP(HIDDEN))
    rows = {
        "usual": (
            "usual way: torchvision + DataLoader, batch 128",
            usual_way(data_dir, samples, device),
        )
    }
    if gpu:
        rows["eager128"] = (
            "ours, eager (no CUDA graph), batch 128",
            ours(subset, 128, device, cuda_graphs=False),
        )
    where = "CUDA graph" if gpu else "device-resident tensors"
    rows["ours128"] = (f"ours: {where}, batch 128", ours(subset, 128, device))
    rows["ours512"] = (f"ours: {where}, batch 512", ours(subset, 512, device))
    label = f"ceiling: {flops / 1e9:,.0f} GFLOP/s ({n}² fp32) / {per_sample / 1e6:.2f} MFLOP"
    rows["ceiling"] = (label, flops / per_sample)
    cnn_flops = training_flops_per_sample(build_model(CNN_CONFIG)) / 1e6
    cnn = f"ours: {CNN_CONFIG.describe()} ({cnn_flops:.1f} MFLOP), batch 128"
    rows["cnn128"] = (cnn, ours(subset, 128, device, CNN_CONFIG))
    augmented = dataclasses.replace(CNN_CONFIG, augment=1.0)
    rows["cnn128aug"] = ("  the same, augmented (strength 1)", ours(subset, 128, device, augmented))
    bf16 = dataclasses.replace(CNN_CONFIG, precision="bf16")
    rows["cnn128bf16"] = ("  the same, in bf16 (autocast)", ours(subset, 128, device, bf16))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m mnist_search.bench",
        description="Measure training throughput: the usual way, ours, and the machine's ceiling.",
        formatter_class=cli.HelpFormatter,
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--samples", type=int, default=20_000, help="training samples per row")
    cli.add_data_dir_flag(p)
    args = p.parse_args(argv)
    if args.samples < 512:
        p.error("--samples must be at least 512")
    data_dir, device = cli.data_dir(p, args), cli.device(p, args)
    if not cli.mnist_ready(data_dir):
        return 1

    import torch

    from mnist_search.machine import native_bf16

    rows = bench(data_dir, device, args.samples)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {device} ({name}), torch threads: {torch.get_num_threads()}")
    print(f"{'path':66s} {'samples/s':>12s}")
    for label, rate in rows.values():
        print(f"{label:66s} {rate:12,.0f}")
    rate = {key: r for key, (_, r) in rows.items()}
    print(f"speed-up over the usual way at batch 128: {rate['ours128'] / rate['usual']:.1f}x")
    if "eager128" in rate:
        print(
            f"CUDA graph over eager steps at batch 128: {rate['ours128'] / rate['eager128']:.1f}x"
        )
    print(
        f"ours at batch 512 as a fraction of the ceiling: {rate['ours512'] / rate['ceiling']:.2f}"
    )
    epoch = 50_000  # a search epoch: the training split
    cost = epoch / rate["cnn128aug"] - epoch / rate["cnn128"]
    print(f"augmentation's cost per search epoch ({epoch:,} images) of that CNN: {cost:.2f} s")
    print(f"bf16 autocast over fp32 for that CNN: {rate['cnn128bf16'] / rate['cnn128']:.2f}x")
    native = native_bf16(device)
    chosen = forward_precision(dataclasses.replace(CNN_CONFIG, precision="auto"), device)
    print(f"native bf16 on {device}: {'yes' if native else 'no'}; the CNN space trains in "
          f"{chosen} here (precision auto: bf16 where it was measured faster)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
