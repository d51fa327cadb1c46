"""Real-ESRGAN two-stage degradation on batches of torch tensors (the degradation S3Diff is trained
on, with the numbers of `DegradationConfig`): blur -> resize -> noise -> JPEG, twice, with the
final sinc filter and the last resize/JPEG in random order. HR in, (LR, HR) and the applied scores
out; the trainer brings the LR back to x4 with the weights' pre-resize (model.output_size.pre_resize).

kornia does the filtering (`filter2d`) and the JPEG round trip (`jpeg_codec_differentiable`);
resizing is torch's `F.interpolate`, as in Real-ESRGAN. Kernels are drawn in `kernels.py` and the
noise models are written here: kornia has no Poisson noise and no "gray noise" (one noise field
shared by the three channels). Every draw comes from one `torch.Generator`, so a seed fixes the
output. Like Real-ESRGAN, resize factor and interpolation mode are drawn per batch, everything
else per sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import kornia
import numpy as np
import torch
import torch.nn.functional as F

from s3diff_serve.evaluation.evaluate import to_tensor, to_uint8

from .config import DegradationConfig, NoiseStage, ResizeStage
from .kernels import final_sinc_kernels, random_blur_kernels, uniform

RESIZE_MODES = ("area", "bilinear", "bicubic")
# What the applied-degradation scores mean (the targets of the estimator and the noise/blur knobs
# of a model trained with `scores_from: applied`), each clamped to [0, 1]:
# - blur: the RMS width of the two random blur kernels (each kernel's spatial standard deviation,
#   in pixels of the image it blurred), divided by BLUR_STD_FULL: 1 = the widest first-stage
#   Gaussian combined with the widest second-stage one;
# - noise: the RMS of the standard deviations of the noise fields actually added in the two noise
#   stages (measured, so Gaussian and Poisson noise count alike), divided by NOISE_STD_FULL.
# Samples that are only bicubic-downscaled (`clean_probability`) score 0 and 0.
BLUR_STD_FULL = (3.0**2 + 1.5**2) ** 0.5
NOISE_STD_FULL = 20 / 255


@dataclass
class DegradedBatch:
    lowres: torch.Tensor  # (B,3,H/scale,W/scale) in [0,1], quantised to 8 bits
    highres: torch.Tensor  # (B,3,H,W) the target
    blur_score: torch.Tensor  # (B,) in [0,1], see BLUR_STD_FULL
    noise_score: torch.Tensor  # (B,) in [0,1], see NOISE_STD_FULL


def kernel_std(kernels: torch.Tensor) -> torch.Tensor:
    """(B,K,K) normalised kernels -> (B,) spatial standard deviation per axis, in pixels."""
    size = kernels.shape[-1]
    offsets = torch.arange(size, dtype=kernels.dtype) - size // 2
    radius2 = offsets[:, None] ** 2 + offsets[None, :] ** 2
    weights = kernels / kernels.sum(dim=(1, 2), keepdim=True)
    return ((weights * radius2).sum(dim=(1, 2)).clamp(min=0) / 2).sqrt()


def blur(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Per-sample (B,K,K) kernels, reflect borders (Real-ESRGAN's filter2D)."""
    return kornia.filters.filter2d(images, kernels.to(images), border_type="reflect")


def resize(images: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    if mode == "area":
        return F.interpolate(images, size=size, mode=mode)
    return F.interpolate(images, size=size, mode=mode, align_corners=False)


def gaussian_noise(images: torch.Tensor, sigma: torch.Tensor, gray: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Additive N(0, σ²) noise, σ per sample on the 0..255 scale; `gray` samples share one field
    across channels. Returns the clamped noisy images."""
    batch, _, height, width = images.shape
    color = torch.randn((batch, 3, height, width), generator=generator)
    mono = torch.randn((batch, 1, height, width), generator=generator).expand(-1, 3, -1, -1)
    field = torch.where(gray[:, None, None, None], mono, color).to(images)
    return (images + field * (sigma.to(images) / 255)[:, None, None, None]).clamp(0, 1)


def poisson_noise(images: torch.Tensor, scale: torch.Tensor, gray: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shot noise as Real-ESRGAN models it: Poisson(img·v)/v − img with v the number of distinct
    values rounded up to a power of two, times `scale`; gray samples draw it on the luma."""
    images = images.clamp(0, 1)
    luma = kornia.color.rgb_to_grayscale(images).expand(-1, 3, -1, -1)
    source = torch.where(gray[:, None, None, None].to(images.device), luma, images)
    levels = torch.tensor([2.0 ** torch.ceil(torch.log2(torch.tensor(float(len(torch.unique(s)))))) for s in source])
    levels = levels.to(images)[:, None, None, None]
    counts = torch.poisson((source * levels).cpu().float(), generator=generator).to(images)
    noise = counts / levels - source
    noise = torch.where(gray[:, None, None, None].to(images.device), noise[:, :1].expand(-1, 3, -1, -1), noise)
    return (images + noise * scale.to(images)[:, None, None, None]).clamp(0, 1)


def jpeg(images: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG encode/decode round trip at per-sample quality (kornia pads to 16 internally)."""
    return kornia.enhance.jpeg_codec_differentiable(images.clamp(0, 1).float(), quality.float().to(images.device)).to(images)


def random_noise(images: torch.Tensor, stage: NoiseStage, generator: torch.Generator) -> torch.Tensor:
    count = images.shape[0]
    gray = torch.rand(count, generator=generator) < stage.gray_probability
    if torch.rand(1, generator=generator).item() < stage.gaussian_probability:
        return gaussian_noise(images, uniform(*stage.gaussian_sigma, count, generator).float(), gray, generator)
    return poisson_noise(images, uniform(*stage.poisson_scale, count, generator).float(), gray, generator)


def random_resize_factor(stage: ResizeStage, generator: torch.Generator) -> float:
    """Up (1..max), down (min..1) or keep, with the stage's probabilities."""
    direction = torch.multinomial(torch.tensor(stage.probs, dtype=torch.float64), 1, generator=generator).item()
    low, high = stage.range
    if direction == 0:
        return float(uniform(1.0, high, 1, generator))
    if direction == 1:
        return float(uniform(low, 1.0, 1, generator))
    return 1.0


def random_mode(generator: torch.Generator) -> str:
    return RESIZE_MODES[torch.randint(len(RESIZE_MODES), (1,), generator=generator).item()]


class RealESRGANDegradation:
    """Callable: HR batch (B,3,H,W) in [0,1] -> DegradedBatch. Runs on the images' device; the
    random draws stay on the CPU generator so the same seed gives the same batch everywhere."""

    def __init__(self, config: DegradationConfig):
        self.config = config

    @torch.no_grad()
    def __call__(self, highres: torch.Tensor, generator: torch.Generator) -> DegradedBatch:
        cfg = self.config
        batch, _, height, width = highres.shape
        if height % cfg.scale or width % cfg.scale:
            raise ValueError(f"HR size {height}x{width} is not a multiple of the scale {cfg.scale}")
        kernels1, _ = random_blur_kernels(cfg.blur1, batch, generator)
        kernels2, _ = random_blur_kernels(cfg.blur2, batch, generator)
        apply_blur2 = torch.rand(batch, generator=generator) < cfg.blur2.probability
        final_kernels = final_sinc_kernels(cfg.final_sinc_probability, cfg.final_sinc_kernel_size_max, batch, generator)

        # First stage.
        out = blur(highres.float(), kernels1)
        factor = random_resize_factor(cfg.resize1, generator)
        out = resize(out, (max(1, int(height * factor)), max(1, int(width * factor))), random_mode(generator))
        noisy = random_noise(out, cfg.noise1, generator)
        noise1_std, out = (noisy - out).flatten(1).std(dim=1), noisy
        out = jpeg(out, uniform(*cfg.jpeg1, batch, generator))

        # Second stage: blur only the samples drawn for it.
        out = torch.where(apply_blur2.to(out.device)[:, None, None, None], blur(out, kernels2), out)
        factor = random_resize_factor(cfg.resize2, generator)
        target = (height // cfg.scale, width // cfg.scale)
        size = (max(1, int(target[0] * factor)), max(1, int(target[1] * factor)))
        out = resize(out, size, random_mode(generator))
        noisy = random_noise(out, cfg.noise2, generator)
        noise2_std, out = (noisy - out).flatten(1).std(dim=1), noisy
        quality2 = uniform(*cfg.jpeg2, batch, generator)
        if torch.rand(1, generator=generator).item() < 0.5:
            out = blur(resize(out, target, random_mode(generator)), final_kernels)
            out = jpeg(out, quality2)
        else:
            out = jpeg(out, quality2)
            out = blur(resize(out, target, random_mode(generator)), final_kernels)

        blur_std = (kernel_std(kernels1) ** 2 + torch.where(apply_blur2, kernel_std(kernels2), 0) ** 2).sqrt()
        blur_score = (blur_std / BLUR_STD_FULL).clamp(0, 1).to(highres.device)
        noise_score = ((noise1_std**2 + noise2_std**2).sqrt().cpu() / NOISE_STD_FULL).clamp(0, 1).to(highres.device)
        if cfg.clean_probability > 0:
            clean = (torch.rand(batch, generator=generator) < cfg.clean_probability).to(highres.device)
            bicubic = F.interpolate(highres.float(), size=target, mode="bicubic", align_corners=False, antialias=True)
            out = torch.where(clean[:, None, None, None], bicubic, out)
            blur_score, noise_score = blur_score.masked_fill(clean, 0), noise_score.masked_fill(clean, 0)

        lowres = (out.clamp(0, 1) * 255).round() / 255
        return DegradedBatch(lowres=lowres, highres=highres, blur_score=blur_score.float(), noise_score=noise_score.float())


def realistic_lowres(highres: np.ndarray, seed: int, index: int) -> np.ndarray:
    """`s3diff evaluate --degradation realistic`: the uint8 LR of a uint8 HR crop under the
    default degradation, drawn from a generator seeded by (seed, index), so each photo gets the
    same LR in every run."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return to_uint8(RealESRGANDegradation(DegradationConfig())(to_tensor(highres), generator).lowres[0])
