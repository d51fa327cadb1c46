"""Random blur kernels of the Real-ESRGAN degradation (Wang et al. 2021, Sec. 3.1), batched.

Written by hand because kornia only has isotropic/axis-aligned Gaussians: it lacks rotated
anisotropic, generalized-Gaussian and plateau kernels and the circular low-pass (sinc) filter.
Every kernel of a batch is drawn per sample and zero-padded to one common odd size so a single
`kornia.filters.filter2d` call applies them all.
"""
from __future__ import annotations

import math

import torch

from .config import KERNEL_TYPES, BlurStage

SINC = len(KERNEL_TYPES)  # type index of the circular low-pass kernel


def uniform(low: float, high: float, count: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator, dtype=torch.float64)


def odd_sizes(count: int, size_max: int, generator: torch.Generator) -> torch.Tensor:
    """Odd kernel sizes 7, 9, ..., size_max, uniformly (Real-ESRGAN draws 7..21)."""
    choices = torch.arange(7, size_max + 1, 2)
    return choices[torch.randint(len(choices), (count,), generator=generator)]


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    half = size // 2
    axis = torch.arange(-half, half + 1, dtype=torch.float64)
    return torch.meshgrid(axis, axis, indexing="xy")


def _beta(beta_range: tuple[float, float], count: int, generator: torch.Generator) -> torch.Tensor:
    """Shape parameter: half the draws below 1, half above, as Real-ESRGAN does."""
    low, high = beta_range
    below = uniform(low, min(1.0, high), count, generator)
    above = uniform(max(1.0, low), high, count, generator)
    return torch.where(torch.rand(count, generator=generator, dtype=torch.float64) < 0.5, below, above)


def gaussian_family(
    kind: torch.Tensor, sigma_x: torch.Tensor, sigma_y: torch.Tensor, angle: torch.Tensor,
    beta_g: torch.Tensor, beta_p: torch.Tensor, size: int,
) -> torch.Tensor:
    """(B,) parameters -> (B,size,size) unnormalised kernels of the six Gaussian-like kinds.

    With the quadratic form Q = d^T Σ^-1 d (Σ from two sigmas and a rotation): Gaussian
    exp(-Q/2), generalized exp(-(Q)^β/2), plateau 1/(1+Q^β). Isotropic kinds use σ_y = σ_x, θ = 0.
    """
    isotropic = (kind % 2) == 0  # KERNEL_TYPES alternates iso/aniso
    sigma_y = torch.where(isotropic, sigma_x, sigma_y)
    angle = torch.where(isotropic, torch.zeros_like(angle), angle)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Σ = R diag(σx², σy²) R^T, so Σ^-1 = R diag(1/σx², 1/σy²) R^T.
    inv_x, inv_y = 1 / sigma_x**2, 1 / sigma_y**2
    a = cos**2 * inv_x + sin**2 * inv_y
    b = cos * sin * (inv_x - inv_y)
    c = sin**2 * inv_x + cos**2 * inv_y
    x, y = _grid(size)
    quad = a[:, None, None] * x**2 + 2 * b[:, None, None] * x * y + c[:, None, None] * y**2
    family = kind // 2  # 0 gaussian, 1 generalized, 2 plateau
    gaussian = torch.exp(-0.5 * quad)
    generalized = torch.exp(-0.5 * quad.pow(beta_g[:, None, None]))
    plateau = 1 / (1 + quad.pow(beta_p[:, None, None]))
    family = family[:, None, None]
    return torch.where(family == 0, gaussian, torch.where(family == 1, generalized, plateau))


def circular_lowpass(cutoff: torch.Tensor, size: int) -> torch.Tensor:
    """(B,) cutoff ω_c -> (B,size,size) 2-D sinc (jinc) kernels ω_c·J1(ω_c r)/(2π r), normalised."""
    x, y = _grid(size)
    radius = torch.sqrt(x**2 + y**2)[None]
    cutoff = cutoff[:, None, None]
    safe_radius = torch.where(radius == 0, torch.ones_like(radius), radius)
    kernel = cutoff * torch.special.bessel_j1(cutoff * safe_radius) / (2 * math.pi * safe_radius)
    kernel = torch.where(radius == 0, cutoff**2 / (4 * math.pi), kernel)
    return kernel / kernel.sum(dim=(-2, -1), keepdim=True)


def sinc_cutoff(sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ω_c in [π/3, π] for small kernels and [π/5, π] from size 13 up (Real-ESRGAN)."""
    wide = uniform(math.pi / 5, math.pi, len(sizes), generator)
    narrow = uniform(math.pi / 3, math.pi, len(sizes), generator)
    return torch.where(sizes < 13, narrow, wide)


def _crop_to_sizes(kernels: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Zero everything outside each sample's own odd size, then normalise to sum 1."""
    x, y = _grid(kernels.shape[-1])
    half = (sizes // 2).to(torch.float64)[:, None, None]
    inside = (x.abs()[None] <= half) & (y.abs()[None] <= half)
    kernels = kernels * inside
    return kernels / kernels.sum(dim=(-2, -1), keepdim=True)


def random_blur_kernels(stage: BlurStage, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, K, K) float32 kernels (K = stage.kernel_size_max) and their (count,) type index
    (0..5 in KERNEL_TYPES order, 6 = sinc)."""
    size = stage.kernel_size_max
    sizes = odd_sizes(count, size, generator)
    probs = torch.tensor(stage.kernel_probs, dtype=torch.float64)
    kind = torch.multinomial(probs / probs.sum(), count, replacement=True, generator=generator)
    sigma_x = uniform(*stage.sigma, count, generator)
    sigma_y = uniform(*stage.sigma, count, generator)
    angle = uniform(-math.pi, math.pi, count, generator)
    beta_g, beta_p = _beta(stage.betag, count, generator), _beta(stage.betap, count, generator)
    kernels = gaussian_family(kind, sigma_x, sigma_y, angle, beta_g, beta_p, size)
    is_sinc = torch.rand(count, generator=generator, dtype=torch.float64) < stage.sinc_probability
    sinc = circular_lowpass(sinc_cutoff(sizes, generator), size)
    kernels = torch.where(is_sinc[:, None, None], sinc, kernels)
    kind = torch.where(is_sinc, torch.full_like(kind, SINC), kind)
    return _crop_to_sizes(kernels, sizes).float(), kind


def final_sinc_kernels(probability: float, size_max: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """The last stage's sinc filter with `probability`, else an identity (pulse) kernel."""
    sizes = odd_sizes(count, size_max, generator)
    cutoff = uniform(math.pi / 3, math.pi, count, generator)
    sinc = _crop_to_sizes(circular_lowpass(cutoff, size_max), sizes)
    pulse = torch.zeros(size_max, size_max, dtype=torch.float64)
    pulse[size_max // 2, size_max // 2] = 1
    use_sinc = torch.rand(count, generator=generator, dtype=torch.float64) < probability
    return torch.where(use_sinc[:, None, None], sinc, pulse).float()
