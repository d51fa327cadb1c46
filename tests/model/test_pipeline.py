"""The inference path, each property checked against an independent computation."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from s3diff_serve.model import InvalidInputError, NonFiniteOutputError, S3DiffPipeline, UpscaleOptions
from s3diff_serve.model.config import MergedConfig
from s3diff_serve.model.one_step import pad_to_multiple
from s3diff_serve.model.output_size import resample
from s3diff_serve.model.presets import build_model

from .reference_path import reference_upscale


@pytest.fixture(scope="module")
def pipe():
    return S3DiffPipeline(build_model("tiny", seed=3), MergedConfig(unet={}, vae={}, scheduler={}), "cpu", "fp32")


@pytest.fixture(scope="module")
def lowres():
    return torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(7))


def test_matches_reference_path_within_8bit_rounding(pipe, lowres):
    expected = reference_upscale(pipe.model, lowres[:1]).astype(int)
    ours = pipe.enhance(lowres[:1]).images[0]
    ours_u8 = (ours * 255).round().permute(1, 2, 0).numpy().astype(int)
    # reference truncates twice (before and after the colour fix); we round once
    assert np.abs(ours_u8 - expected).max() <= 2
    assert np.abs(ours_u8 - expected).mean() < 1.0


def test_guidance_one_equals_positive_only_pass(pipe, lowres):
    result = pipe.enhance(lowres[:1], UpscaleOptions(guidance_scale=1.0, color_fix="none"))
    model = pipe.model
    with torch.no_grad():
        modulation = model.degradation_modulation(result.blur, result.noise)
        image = pad_to_multiple(pipe.upscale(lowres[:1]) * 2 - 1)
        latent = model.encode(image, modulation.vae)
        model.unet_slot.modulation = modulation.unet  # by hand, as the network call does
        eps = model.unet(latent, 999, encoder_hidden_states=model.positive_embeds).sample
        x0 = model.clean_sample(latent, eps)
        expected = model.decode(x0)[..., :64, :80] * 0.5 + 0.5
    torch.testing.assert_close(result.images, expected, atol=5e-5, rtol=0)  # VAE LoRA folded in ours


def test_guidance_changes_output(pipe, lowres):
    a = pipe.enhance(lowres[:1], UpscaleOptions(guidance_scale=1.0, color_fix="none")).images
    b = pipe.enhance(lowres[:1], UpscaleOptions(guidance_scale=1.5, color_fix="none")).images
    assert (a - b).abs().max() > 1e-3


def test_closed_form_step_equals_ddpm_scheduler(pipe):
    generator = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 8, 8, generator=generator)
    eps = torch.randn(2, 4, 8, 8, generator=generator)
    scheduler = DDPMScheduler.from_config(pipe.model.scheduler_config)
    scheduler.set_timesteps(1)
    expected = scheduler.step(eps, 999, latent, generator=generator).prev_sample
    torch.testing.assert_close(pipe.model.clean_sample(latent, eps), expected, atol=1e-5, rtol=1e-6)
    assert pipe.model.alpha_bar == pytest.approx(0.0046601, abs=1e-7)


def test_mixed_batch_equals_one_by_one(pipe, lowres):
    batch = pipe.enhance(lowres, noise=[0.1, 0.8], blur=[0.6, None])
    assert batch.noise.tolist() == pytest.approx([0.1, 0.8])
    for i in range(2):
        single = pipe.enhance(lowres[i : i + 1], noise=[[0.1, 0.8][i]], blur=[[0.6, None][i]])
        # a single image runs with the VAE LoRA folded into the weights: float reassociation only
        torch.testing.assert_close(batch.images[i : i + 1], single.images, atol=1e-4, rtol=0)
        assert single.blur.item() == pytest.approx(batch.blur[i].item(), abs=1e-6)


@pytest.mark.parametrize("size", [(1, 1), (5, 37), (17, 23), (33, 16)])
def test_output_is_exactly_four_times_input(pipe, size):
    result = pipe.enhance(torch.rand(1, 3, *size))
    assert tuple(result.images.shape) == (1, 3, size[0] * 4, size[1] * 4)
    assert 0 <= result.images.min() and result.images.max() <= 1


def test_overriding_noise_keeps_estimated_blur(pipe, lowres):
    estimated = pipe.estimate(lowres)
    result = pipe.enhance(lowres, noise=0.25)
    assert result.noise.tolist() == pytest.approx([0.25, 0.25])
    torch.testing.assert_close(result.blur, estimated.blur, atol=1e-6, rtol=0)


def test_scores_change_the_output(pipe, lowres):
    a = pipe.enhance(lowres[:1], noise=0.0, blur=0.0).images
    b = pipe.enhance(lowres[:1], noise=1.0, blur=1.0).images
    assert (a - b).abs().max() > 1e-3


def test_pil_input_and_mean_latent_is_deterministic(pipe):
    from PIL import Image

    array = (np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)
    first = pipe.enhance(Image.fromarray(array)).images
    second = pipe.enhance(torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1)).images
    assert torch.equal(first, second)


def test_sampled_latent_is_seeded(pipe, lowres):
    mean = pipe.enhance(lowres[:1]).images
    one = pipe.enhance(lowres[:1], sample=True, seed=1).images
    again = pipe.enhance(lowres[:1], sample=True, seed=1).images
    other = pipe.enhance(lowres[:1], sample=True, seed=2).images
    assert torch.equal(one, again)
    assert not torch.equal(one, other) and not torch.equal(one, mean)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"noise": 1.5}, "noise must be in"),
        ({"blur": -0.1}, "blur must be in"),
        ({"noise": [0.1, 0.2, 0.3]}, "3 values for a batch of 1"),
    ],
)
def test_bad_arguments_raise_clear_errors(pipe, lowres, kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        pipe.enhance(lowres[:1], **kwargs)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"color_fix": "sepia"}, "color_fix: Input should be 'wavelet', 'adain' or 'none'"),
        ({"guidance_scale": float("nan")}, "guidance_scale: Input should be a finite number"),
        ({"noise": 1.5}, "noise: Input should be less than or equal to 1"),
        ({"scale": 2, "width": 100}, "give only one of scale, width/height, longest_side"),
        ({"tile": 64}, "tile: Extra inputs are not permitted"),
    ],
)
def test_bad_options_raise_clear_errors(values, message):
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        UpscaleOptions.parse(**values)


def test_options_resize_the_x4_output(pipe, lowres):
    x4 = pipe.enhance(lowres[:1]).images
    resized = pipe.enhance(lowres[:1], UpscaleOptions(width=100)).images
    assert resized.shape[-2:] == (80, 100)  # 16x20 input: width 100 keeps the 4:5 aspect ratio
    torch.testing.assert_close(resized, resample(x4, (80, 100)))


def test_bad_images_raise_clear_errors(pipe):
    with pytest.raises(InvalidInputError, match=r"shape \(B,3,h,w\)"):
        pipe.enhance(torch.rand(1, 4, 8, 8))
    with pytest.raises(InvalidInputError, match="in \\[0, 1\\]"):
        pipe.enhance(torch.full((1, 3, 8, 8), 2.0))


def test_non_finite_output_raises(lowres):
    model = build_model("tiny", seed=4)
    with torch.no_grad():
        model.vae.decoder.conv_out.bias.fill_(float("nan"))
    pipe = S3DiffPipeline(model, MergedConfig(unet={}, vae={}, scheduler={}), "cpu", "fp32")
    with pytest.raises(NonFiniteOutputError, match="retry in fp32"):
        pipe.enhance(lowres[:1])


def test_bf16_on_cpu_is_close_to_fp32(lowres, monkeypatch):
    monkeypatch.setattr("s3diff_serve.model.runtime.cpu_has_fast_bf16", lambda: True)  # numerics, not speed
    fp32 = S3DiffPipeline(build_model("tiny", seed=5), MergedConfig(unet={}, vae={}, scheduler={}), "cpu", "fp32")
    bf16 = S3DiffPipeline(build_model("tiny", seed=5), MergedConfig(unet={}, vae={}, scheduler={}), "cpu", "bf16")
    assert bf16.model.unet.dtype == torch.bfloat16 and bf16.model.unet_modulation.fuse_mlp.weight.dtype == torch.float32
    a, b = fp32.enhance(lowres[:1]).images, bf16.enhance(lowres[:1]).images
    assert b.dtype == torch.float32
    # Measured on the tiny random-weight model (3 seeds, 2 sizes): mean 2.2-3.4 8-bit levels,
    # max 16-32 (eps errors are amplified ~14.6x by the t=999 step; the VAE contributes most).
    levels = ((a * 255).round() - (b * 255).round()).abs()
    assert levels.mean() < 5 and levels.max() <= 48


def test_reflect_padding_matches_torch_and_handles_tiny_inputs():
    image = torch.rand(1, 3, 68, 92)
    expected = torch.nn.functional.pad(image, (0, 36, 0, 60), mode="reflect")
    assert torch.equal(pad_to_multiple(image), expected)
    tiny = pad_to_multiple(torch.rand(1, 3, 4, 1))
    assert tuple(tiny.shape) == (1, 3, 64, 64)


def test_the_pre_resize_is_the_weights_own(pipe, lowres):
    """Bilinear (the released weights) or bicubic, as the merged config says; bicubic's overshoot
    is clamped, as the training input is. Computed independently with Pillow's filters, which
    use other kernels (bicubic a = -0.5 vs torch's -0.75), so only closeness is asserted."""
    import dataclasses

    from PIL import Image

    image = lowres[:1]
    plane = image[0, 0].numpy()
    size = (plane.shape[1] * 4, plane.shape[0] * 4)
    resized = {}
    for mode, pil_filter in (("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)):
        other = S3DiffPipeline(pipe.model, dataclasses.replace(pipe.config, pre_resize=mode), "cpu", "fp32")
        resized[mode] = other.upscale(image)
        reference = torch.from_numpy(np.array(Image.fromarray(plane).resize(size, pil_filter)))
        assert (resized[mode][0, 0] - reference).abs().mean() < 0.02, mode
    assert resized["bicubic"].min() >= 0 and resized["bicubic"].max() <= 1
    assert (resized["bicubic"] - resized["bilinear"]).abs().mean() > 0.005
    assert torch.equal(pipe.upscale(image), resized["bilinear"])  # the released weights' default


def test_the_tile_that_runs_is_the_tile_that_was_priced(pipe, monkeypatch):
    """On CUDA the tile comes from the free memory. It is read once, when planning: a reading
    that changes before the plan runs (here: more memory free, which would allow one tile)
    must not change the tiles that run, which are the ones the plan priced."""
    from s3diff_serve.model import pipeline as pipeline_module
    from s3diff_serve.model import tiling

    per_pixel = tiling.CUDA_BYTES_PER_IMAGE_PIXEL[torch.float32] * pipe.latent_factor**2

    def free_bytes_for(tile: int) -> int:  # the reading at which choose_tile_size picks `tile`
        return int((tile + 1) ** 2 * per_pixel / tiling.CUDA_MEMORY_FRACTION)

    readings = iter([free_bytes_for(32), free_bytes_for(48), free_bytes_for(48)])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (next(readings), 80 * 2**30))
    choose = tiling.choose_tile_size
    # this pipeline's device is the CPU: choose its tiles as on a CUDA device, from the free memory
    monkeypatch.setattr(pipeline_module, "choose_tile_size",
                        lambda device, dtype, factor, requested=None: choose(torch.device("cuda"), dtype, factor))
    lowres = torch.rand(1, 3, 24, 80, generator=torch.Generator().manual_seed(4))  # latent 16 x 40
    plan = pipe.plan(24, 80)
    assert (plan.tile, plan.tiles) == (32, 2) and plan.work_units == 6
    assert choose(torch.device("cuda"), torch.float32, pipe.latent_factor) == 48  # memory has changed since
    decoded, units = [], []
    decode = pipe.model.decode
    monkeypatch.setattr(pipe.model, "decode", lambda latent: decoded.append(latent.shape[-2:]) or decode(latent))
    pipe.execute(lowres, plan, [0.2], [0.3], progress=lambda done, total: units.append((done, total)))
    assert decoded == [(16, 32), (16, 32)]  # the priced tiles (48 would have run one 16 x 40 tile)
    assert units[-1] == (plan.work_units, plan.work_units) and len(units) == plan.work_units
    assert next(readings) == free_bytes_for(48)  # execute read no free memory
