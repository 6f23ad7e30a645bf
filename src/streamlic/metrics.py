"""Rate and distortion: bits per pixel, MS-SSIM and the rate-distortion loss, one definition each.

Training, validation, tests, benchmarks and ``streamlic eval`` all measure with these.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL = 11
DISTORTIONS = ("mse", "ms-ssim")


def bits_per_pixel(likelihoods: Mapping[str, Tensor], num_pixels: int) -> Tensor:
    """Estimated rate of a batch: total -log2 likelihood over the number of image pixels."""
    total = sum(torch.log(likelihood).sum() for likelihood in likelihoods.values())
    return total / (-math.log(2) * num_pixels)


def ms_ssim_scales(height: int, width: int) -> int:
    """How many MS-SSIM scales an image supports (5 from 176 px on; fewer on small crops).

    torchmetrics needs ``side // (scales - 1)**2 > kernel_size - 1`` on both sides.
    """
    side = min(height, width)
    usable = [n for n in range(1, len(MS_SSIM_BETAS) + 1) if side // max(1, n - 1) ** 2 > MS_SSIM_KERNEL - 1]
    if not usable:
        raise ValueError(f"image {height}x{width} is too small for MS-SSIM (kernel {MS_SSIM_KERNEL})")
    return usable[-1]


def ms_ssim(x_hat: Tensor, x: Tensor) -> Tensor:
    """Per-image MS-SSIM of images in [0, 1]; small images use the first scales' weights, renormalised."""
    scales = ms_ssim_scales(*x.shape[-2:])
    betas = torch.tensor(MS_SSIM_BETAS[:scales], dtype=torch.float64)
    betas = tuple((betas / betas.sum()).tolist())
    return multiscale_structural_similarity_index_measure(
        x_hat, x, data_range=1.0, kernel_size=MS_SSIM_KERNEL, betas=betas, reduction="none"
    )


def rate_distortion(out: Mapping[str, Any], x: Tensor, lmbda: float, distortion: str = "mse") -> dict[str, Tensor]:
    """Loss terms of a batch: ``loss``, ``bpp``, ``mse`` (and ``ms_ssim`` for that distortion).

    ``loss = lmbda * 255**2 * MSE + bpp`` (MSE of images in [0, 1]) or ``lmbda * (1 - MS-SSIM) + bpp``,
    CompressAI's convention, so its quality levels' lambdas apply unchanged.
    """
    height, width = x.shape[-2:]
    bpp = bits_per_pixel(out["likelihoods"], x.shape[0] * height * width)
    mse = F.mse_loss(out["x_hat"], x)
    terms = {"bpp": bpp, "mse": mse}
    if distortion == "mse":
        terms["loss"] = lmbda * 255.0**2 * mse + bpp
    else:
        terms["ms_ssim"] = ms_ssim(out["x_hat"], x).mean()
        terms["loss"] = lmbda * (1.0 - terms["ms_ssim"]) + bpp
    return terms
