"""Tiling: exact passthrough for one tile, no seams on many, CUDA tile choice and OOM retry."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import data as photos
from torch import nn

from s3diff_serve.model import S3DiffPipeline
from s3diff_serve.model.color_fix import color_fix
from s3diff_serve.model.config import MergedConfig
from s3diff_serve.model.options import UpscaleOptions
from s3diff_serve.model.one_step import pad_to_multiple
from s3diff_serve.model.presets import build_model
from s3diff_serve.model.tiling import (
    MIN_TILE, TilingOutOfMemoryError, choose_tile_size, estimator_view, gaussian_weights, overlap_for,
    run_with_oom_retry, tile_starts, tiled_apply, tiled_vae_decode, tiled_vae_encode,
)


@settings(max_examples=80, deadline=None)
@given(length=st.integers(1, 400).map(lambda n: 8 * n), tile=st.integers(4, 40).map(lambda n: 8 * n))
def test_tile_starts_cover_with_overlap_on_the_latent_grid(length, tile):
    overlap = overlap_for(tile, 8)
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert min(length, starts[-1] + tile) == length
    assert all(start % 8 == 0 for start in starts)
    for previous, following in zip(starts, starts[1:]):
        assert following - previous <= tile - overlap  # neighbours overlap by at least `overlap`


def test_gaussian_weights_follow_the_reference_formula():
    weights = gaussian_weights(96, 64)
    for row, col in [(0, 0), (47, 31), (95, 10), (30, 63)]:
        dy, dx = (row - 47.5) / 96, (col - 31.5) / 64
        assert weights[row, col].item() == pytest.approx(math.exp(-(dy**2 + dx**2) / 0.02), rel=1e-5)


@pytest.mark.parametrize("name, fn, scale, size", [
    ("pointwise", lambda t: t * 2 - 0.5, 1.0, (200, 136)),
    ("decoder-like x8", lambda t: F.interpolate(t, scale_factor=8, mode="nearest"), 8.0, (56, 40)),
    ("encoder-like /8", lambda t: F.avg_pool2d(t, 8), 1 / 8, (1024, 640)),
])
def test_blending_reproduces_position_independent_functions(name, fn, scale, size):
    """For a function without spatial context, tiling must change nothing: this checks the
    weight normalisation and the tile placement at every scale."""
    tensor = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    tile, overlap = (96, 32) if scale >= 1 else (768, 256)
    expected = fn(tensor)
    tiled = tiled_apply(fn, tensor, tile, overlap, scale=scale)
    assert tiled.shape == expected.shape
    torch.testing.assert_close(tiled, expected, atol=2e-6, rtol=0)


def test_input_that_fits_one_tile_goes_straight_through():
    tensor = torch.rand(1, 4, 96, 40)
    calls = []

    def fn(tile):
        calls.append(tile.shape)
        return tile.sin()
    result = tiled_apply(fn, tensor, 96, 32)
    assert calls == [tensor.shape] and torch.equal(result, tensor.sin())


class GroupNormNet(nn.Module):
    """A stand-in for the VAE decoder's building blocks (diffusers' ResnetBlock2D: GroupNorm ->
    SiLU -> zero-padded conv) with a skip from the input, so its untiled output is a smooth image
    and per-tile GroupNorm statistics and padding are the only sources of tiling error."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_in = nn.Conv2d(3, 32, 3, padding=1)
        self.blocks = nn.ModuleList(ResnetBlock2D(in_channels=32, temb_channels=None, groups=8) for _ in range(2))
        self.conv_out = nn.Conv2d(32, 3, 3, padding=1)

    @torch.no_grad()
    def forward(self, image):
        hidden = self.conv_in(image)
        for block in self.blocks:
            hidden = block(hidden, None)
        return image + self.conv_out(hidden)


def _seam_ratio(tiled, untiled, tile, overlap, axis):
    """Gradient energy the tiling added on tile-border lines, relative to what it added elsewhere
    (1.0: borders are like any other line). Borders: every tile edge and every overlap's middle."""
    length = tiled.shape[axis]
    starts = tile_starts(length, tile, overlap)
    lines = {s for s in starts[1:]} | {s + tile for s in starts[:-1]}
    lines |= {(a + tile + b) // 2 for a, b in zip(starts, starts[1:])}
    border = torch.zeros(length - 1, dtype=torch.bool)
    border[[line - 1 for line in lines if 0 < line < length]] = True
    reduce = [d for d in range(4) if d != axis]
    tiled_energy = (tiled.diff(dim=axis) ** 2).mean(dim=reduce)
    untiled_energy = (untiled.diff(dim=axis) ** 2).mean(dim=reduce)
    on_border = tiled_energy[border].sum() / untiled_energy[border].sum()
    elsewhere = tiled_energy[~border].sum() / untiled_energy[~border].sum()
    return (on_border / elsewhere).item()


@pytest.fixture(scope="module")
def astronaut():
    return torch.from_numpy(photos.astronaut()[::2, ::2][:192, :256].copy()).permute(2, 0, 1).float()[None] / 255


def test_blended_tiles_leave_no_seams_where_hard_cut_tiles_do(astronaut):
    net = GroupNormNet().eval()
    untiled = net(astronaut)
    blended = tiled_apply(net, astronaut, 64, 24)
    hard_cut = tiled_apply(net, astronaut, 64, 0)  # no overlap: each pixel from exactly one tile
    for axis in (2, 3):
        # Measured (rows / columns): blended 1.05 / 0.98, hard cut 7.2 / 3.1.
        assert _seam_ratio(blended, untiled, 64, 24, axis) <= 1.1
        assert _seam_ratio(hard_cut, untiled, 64, 0, axis) >= 2.5
    # Tiled vs untiled, measured 0.057 mean / 0.97 max abs (a random GroupNorm net is far more
    # sensitive to per-tile statistics than a trained VAE; tiles of 96/32 give 0.043 / 0.45).
    difference = (blended - untiled).abs()
    assert difference.mean() < 0.065 and difference.mean() < 0.75 * (hard_cut - untiled).abs().mean()


@pytest.fixture(scope="module")
def tiny_pipe():
    return S3DiffPipeline(build_model("tiny", seed=5), MergedConfig(unet={}, vae={}, scheduler={}), "cpu", "fp32")


@pytest.fixture(scope="module")
def tiny_f4_pipe():
    return S3DiffPipeline(build_model("tiny-f4", seed=5), MergedConfig(unet={}, vae={}, scheduler={}), "cpu", "fp32")


@pytest.mark.parametrize("pipe_name, factor", [("tiny_pipe", 8), ("tiny_f4_pipe", 4)])
def test_image_in_one_tile_gives_exactly_the_untiled_output(pipe_name, factor, request):
    """The default tiling on a small image against the stages run by hand without any tiling."""
    tiny_pipe = request.getfixturevalue(pipe_name)
    assert tiny_pipe.latent_factor == factor
    lowres = torch.rand(1, 3, 16, 22, generator=torch.Generator().manual_seed(2))
    result = tiny_pipe.enhance(lowres, noise=0.3, blur=0.6)
    model = tiny_pipe.model
    with torch.inference_mode():
        upscaled = tiny_pipe.upscale(lowres)
        modulation = model.degradation_modulation(torch.tensor([0.6]), torch.tensor([0.3]))
        with model.vae_slot.folded(modulation.vae):
            latent = model.encode(pad_to_multiple(upscaled * 2 - 1), modulation.vae)
        clean = model.clean_sample(latent, model.predict_noise(latent, modulation.unet, 1.07))
        decoded = model.decode(clean)[..., :64, :88]
        expected = color_fix(decoded * 0.5 + 0.5, upscaled, "wavelet")
    assert torch.equal(result.images, expected)


def test_tiles_report_progress_and_oom_retries_with_smaller_tiles(tiny_pipe, monkeypatch):
    lowres = torch.rand(1, 3, 66, 16, generator=torch.Generator().manual_seed(3))  # latent 40 x 8
    progress = []
    small_tiles = tiny_pipe.enhance(lowres, noise=0.2, blur=0.2, tile_size=32, progress=lambda *p: progress.append(p))
    # tiles of 32 (overlap 8) over a 40 x 8 latent: 2 x 1 per stage, 3 stages
    assert progress == [(done, 6) for done in range(1, 7)]

    decode = tiny_pipe.model.decode
    decoded_sizes = []

    def decode_with_small_memory(latent):
        decoded_sizes.append(tuple(latent.shape[-2:]))
        if latent.shape[-2] > 32:
            raise torch.cuda.OutOfMemoryError("simulated: tile too large")
        return decode(latent)
    monkeypatch.setattr(tiny_pipe.model, "decode", decode_with_small_memory)
    retried = tiny_pipe.enhance(lowres, noise=0.2, blur=0.2, tile_size=64)
    assert decoded_sizes == [(40, 8), (32, 8), (32, 8)]  # whole latent -> OOM -> halved tiles
    assert torch.equal(retried.images, small_tiles.images)


def test_oom_retry_gives_up_with_a_clear_error():
    tried = []

    def always_oom(tile):
        tried.append(tile)
        raise torch.cuda.OutOfMemoryError("simulated")
    with pytest.raises(TilingOutOfMemoryError, match="32-pixel"):
        run_with_oom_retry(always_oom, 128, 8)
    assert tried == [128, 64, 32]


@pytest.mark.parametrize("free_bytes, dtype, expected", [
    (8 * 2**30, torch.float16, 96),     # sqrt(8 GiB * 0.7 / 650 kB) = 96.2
    (8 * 2**30, torch.float32, 64),     # sqrt(8 GiB * 0.7 / 1.3 MB) = 68.0 -> 64
    (80 * 2**30, torch.bfloat16, 304),  # 304.2
    (200 * 2**30, torch.bfloat16, 320),  # capped
    (100 * 2**20, torch.float16, MIN_TILE),
])
def test_cuda_tile_size_follows_free_memory(monkeypatch, free_bytes, dtype, expected):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 2 * free_bytes))
    assert choose_tile_size(torch.device("cuda"), dtype, 8) == expected
    assert choose_tile_size(torch.device("cuda"), dtype, 8, requested=48) == 48


def test_cpu_tile_size_and_validation():
    assert choose_tile_size(torch.device("cpu"), torch.float32, 8) == 96
    for bad in (24, 100):
        with pytest.raises(ValueError, match="multiple of 8"):
            choose_tile_size(torch.device("cpu"), torch.float32, 8, requested=bad)
    assert choose_tile_size(torch.device("cpu"), torch.float32, 4, requested=100) == 100  # factor 4: multiples of 4
    with pytest.raises(ValueError, match="multiple of 4"):
        choose_tile_size(torch.device("cpu"), torch.float32, 4, requested=98)


def test_bad_tile_size_is_an_input_error(tiny_pipe):
    with pytest.raises(ValueError, match="tile size"):
        tiny_pipe.enhance(torch.rand(1, 3, 8, 8), noise=0.1, blur=0.1, tile_size=20)


def test_estimator_sees_a_centre_crop_of_large_inputs():
    lowres = torch.arange(2 * 3 * 700 * 600, dtype=torch.float32).reshape(2, 3, 700, 600)
    view = estimator_view(lowres, max_side=512)
    assert torch.equal(view, lowres[..., 94:606, 44:556])
    small = torch.rand(1, 3, 300, 200)
    assert estimator_view(small, max_side=512) is not None and torch.equal(estimator_view(small, 512), small)


def test_tiled_vae_round_trip_matches_untiled_in_shape_and_grid():
    """Encoder and decoder tiles land on the same latent grid (image tiles = 8 x latent tiles)."""
    image = torch.rand(1, 3, 320, 192)
    encode = lambda tile: F.avg_pool2d(tile, 8)  # noqa: E731
    decode = lambda latent: F.interpolate(latent, scale_factor=8, mode="nearest")  # noqa: E731
    latent = tiled_vae_encode(encode, image, 8, tile=32)
    assert latent.shape == (1, 3, 40, 24)
    torch.testing.assert_close(tiled_vae_decode(decode, latent, 8, tile=32), decode(encode(image)), atol=2e-6, rtol=0)



class StandInVAE:
    """A VAE of latent factor f made of GroupNormNet (the decoder's building blocks): encode is
    the net then an f x f average pool, decode an f x bilinear upsample then the net. Swapped into
    a tiny model's pipeline (UNet output zeroed, so the t=999 step only rescales the latent), it
    makes the pipeline's own tiling at factor f the only source of error, as for factor 8 above."""

    def __init__(self, factor: int, alpha_bar: float):
        self.net, self.factor, self.alpha_bar = GroupNormNet().eval(), factor, alpha_bar

    def encode(self, image, *args):
        return F.pad(F.avg_pool2d(self.net(image), self.factor), (0, 0, 0, 0, 0, 1))  # 4 latent channels

    def decode(self, latent):
        return self.net(F.interpolate(latent[:, :3] * self.alpha_bar**0.5, scale_factor=self.factor, mode="bilinear"))


def _tiled_and_untiled(preset: str, lowres: torch.Tensor, image_tile: int, monkeypatch):
    """A tiny model of `preset` through the pipeline with its VAE swapped for StandInVAE at the
    model's latent factor, untiled and with latent tiles that cover `image_tile` image pixels."""
    model = build_model(preset, seed=5)
    with torch.no_grad():
        model.unet.conv_out.weight.zero_()
        model.unet.conv_out.bias.zero_()
    pipe = S3DiffPipeline(model, MergedConfig(unet={}, vae=dict(model.vae.config), scheduler={}), "cpu", "fp32")
    stand_in = StandInVAE(pipe.latent_factor, model.alpha_bar)
    monkeypatch.setattr(model, "encode", stand_in.encode)
    monkeypatch.setattr(model, "decode", stand_in.decode)
    options = UpscaleOptions(noise=0.3, blur=0.3, color_fix="none")
    tile = image_tile // pipe.latent_factor
    untiled = pipe.enhance(lowres, options, tile_size=512).images
    tiled = pipe.enhance(lowres, options, tile_size=tile).images
    return pipe.latent_factor, pipe.plan(*lowres.shape[-2:], options, tile), tiled, untiled


def test_a_factor_4_model_tiles_without_seams_within_the_factor_8_bound(astronaut, monkeypatch):
    """The latent factor comes from the weights' VAE: a factor-4 model plans, pads and tiles on
    its own latent grid, and its tiles blend within the bound that factor 8 meets. Tiles of 384
    image pixels give both factors the same image-space geometry (overlap 128 px: latent 16 at
    factor 8, 32 at factor 4), so only the factor differs."""
    lowres = F.interpolate(astronaut, size=(128, 192), mode="area")  # model size 512 x 768
    measured = {}
    for preset in ("tiny", "tiny-f4"):
        factor, plan, tiled, untiled = _tiled_and_untiled(preset, lowres, 384, monkeypatch)
        assert plan.latent_factor == factor and plan.latent_size == (512 // factor, 768 // factor)
        assert plan.tiles == 6 and plan.work_pixels == 6 * 384 * 384  # 2 x 3 tiles of 384 image px
        assert overlap_for(384 // factor, factor) * factor == 128
        assert tiled.shape == untiled.shape == (1, 3, 512, 768)
        seams = max(_seam_ratio(tiled, untiled, 384, 128, axis) for axis in (2, 3))
        measured[factor] = (seams, (tiled - untiled).abs().mean().item())
    assert set(measured) == {8, 4}
    # Measured (worse axis's seam ratio, mean |tiled - untiled|): factor 8 1.05 / 0.040; factor 4 1.02 / 0.043.
    for seams, difference in measured.values():
        assert seams <= 1.1 and difference < 0.065, measured
