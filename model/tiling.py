"""Tiled inference so memory stays nearly flat as images grow (docs/model.md, "Tiling").

Every stage is a function over a callable: the UNet step, the VAE encoder and the VAE decoder each
run on overlapping tiles whose outputs are blended with Gaussian weights (the reference's
MultiDiffusion-style weights, variance 0.01 on normalised tile coordinates). A tensor that fits
in one tile is passed through untouched, so such images give exactly the untiled output.

The VAE's GroupNorm makes hard-cut tiles visibly wrong (each tile normalises with its own
statistics, so neighbours differ in tone and zero padding darkens their borders). We do not pool
statistics across tiles (the reference's approach, which keeps every tile's activations of a
layer alive); instead tiles overlap by a third and the Gaussian weights fade each tile out well
before its border, so tile edges carry almost no weight and tone differences turn into smooth
ramps. tests/model/test_tiling.py measures the seams and the tiled-vs-untiled bound.
"""
from __future__ import annotations

import math
from typing import Callable, TypeVar

import torch

# `factor` below is the weights' latent factor (the VAE's spatial factor, MergedConfig.latent_factor):
# tile sides and overlaps stay on multiples of it.
from s3diff_serve.model.config import DEFAULT_TILE, MIN_TILE, validate_tile_size
from s3diff_serve.model.errors import TilingOutOfMemoryError

GAUSSIAN_VARIANCE = 0.01
# Peak CUDA bytes per image pixel of a tile (the VAE decoder dominates: 512 channels at the
# latent size, then 128-256 channels at 8x8 times that area). An estimate from the SD 2.x VAE's
# layer sizes (1.3 MB per latent pixel at factor 8, i.e. per 64 image pixels), halved for 16-bit
# weights; tiles are chosen to use at most CUDA_MEMORY_FRACTION of the free memory, and an OOM
# still falls back to smaller tiles (run_with_oom_retry).
CUDA_BYTES_PER_IMAGE_PIXEL = {torch.float32: 1_300_000 / 64, torch.float16: 650_000 / 64, torch.bfloat16: 650_000 / 64}
CUDA_MEMORY_FRACTION = 0.7
MAX_AUTO_TILE = 320
# The degradation estimator's cost grows with the input area (about 1.2 MMAC per pixel), so it
# sees at most this many pixels per side of the low-resolution image; see `estimator_view`.
ESTIMATOR_MAX_SIDE = 512

T = TypeVar("T")


def overlap_for(tile: int, factor: int) -> int:
    """The overlap that goes with a tile size: a third, in multiples of the latent factor
    (factor 8: 96 -> 32, 48 -> 16)."""
    return max(factor, tile // 3 // factor * factor)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` covering [0, length), neighbours overlapping by at least
    `overlap`; the last tile ends exactly at `length`. Starts are multiples of g when `length`,
    `tile` and `overlap` are (so latent tiles map onto whole image pixels)."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [index * stride for index in range(count - 1)] + [length - tile]


def count_tiles(height: int, width: int, tile: int, overlap: int) -> int:
    return len(tile_starts(height, tile, overlap)) * len(tile_starts(width, tile, overlap))


def gaussian_weights(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """(height, width) blending weights: a Gaussian of variance 0.01 over coordinates normalised
    by the tile size, centred on the tile (the reference's `_gaussian_weights`)."""
    def profile(size: int) -> torch.Tensor:
        offsets = (torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2) / size
        return torch.exp(-offsets**2 / (2 * GAUSSIAN_VARIANCE))
    return (profile(height)[:, None] * profile(width)[None, :]).float()


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    tensor: torch.Tensor,
    tile: int,
    overlap: int,
    *,
    scale: float = 1.0,
    on_tile: Callable[[], None] | None = None,
) -> torch.Tensor:
    """`fn` over overlapping spatial tiles of `tensor` (..., H, W), Gaussian-blended.

    `fn` maps a (..., h, w) tile to (..., h*scale, w*scale) (scale = the latent factor for a
    decoder, its inverse for an encoder). A tensor no larger than one tile goes straight to `fn`, so its result is exactly the
    untiled one. `on_tile` is called after each tile (progress).
    """
    height, width = tensor.shape[-2:]
    if height <= tile and width <= tile:
        result = fn(tensor)
        if on_tile is not None:
            on_tile()
        return result
    if scale < 1 and any(round(value * scale) != value * scale for value in (height, width, tile, overlap)):
        raise ValueError(f"sizes must be multiples of {round(1 / scale)} to tile at scale {scale}")
    rows, cols = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    total = weights_sum = None
    for top in rows:
        for left in cols:
            tile_h, tile_w = min(tile, height), min(tile, width)
            output = fn(tensor[..., top:top + tile_h, left:left + tile_w])
            out_h, out_w = output.shape[-2:]
            out_top, out_left = round(top * scale), round(left * scale)
            if total is None:
                total = output.new_zeros((*output.shape[:-2], round(height * scale), round(width * scale)),
                                         dtype=torch.float32)
                weights_sum = total.new_zeros(total.shape[-2:])
            weight = gaussian_weights(out_h, out_w, output.device)
            total[..., out_top:out_top + out_h, out_left:out_left + out_w] += output.float() * weight
            weights_sum[out_top:out_top + out_h, out_left:out_left + out_w] += weight
            if on_tile is not None:
                on_tile()
    return (total / weights_sum).to(output.dtype)


def tiled_unet(denoise_fn: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, factor: int,
               tile: int = DEFAULT_TILE, overlap: int | None = None,
               on_tile: Callable[[], None] | None = None) -> torch.Tensor:
    """The UNet step (latent -> clean latent) over latent tiles."""
    overlap = overlap_for(tile, factor) if overlap is None else overlap
    return tiled_apply(denoise_fn, latent, tile, overlap, on_tile=on_tile)


def tiled_vae_encode(encode_fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, factor: int,
                     tile: int = DEFAULT_TILE, overlap: int | None = None,
                     on_tile: Callable[[], None] | None = None) -> torch.Tensor:
    """Image (B,3,H,W) -> latent (B,C,H/f,W/f), on image tiles of `tile` latent pixels (x f,
    the latent factor)."""
    overlap = overlap_for(tile, factor) if overlap is None else overlap
    return tiled_apply(encode_fn, image, tile * factor, overlap * factor, scale=1 / factor, on_tile=on_tile)


def tiled_vae_decode(decode_fn: Callable[[torch.Tensor], torch.Tensor], latent: torch.Tensor, factor: int,
                     tile: int = DEFAULT_TILE, overlap: int | None = None,
                     on_tile: Callable[[], None] | None = None) -> torch.Tensor:
    """Latent (B,C,h,w) -> image (B,3,f*h,f*w), on latent tiles."""
    overlap = overlap_for(tile, factor) if overlap is None else overlap
    return tiled_apply(decode_fn, latent, tile, overlap, scale=factor, on_tile=on_tile)


def choose_tile_size(device: torch.device, dtype: torch.dtype, factor: int, requested: int | None = None) -> int:
    """The tile size to use: `requested` if given; on CUDA the largest multiple of the latent
    factor (up to MAX_AUTO_TILE) whose estimated peak fits in the free memory; DEFAULT_TILE
    elsewhere."""
    if requested is not None:
        return validate_tile_size(requested, factor)
    if device.type != "cuda":
        return DEFAULT_TILE
    free_bytes, _ = torch.cuda.mem_get_info(device)
    per_pixel = CUDA_BYTES_PER_IMAGE_PIXEL.get(dtype, CUDA_BYTES_PER_IMAGE_PIXEL[torch.float32]) * factor**2
    side = int(math.sqrt(free_bytes * CUDA_MEMORY_FRACTION / per_pixel))
    return max(MIN_TILE, min(MAX_AUTO_TILE, side // factor * factor))


def run_with_oom_retry(run: Callable[[int], T], tile: int, factor: int) -> T:
    """`run(tile)`, retried with half-size tiles (multiples of the latent factor) after a CUDA
    out-of-memory error, down to MIN_TILE; then TilingOutOfMemoryError."""
    while True:
        try:
            return run(tile)
        except torch.cuda.OutOfMemoryError as err:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if tile <= MIN_TILE:
                raise TilingOutOfMemoryError(f"out of device memory even with {tile}-pixel latent tiles") from err
            tile = max(MIN_TILE, tile // 2 // factor * factor)


def estimator_view(lowres: torch.Tensor, max_side: int = ESTIMATOR_MAX_SIDE) -> torch.Tensor:
    """What the degradation estimator sees: the centre crop of at most `max_side` per side.

    A crop, not a resize: the estimator ends in a global average pool, so on a crop it averages
    the same local statistics over less area, while resizing changes the very noise and blur
    levels it measures. Measured (`s3diff bench-tiling`, 5 scikit-image photos with blur sigma
    1.5 + noise sigma 10/255, bound 256 px): scikit-image's noise estimate moves 0.14/255 on the
    crop vs 6.5/255 on the resize (of ~9.6 measured on the full image), its blur effect 0.028 vs
    0.069. The random-weight S3Diff estimator moves < 0.001 either way (random weights barely
    respond to degradations, so only the classical measures can tell the views apart here).
    """
    height, width = lowres.shape[-2:]
    crop_h, crop_w = min(height, max_side), min(width, max_side)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return lowres[..., top:top + crop_h, left:left + crop_w]

