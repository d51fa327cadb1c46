"""Real-ESRGAN degradation: value ranges, every stage acts, seeds reproduce, JPEG monotone,
kernels and noise against independent computations."""
from __future__ import annotations

import math

import kornia
import pytest
import torch
import torch.nn.functional as F
from scipy.special import j1

from s3diff_serve.training.config import BlurStage, DegradationConfig
from s3diff_serve.training.degradations import RealESRGANDegradation, blur, gaussian_noise, jpeg, poisson_noise, resize
from s3diff_serve.training.kernels import SINC, circular_lowpass, final_sinc_kernels, gaussian_family, random_blur_kernels


def test_output_ranges_shapes_and_quantisation(hr_batch):
    out = RealESRGANDegradation(DegradationConfig())(hr_batch, torch.Generator().manual_seed(1))
    assert out.lowres.shape == (2, 3, 16, 16)
    assert torch.equal(out.highres, hr_batch)
    assert out.lowres.min() >= 0 and out.lowres.max() <= 1
    assert torch.equal(out.lowres, (out.lowres * 255).round() / 255)  # 8-bit levels, as saved LR
    bicubic = F.interpolate(hr_batch, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    assert (out.lowres - bicubic).abs().mean() > 0.01  # degraded, not a plain downscale


def test_same_seed_same_output_other_seed_differs(hr_batch):
    degrade = RealESRGANDegradation(DegradationConfig())
    first = degrade(hr_batch, torch.Generator().manual_seed(7))
    again = degrade(hr_batch, torch.Generator().manual_seed(7))
    other = degrade(hr_batch, torch.Generator().manual_seed(8))
    assert torch.equal(first.lowres, again.lowres)
    assert not torch.equal(first.lowres, other.lowres)


def test_each_stage_changes_the_image(hr_batch):
    generator = torch.Generator().manual_seed(0)
    kernels, _ = random_blur_kernels(BlurStage(), 2, generator)
    flags = torch.tensor([False, True])
    stages = {
        "blur": blur(hr_batch, kernels),
        "resize": resize(resize(hr_batch, (40, 40), "bicubic"), (64, 64), "bilinear"),
        "gaussian": gaussian_noise(hr_batch, torch.tensor([10.0, 10.0]), flags, generator),
        "poisson": poisson_noise(hr_batch, torch.tensor([2.0, 2.0]), flags, generator),
        "jpeg": jpeg(hr_batch, torch.tensor([60.0, 60.0])),
        "final_sinc": blur(hr_batch, final_sinc_kernels(1.0, 21, 2, generator)),
    }
    for name, out in stages.items():
        assert out.shape == hr_batch.shape, name
        assert (out - hr_batch).abs().mean() > 1e-3, f"stage {name} left the image unchanged"


def test_jpeg_error_falls_monotonically_with_quality(hr_batch):
    errors = [float((jpeg(hr_batch, torch.tensor([q, q])) - hr_batch).pow(2).mean()) for q in (10.0, 30.0, 60.0, 90.0, 100.0)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_isotropic_kernel_equals_kornia_gaussian():
    sigma = 1.7
    ours = gaussian_family(torch.tensor([0]), torch.tensor([sigma], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64),
                           torch.tensor([0.3], dtype=torch.float64), torch.ones(1), torch.ones(1), 21)
    ours = (ours / ours.sum()).float()
    reference = kornia.filters.get_gaussian_kernel2d((21, 21), (sigma, sigma))
    assert torch.allclose(ours, reference, atol=1e-6)


def test_anisotropic_kernel_rotates_with_angle():
    args = (torch.tensor([1, 1]), torch.tensor([3.0, 3.0], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64),
            torch.tensor([0.0, math.pi / 2], dtype=torch.float64), torch.ones(2), torch.ones(2))
    horizontal, vertical = gaussian_family(*args, 21)
    assert torch.allclose(horizontal.T, vertical, atol=1e-12)  # a 90° turn transposes the kernel
    assert horizontal[10, 15] > horizontal[15, 10]  # elongated along x at angle 0


def test_random_kernels_normalised_and_zero_outside_their_size():
    generator = torch.Generator().manual_seed(3)
    stage = BlurStage(kernel_size_max=11, sinc_probability=0.5)
    kernels, kinds = random_blur_kernels(stage, 64, generator)
    assert kernels.shape == (64, 11, 11)
    assert torch.allclose(kernels.sum(dim=(1, 2)), torch.ones(64), atol=1e-5)
    assert (kinds == SINC).any() and (kinds < SINC).any()
    border = torch.cat([kernels[:, 0], kernels[:, -1], kernels[:, :, 0], kernels[:, :, -1]], dim=1)
    assert ((border == 0).all(dim=1)).any()  # some kernels are smaller than the 11x11 frame


def test_circular_lowpass_matches_bessel_formula_and_is_radial():
    cutoff = torch.tensor([math.pi / 2], dtype=torch.float64)
    kernel = circular_lowpass(cutoff, 21)[0]
    radius = math.hypot(3, 4)
    raw_value = (math.pi / 2) * j1(math.pi / 2 * radius) / (2 * math.pi * radius)
    raw_center = (math.pi / 2) ** 2 / (4 * math.pi)
    assert float(kernel[10 + 4, 10 + 3] / kernel[10, 10]) == pytest.approx(raw_value / raw_center, rel=1e-6)
    assert torch.allclose(kernel, kernel.T) and torch.allclose(kernel, kernel.flip(0))


def test_gaussian_noise_std_and_gray_noise():
    flat = torch.full((2, 3, 128, 128), 0.5)
    noisy = gaussian_noise(flat, torch.tensor([10.0, 10.0]), torch.tensor([False, True]), torch.Generator().manual_seed(0))
    noise = noisy - flat
    assert float(noise.std()) == pytest.approx(10 / 255, rel=0.03)
    assert torch.equal(noise[1, 0], noise[1, 1]) and torch.equal(noise[1, 1], noise[1, 2])  # gray: one field
    assert not torch.equal(noise[0, 0], noise[0, 1])


def test_poisson_noise_keeps_the_mean(hr_batch):
    noisy = poisson_noise(hr_batch, torch.tensor([1.0, 1.0]), torch.tensor([False, False]), torch.Generator().manual_seed(0))
    assert float((noisy - hr_batch).mean().abs()) < 2e-3
    assert float((noisy - hr_batch).abs().mean()) > 1e-3
