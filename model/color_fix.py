"""Colour correction of the SR output against the upscaled input: the last step of the inference
path (docs/model.md, "6. Post-processing: crop and colour fix").

Written by hand: kornia has no wavelet colour transfer; both are a few tensor ops (StableSR's
definitions, which the S3Diff reference calls)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

WAVELET_LEVELS = 5


def _wavelet_blur(image: torch.Tensor, radius: int) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0], device=image.device, dtype=image.dtype)
    kernel = (kernel[:, None] * kernel[None, :]) / 16
    channels = image.shape[1]
    padded = F.pad(image, (radius,) * 4, mode="replicate")
    return F.conv2d(padded, kernel.expand(channels, 1, 3, 3), groups=channels, dilation=radius)


def _wavelet_split(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) frequency parts: 5 levels of dilated [1,2,1]^2/16 blurs, dilation 2^i."""
    high = torch.zeros_like(image)
    for level in range(WAVELET_LEVELS):
        low = _wavelet_blur(image, 2**level)
        high = high + (image - low)
        image = low
    return high, image


def wavelet_color_fix(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Keep the output's high frequencies, take the low frequencies (colour) from `reference`."""
    high, _ = _wavelet_split(output)
    _, low = _wavelet_split(reference)
    return high + low


def adain_color_fix(output: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match per-channel mean and std (unbiased variance, as the reference) to `reference`."""
    def stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]

    out_mean, out_std = stats(output)
    ref_mean, ref_std = stats(reference)
    return (output - out_mean) / out_std * ref_std + ref_mean


def color_fix(output: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """Images in [0,1]; returns [0,1]."""
    if method == "none":
        return output
    if method == "wavelet":
        return wavelet_color_fix(output, reference).clamp(0, 1)
    if method == "adain":
        return adain_color_fix(output, reference).clamp(0, 1)
    raise ValueError(f"color_fix must be 'wavelet', 'adain' or 'none', got {method!r}")
