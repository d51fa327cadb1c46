"""The built-in demo model: the default weights, measurably better than bicubic on photos it never
trained on, and its noise/blur knobs steer the output in the direction they name."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from s3diff_serve.model import S3DiffPipeline
from s3diff_serve.model.builtin import BUILTIN_DIR, BUILTIN_NAME

DATA = Path(__file__).resolve().parents[1] / "data"
CROPS = sorted((DATA / "validation-crops").glob("*.png"))
FLAT_CROP = DATA / "flat-region-crops" / "mate-lady-bird.png"
COLOUR_CAST_LIMIT = 2.0  # mean colour error of a flat region, on the 0..255 scale


@pytest.fixture(scope="module")
def demo() -> S3DiffPipeline:
    return S3DiffPipeline.from_merged(device="cpu", dtype="fp32")


def lowres_of(highres: Image.Image) -> Image.Image:
    return highres.resize((highres.width // 4, highres.height // 4), Image.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def high_frequency_energy(image: torch.Tensor) -> float:
    """Mean squared difference between the image and a 3x3 box blur of it: noise and fine detail."""
    blurred = torch.nn.functional.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=False)
    return float(((image - blurred) ** 2).mean())


def test_no_weights_means_the_builtin_demo(demo):
    assert demo.source == BUILTIN_NAME and (BUILTIN_DIR / "config.json").is_file()
    assert (BUILTIN_DIR / "MODEL_CARD.md").is_file()
    sizes = sum(path.stat().st_size for path in BUILTIN_DIR.iterdir())
    assert sizes <= 15 * 1024 * 1024


@pytest.fixture(scope="module")
def lpips_alex(metric_weights):
    from s3diff_serve.evaluation.metrics import LPIPS

    return LPIPS("alex")


def degraded_lowres_of(highres: Image.Image, index: int) -> Image.Image:
    """The `realistic` input of `s3diff evaluate` (the training degradations, seeded per crop)."""
    from s3diff_serve.training.degradations import realistic_lowres

    return Image.fromarray(realistic_lowres(np.asarray(highres), seed=0, index=index))


@pytest.mark.network
@pytest.mark.parametrize("degradation", ["clean", "degraded"])
def test_demo_beats_bicubic_on_lpips_on_validation_crops(demo, lpips_alex, degradation):
    ours, bicubic = [], []
    for index, path in enumerate(CROPS):
        highres = Image.open(path).convert("RGB")
        lowres = lowres_of(highres) if degradation == "clean" else degraded_lowres_of(highres, index)
        target = to_tensor(highres) * 2 - 1
        with torch.no_grad():
            output = demo.enhance(to_tensor(lowres)).images
            ours.append(float(lpips_alex(output * 2 - 1, target)))
            upscaled = to_tensor(lowres.resize(highres.size, Image.BICUBIC))
            bicubic.append(float(lpips_alex(upscaled * 2 - 1, target)))
    assert len(CROPS) == 2 and np.mean(ours) < np.mean(bicubic), (ours, bicubic)


def test_no_colour_cast_on_a_flat_white_region(demo):
    """Where the input is flat, the output keeps its colour: the mean colour of the crop's flat
    white region (every pixel whose 9x9 neighbourhood is pure white, edges of the green and
    purple border included) against the input's there, per channel, on the 0..255 scale."""
    highres = Image.open(FLAT_CROP).convert("RGB")
    lowres = lowres_of(highres)
    output = demo.enhance(to_tensor(lowres)).images[0].permute(1, 2, 0).numpy() * 255
    white = np.asarray(highres.convert("L").filter(ImageFilter.MinFilter(9))) == 255
    assert white.mean() > 0.4  # most of the crop
    reference = np.asarray(lowres.resize(highres.size, Image.BICUBIC), dtype=np.float64)
    error = np.abs(output[white].mean(axis=0) - reference[white].mean(axis=0))
    assert error.max() < COLOUR_CAST_LIMIT, error


def noise_knob_energies(demo: S3DiffPipeline, path: Path) -> list[float]:
    """High-frequency energy of the output at noise 0, 0.5, 1 (blur 0.2) for an input with added
    Gaussian noise (sigma 12/255)."""
    lowres = np.asarray(lowres_of(Image.open(path).convert("RGB")), dtype=np.float32) / 255
    noisy = np.clip(lowres + np.random.default_rng(0).normal(0, 12 / 255, lowres.shape), 0, 1).astype(np.float32)
    image = torch.from_numpy(noisy).permute(2, 0, 1)[None]
    return [high_frequency_energy(demo.enhance(image, noise=n, blur=0.2).images) for n in (0.0, 0.5, 1.0)]


@pytest.mark.parametrize("path", CROPS, ids=lambda p: p.stem)
def test_the_noise_knob_removes_noise(demo, path):
    energies = noise_knob_energies(demo, path)
    assert energies[0] > energies[1] and energies[0] > energies[2], energies


@pytest.mark.xfail(strict=True, reason="the demo's noise knob is strongest near 0.5, not yet monotonic up to 1")
@pytest.mark.parametrize("path", CROPS, ids=lambda p: p.stem)
def test_the_noise_knob_removes_more_noise_as_it_rises(demo, path):
    energies = noise_knob_energies(demo, path)
    assert energies[0] > energies[1] > energies[2], energies


@pytest.mark.parametrize("path", CROPS, ids=lambda p: p.stem)
def test_the_blur_knob_sharpens_more_as_it_rises(demo, path):
    blurred = Image.open(path).convert("RGB").filter(ImageFilter.GaussianBlur(1.5))
    image = to_tensor(lowres_of(blurred))
    energies = [high_frequency_energy(demo.enhance(image, noise=0.0, blur=b).images) for b in (0.0, 0.5, 1.0)]
    assert energies[0] < energies[1] < energies[2], energies
