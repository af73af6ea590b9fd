"""Random distortions of a training batch, as batched tensor operations on the batch's own
device: no per-sample PIL, no DataLoader workers, and (on a GPU) inside the step's CUDA graph.

Every image gets its own rotation, scale and shift (`affine`), shear (`shear`) and elastic
displacement field (`elastic`, Simard et al. 2003), drawn from torch's global generator, which
`fit` seeds with the trial's seed, and all applied in one resampling. Each strength scales its
ranges: 0 leaves that distortion out, 1 is up to 15 degrees, 15% and 3 pixels each way for the
affine part, a shear factor of 0.3, and Simard's elastic field (alpha 34, sigma 4 pixels).
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

MAX_ROTATION = math.radians(15)
MAX_SCALE = 0.15  # relative change of size
MAX_SHIFT = 3 / 14  # 3 pixels, in affine_grid's units (the image spans -1..1, 28 pixels)
MAX_SHEAR = 0.3  # x moves by up to 0.3 of y: about 17 degrees of slant
ELASTIC_ALPHA = 34.0  # pixels: Simard et al.'s scale of the smoothed random field
ELASTIC_SIGMA = 4.0  # pixels: the Gaussian that smooths it


def _gaussian_kernel(sigma: float, device) -> torch.Tensor:
    radius = int(math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-(t**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def elastic_field(n: int, strength: float, device) -> torch.Tensor:
    """(N, 28, 28, 2) displacements in affine_grid's units: uniform noise in [-1, 1) per pixel
    and axis, smoothed by a Gaussian of ELASTIC_SIGMA pixels, times ELASTIC_ALPHA x strength."""
    noise = torch.rand(n, 2, 28, 28, device=device) * 2 - 1
    kernel = _gaussian_kernel(ELASTIC_SIGMA, device)
    k = len(kernel)
    rows = kernel.view(1, 1, k, 1).expand(2, 1, k, 1)
    cols = kernel.view(1, 1, 1, k).expand(2, 1, 1, k)
    smooth = F.conv2d(F.conv2d(noise, rows, padding=(k // 2, 0), groups=2), cols,
                      padding=(0, k // 2), groups=2)  # fmt: skip
    return (smooth * (ELASTIC_ALPHA * strength * 2 / 28)).permute(0, 2, 3, 1)


def random_affine(
    x: torch.Tensor, strength: float, background: float, shear: float = 0.0, elastic: float = 0.0
) -> torch.Tensor:
    """`x` (N, 784) normalized images, distorted; `background` is what a 0 pixel normalizes to,
    which fills whatever a distortion uncovers. With every strength 0, `x` itself."""
    if strength == 0 and shear == 0 and elastic == 0:
        return x
    n = x.shape[0]
    u = torch.rand(n, 4, device=x.device) * 2 - 1  # (N, 4) uniform in [-1, 1)
    angle = u[:, 0] * (MAX_ROTATION * strength)
    scale = 1 + u[:, 1] * (MAX_SCALE * strength)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = u[:, 2:] * (MAX_SHIFT * strength)  # (N, 2)
    # shear after the rotation: [[cos, -sin], [sin, cos]] @ [[1, s], [0, 1]]
    s = (torch.rand(n, device=x.device) * 2 - 1) * (MAX_SHEAR * shear) if shear else 0.0
    theta = torch.stack(  # (N, 2, 3): output pixel -> where it samples the input
        [
            torch.stack([cos, cos * s - sin, shift[:, 0]], 1),
            torch.stack([sin, sin * s + cos, shift[:, 1]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, [n, 1, 28, 28], align_corners=False)  # (N, 28, 28, 2)
    if elastic:
        grid = grid + elastic_field(n, elastic, x.device)
    images = x.reshape(n, 1, 28, 28) - background  # (N, 1, 28, 28), background at 0
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(n, 784) + background
