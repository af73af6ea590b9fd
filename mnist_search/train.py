"""Plain PyTorch training: `fit` and `evaluate` take numbers and tensors and return numbers.

Nothing here knows of Optuna or MLflow: the study prunes and logs through `on_epoch_end`.
`python -m mnist_search.train` trains one config from flags: the baseline.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `python -m mnist_search.train --help` needs no torch
    import torch
    from torch import nn

    from mnist_search.data import Data, Split

CHOICES = {
    "family": ("mlp", "cnn"),
    "activation": ("relu", "gelu", "silu"),  # model.ACTIVATIONS, named here for a light --help
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("constant", "cosine"),
    "precision": ("fp32", "bf16", "auto"),
}


@dataclass(frozen=True)
class TrainConfig:
    family: str = "mlp"  # mlp | cnn
    hidden: tuple[int, ...] = (512, 256)  # widths of the dense hidden layers (the CNN's head)
    channels: tuple[int, ...] = ()  # the CNN's conv widths, one per conv block; none for an MLP
    kernel: int = 5  # the CNN's conv kernel size (odd)
    depth: int = 1  # conv blocks per CNN stage: a stride-2 one, then 3x3 stride-1 ones
    stem: int = 0  # channels of a 3x3 stride-1 CNN block at full resolution first; 0 = none
    dropout: float = 0.2  # after every hidden layer
    activation: str = "relu"  # relu | gelu | silu
    optimizer: str = "adam"  # adam | adamw | sgd (Nesterov momentum 0.9)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine (to zero over all epochs)
    label_smoothing: float = 0.0
    augment: float = 0.0  # strength of random affine distortions of training batches; 0 = off
    shear: float = 0.0  # strength of random shear of training batches; 0 = off
    elastic: float = 0.0  # strength of random elastic distortion of training batches; 0 = off
    ema: float = 0.0  # decay of an exponential moving average of the weights, which is then
    # what is evaluated and returned; 0 = off (the last weights)
    precision: str = "fp32"  # of the training step's forward pass: fp32 | bf16 (autocast) |
    # auto (bf16 where it trains faster than fp32: `machine.bf16_trains_faster`)
    batch_size: int = 128
    epochs: int = 10
    seed: int = 0  # weights, dropout and batch order

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(w) for w in self.hidden))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; use one of {choices}")
        if (self.family == "cnn") != bool(self.channels):
            raise ValueError("a cnn needs conv channels, and an mlp has none")
        if self.family == "cnn" and (self.kernel < 1 or self.kernel % 2 == 0):
            raise ValueError(f"the conv kernel must be odd and positive, not {self.kernel}")
        if self.depth < 1 or (self.depth > 1 and self.family != "cnn"):
            raise ValueError(f"depth counts a cnn's conv blocks per stage, not {self.depth}")
        if self.stem < 0 or (self.stem and self.family != "cnn"):
            raise ValueError(f"stem counts the channels of a cnn's first block, not {self.stem}")
        for name in ("augment", "shear", "elastic"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a strength from 0 to 1, not {getattr(self, name)}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema is a decay in [0, 1), not {self.ema}")

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The architecture in a few words: `MLP 784-512-256-10` or `CNN 16-32 5x5, head 128`."""
        if self.family == "mlp":
            return f"MLP {'-'.join(map(str, (784, *self.hidden, 10)))}"
        head = f", head {'-'.join(map(str, self.hidden))}" if self.hidden else ""
        k = self.kernel
        depth = f", {self.depth} convs a stage" if self.depth > 1 else ""
        stem = f"3x3 {self.stem}, " if self.stem else ""
        return f"CNN {stem}{'-'.join(map(str, self.channels))} {k}x{k}{depth}{head}"


class NonFiniteLossError(FloatingPointError):
    """An epoch's training loss was NaN or infinite: the run stops rather than go on with it."""

    def __init__(self, epoch: int, loss: float):
        super().__init__(f"training loss became {loss} in epoch {epoch}; lower the lr")
        self.epoch, self.loss = epoch, loss


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict] = field(default_factory=list)  # one dict of metrics per epoch
    stopped: bool = False  # the epoch hook asked to stop (after the last epoch it ran)

    @property
    def best_epoch(self) -> int:
        """The epoch (1-based) with the highest validation accuracy, the earliest of equals (the
        fewest epochs to retrain); without a validation split, the last epoch."""
        if not self.history or "val_accuracy" not in self.history[0]:
            return len(self.history)
        return max(self.history, key=lambda m: m["val_accuracy"])["epoch"]


EpochHook = Callable[[int, dict, "nn.Module"], bool | None]  # True: stop training


def forward_precision(config: TrainConfig, device: str | torch.device) -> str:
    """The precision `fit` runs the training forward pass in on `device`: fp32 or bf16; `auto`
    is bf16 where it trains faster than fp32 (`machine.bf16_trains_faster`)."""
    import torch

    from mnist_search.machine import bf16_trains_faster

    if config.precision == "auto":
        return "bf16" if bf16_trains_faster(torch.device(device)) else "fp32"
    return config.precision


def build_model(config: TrainConfig) -> nn.Module:
    from mnist_search.model import CNN, MLP

    if config.family == "cnn":
        return CNN(
            config.channels,
            config.kernel,
            config.hidden,
            config.dropout,
            config.activation,
            config.depth,
            config.stem,
        )
    return MLP(config.hidden, config.dropout, config.activation)


def _optimizer(config: TrainConfig, params, capturable: bool) -> torch.optim.Optimizer:
    # fused: one kernel per tensor instead of a dozen; measured ~15% more samples/s at batch
    # 128 on 2 CPU cores (python -m mnist_search.bench). capturable: the step counter and the
    # lr live on the GPU, so a recorded CUDA graph reads their current values at each replay.
    import torch

    if config.optimizer in ("adam", "adamw"):
        lr = torch.tensor(config.lr, device="cuda") if capturable else config.lr
        cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        return cls(
            params, lr=lr, weight_decay=config.weight_decay, fused=True, capturable=capturable
        )
    return torch.optim.SGD(
        params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
    )


def lr_at(config: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based) out of `total_steps`."""
    if config.schedule == "cosine":  # to zero over all epochs
        return config.lr * (0.5 * (1 + math.cos(math.pi * step / total_steps)))  # as LambdaLR
    return config.lr


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if hasattr(group["lr"], "fill_"):  # a tensor: in place, a recorded graph holds this one
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class CudaGraphStep:
    """`step(idx)` recorded once as a CUDA graph, then replayed for every full batch.

    One training step of these MLPs is a few dozen small kernels. Launched one by one from
    Python they leave a big GPU mostly idle; a replay launches the whole step at once (6-10x
    the samples/s at batch 128 on an H200: README, Results). As PyTorch's CUDA-graph docs ask, the
    first `warmup` steps run eagerly on a side stream (they create the optimizer state and the
    cuBLAS workspace) before the capture. An epoch's last, smaller batch runs eagerly on the
    same tensors: gradients are zeroed in place, never set to None, so the graph's tensors stay.
    """

    def __init__(self, step: Callable[[torch.Tensor], None], batch_size: int, warmup: int = 3):
        import torch

        self.step, self.batch_size, self.warmup = step, batch_size, warmup
        self.idx = torch.zeros(batch_size, dtype=torch.long, device="cuda")  # the graph's input
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, idx: torch.Tensor) -> None:
        import torch

        if len(idx) != self.batch_size:
            self.step(idx)
        elif self.warmup > 0:
            self.warmup -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(idx)
            torch.cuda.current_stream().wait_stream(side)
        else:
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.step(self.idx)  # recorded, not run: the replay below runs it
            self.idx.copy_(idx)
            self.graph.replay()


class WeightAverage:
    """An exponential moving average of a model's weights and batch-norm statistics: after
    optimizer step t, average <- average + (1 - d) * (weights - average), with d = min(decay,
    (1 + t) / (10 + t)), so that the early average is not mostly the initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.steps = decay, 0
        pairs = list(
            zip(self.model.state_dict().values(), model.state_dict().values(), strict=True)
        )
        self._floats = [pair for pair in pairs if pair[0].is_floating_point()]
        self._counters = [pair for pair in pairs if not pair[0].is_floating_point()]

    def update(self) -> None:
        import torch

        self.steps += 1
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        averages, current = zip(*self._floats, strict=True)
        torch._foreach_lerp_(list(averages), list(current), 1 - decay)  # as torch.optim.swa_utils
        for average, value in self._counters:  # batch norm's num_batches_tracked
            average.copy_(value)


def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def evaluate(model: nn.Module, split: Split) -> dict:
    """Mean cross-entropy and accuracy of `model` on `split`."""
    import torch
    from torch import nn

    model.eval()
    with torch.no_grad():
        logits = torch.cat(
            [model(split.features(slice(i, i + 8192))) for i in range(0, len(split), 8192)]
        )
    return {
        "loss": nn.functional.cross_entropy(logits, split.y).item(),
        "accuracy": (logits.argmax(1) == split.y).float().mean().item(),
    }


def fit(
    config: TrainConfig,
    data: Data,
    device: str | torch.device = "cpu",
    on_epoch_end: EpochHook | None = None,
    cuda_graphs: bool = True,
) -> FitResult:
    """Train a fresh model on `data.train`; after each epoch, measure on `data.val` (if any) and
    call `on_epoch_end(epoch, metrics, model)`. If the hook returns True, training stops there
    (that is how the study prunes) with `stopped` set; whatever it raises propagates.
    Raises NonFiniteLossError when an epoch's
    training loss is NaN or infinite. On a CUDA device, Adam and AdamW steps are replayed from
    a CUDA graph (`CudaGraphStep`) unless `cuda_graphs` is False."""
    import torch
    from torch import nn

    from mnist_search.augment import random_affine

    device = torch.device(device)
    torch.manual_seed(config.seed)
    shuffle = torch.Generator().manual_seed(config.seed)
    model = build_model(config).to(device)
    graphed = cuda_graphs and device.type == "cuda" and config.optimizer in ("adam", "adamw")
    optimizer = _optimizer(config, model.parameters(), capturable=graphed)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    # the epoch's summed loss stays on the device, so no step waits for the GPU to hand it back
    total = torch.zeros((), device=device)
    background = -data.mean / data.std  # a blank pixel, normalized
    bf16 = forward_precision(config, device) == "bf16"

    def step(idx: torch.Tensor) -> None:
        x, y = data.train.features(idx), data.train.y.index_select(0, idx)
        x = random_affine(x, config.augment, background, config.shear, config.elastic)
        optimizer.zero_grad(set_to_none=False)
        # bf16: autocast with its cast cache off, as PyTorch asks of autocast in CUDA graphs
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16, cache_enabled=False):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        total.add_(loss.detach() * len(idx))

    run_step = CudaGraphStep(step, config.batch_size) if graphed else step
    average = WeightAverage(model, config.ema) if config.ema else None
    shipped = model if average is None else average.model  # what is evaluated and returned
    total_steps = config.epochs * math.ceil(len(data.train) / config.batch_size)
    steps = 0
    result = FitResult(shipped)
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        model.train()
        total.zero_()
        for idx in data.train.batch_indices(config.batch_size, shuffle):
            if config.schedule != "constant":
                _set_lr(optimizer, lr_at(config, steps, total_steps))
            run_step(idx)
            if average is not None:
                average.update()  # outside the recorded step: its decay changes every step
            steps += 1
        metrics = {"epoch": epoch, "train_loss": total.item() / len(data.train)}
        if not math.isfinite(metrics["train_loss"]):
            raise NonFiniteLossError(epoch, metrics["train_loss"])
        if data.val is not None:
            val = evaluate(shipped, data.val)
            metrics |= {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
        metrics["epoch_seconds"] = time.perf_counter() - start
        result.history.append(metrics)
        if on_epoch_end is not None and on_epoch_end(epoch, metrics, shipped):
            result.stopped = True
            break
    return result


# each flag's value must be in [low, high): `not low <= x < high` also refuses nan, which fails
# every comparison
RANGES = (("dropout", 0, 1), ("weight_decay", 0, math.inf), ("label_smoothing", 0, 1),
          ("seed", 0, 2**63))  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from mnist_search import cli

    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m mnist_search.train",
        description="Train one MLP on MNIST (50,000 train / 10,000 validation) and report its "
        "validation accuracy, and with --test its test accuracy: the baseline.",
        formatter_class=cli.HelpFormatter,
    )
    add = p.add_argument
    add("--hidden", type=int, nargs="+", default=list(d.hidden), help="hidden widths")
    add("--dropout", type=float, default=d.dropout, help="after every hidden layer")
    add("--activation", choices=CHOICES["activation"], default=d.activation, help="hidden layers'")
    add("--optimizer", choices=CHOICES["optimizer"], default=d.optimizer, help="sgd: Nesterov 0.9")
    add("--lr", type=float, default=d.lr, help="peak learning rate")
    add("--weight-decay", type=float, default=d.weight_decay, help="L2 penalty")
    add("--schedule", choices=CHOICES["schedule"], default=d.schedule,
        help="of the learning rate: constant, or cosine to zero over all steps")  # fmt: skip
    add("--label-smoothing", type=float, default=d.label_smoothing, help="of the targets")
    add("--batch-size", type=int, default=d.batch_size, help="images per step")
    add("--epochs", type=int, default=d.epochs, help="passes over the training split")
    add("--seed", type=int, default=d.seed, help="of weights, dropout and batch order")
    add("--test", action="store_true",
        help="also score the trained model on the 10,000 test images (the baseline's figure); "
        "choose settings on validation, not on this")  # fmt: skip
    cli.add_device_flags(p)
    cli.add_data_dir_flag(p)
    return p


def check_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.hidden) < 1:
        p.error(f"every --hidden width must be at least 1, not {min(args.hidden)}")
    for name, low, high in RANGES:
        flag, value = f"--{name.replace('_', '-')}", getattr(args, name)
        if not low <= value < high:
            p.error(f"{flag} {value} is out of range: need {low} <= {flag} < {high}")
    if not 0 < args.lr < math.inf:
        p.error(f"--lr {args.lr} is out of range: need 0 < --lr < inf")


def main(argv: list[str] | None = None) -> int:
    from mnist_search import cli

    p = build_parser()
    args = p.parse_args(argv)
    check_flags(p, args)
    data_dir, device = cli.data_dir(p, args), cli.device(p, args)
    if not cli.mnist_ready(data_dir):
        return 1

    import torch

    from mnist_search.data import load_data, load_test

    fields = ("hidden", "dropout", "activation", "optimizer", "lr", "weight_decay", "schedule",
              "label_smoothing", "batch_size", "epochs", "seed")  # fmt: skip
    config = TrainConfig(**{name: getattr(args, name) for name in fields})
    data = load_data(data_dir, device)

    def report(epoch, m, model):
        print(
            f"epoch {epoch:3d}  train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}  "
            f"val_accuracy {m['val_accuracy']:.4f}  {m['epoch_seconds']:.1f}s",
            flush=True,
        )

    result = fit(config, data, device, report, args.cuda_graphs)
    seconds = sum(m["epoch_seconds"] for m in result.history)
    line = f"validation accuracy {result.history[-1]['val_accuracy']:.4f}"
    if args.test:  # the only read of the test set here, and only when asked
        test = evaluate(result.model, load_test(data_dir, data.mean, data.std, device))
        line += f"  test accuracy {test['accuracy']:.4f}"
    threads = torch.get_num_threads()
    print(f"{line}  ({seconds / config.epochs:.1f} s/epoch on {device}, {threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
