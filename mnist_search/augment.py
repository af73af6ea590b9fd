"""Random affine distortions of a training batch, as batched tensor operations on the batch's
own device: no per-sample PIL, no DataLoader workers, and (on a GPU) inside the step's CUDA graph.

Every image gets its own rotation, scale and shift, drawn from torch's global generator, which
`fit` seeds with the trial's seed. `strength` scales all three ranges: 0 returns the batch as it
is, 1 is up to 15 degrees, 15% and 3 pixels each way (digits stay readable: MNIST's own writers
vary about that much).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

MAX_ROTATION = math.radians(15)
MAX_SCALE = 0.15  # relative change of size
MAX_SHIFT = 3 / 14  # 3 pixels, in affine_grid's units (the image spans -1..1, 28 pixels)


def random_affine(x: torch.Tensor, strength: float, background: float) -> torch.Tensor:
    """`x` (N, 784) normalized images, distorted; `background` is what a 0 pixel normalizes to,
    which fills whatever a distortion uncovers."""
    if strength == 0:
        return x
    n = x.shape[0]
    u = torch.rand(n, 4, device=x.device) * 2 - 1  # (N, 4) uniform in [-1, 1)
    angle = u[:, 0] * (MAX_ROTATION * strength)
    scale = 1 + u[:, 1] * (MAX_SCALE * strength)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = u[:, 2:] * (MAX_SHIFT * strength)  # (N, 2)
    theta = torch.stack(  # (N, 2, 3): output pixel -> where it samples the input
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, [n, 1, 28, 28], align_corners=False)
    images = x.reshape(n, 1, 28, 28) - background  # (N, 1, 28, 28), background at 0
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(n, 784) + background
