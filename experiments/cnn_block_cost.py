"""Training samples/s of CNN block designs side by side (plain torch steps on random data, 2 s
each): why the CNN family halves its maps with stride-2 convs rather than conv + 2x2 max pool.

    python experiments/cnn_block_cost.py [batch size, default 128]
"""

import sys
import time

import torch
from torch import nn


class ChannelsLast(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.reshape(-1, 1, 28, 28).contiguous(memory_format=torch.channels_last))


def cnn(c1: int, c2: int, kernel: int, head: int, bn: bool, stride: bool) -> nn.Module:
    layers, c_in = [], 1
    for c in (c1, c2):
        conv_stride = 2 if stride else 1
        layers.append(nn.Conv2d(c_in, c, kernel, conv_stride, kernel // 2, bias=not bn))
        layers += [nn.BatchNorm2d(c)] if bn else []
        layers.append(nn.ReLU())
        layers += [] if stride else [nn.MaxPool2d(2)]
        c_in = c
    head_layers = [nn.Flatten(), nn.Linear(c_in * 49, head), nn.ReLU(), nn.Linear(head, 10)]
    net = ChannelsLast(nn.Sequential(*layers, *head_layers))
    return net.to(memory_format=torch.channels_last)


def samples_per_second(net: nn.Module, batch: int, seconds: float = 2.0) -> float:
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    opt = torch.optim.Adam(net.parameters(), fused=True)
    steps, start = -5, 0.0  # 5 warm-up steps, then time
    while steps < 0 or time.perf_counter() - start < seconds:
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        steps += 1
        if steps == 0:
            start = time.perf_counter()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    torch.manual_seed(0)
    batch = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    mlp = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    variants = {"MLP 784-512-256-10": mlp}
    for c1, c2, head in ((8, 16, 64), (16, 32, 128)):
        for bn in (True, False):
            for stride in (False, True):
                name = f"CNN {c1}-{c2} 5x5 {'bn' if bn else 'no bn'}, "
                name += "stride-2 conv" if stride else "conv + max pool"
                variants[name] = cnn(c1, c2, 5, head, bn, stride)
    print(f"batch {batch}, torch threads {torch.get_num_threads()}")
    for name, net in variants.items():
        rate = samples_per_second(net, batch)
        print(f"{name:44s} {rate:9,.0f} samples/s  {50_000 / rate:5.1f} s per 50k", flush=True)


if __name__ == "__main__":
    main()
