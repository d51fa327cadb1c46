"""One-step S3Diff inference (docs/model.md, "The one-step inference path"): the single entry
point that the CLI, the service and training evaluation call.

pre-process (bilinear x4, [-1,1], reflect-pad to 64) -> degradation scores (estimator unless
overridden) -> modulated VAE-encoder latent -> ONE UNet call on [positive; negative] -> CFG ->
closed-form step t=999 -> decode -> crop -> colour fix.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .builtin import resolve_weights
from .degradation_estimator import BLUR_INDEX, NOISE_INDEX
from .checkpoints import load_merged, load_release
from .color_fix import color_fix as apply_color_fix
from .config import LATENT_FACTOR, PAD_MULTIPLE, SCALE, MergedConfig
from .errors import InvalidInputError, NonFiniteOutputError
from .options import SCORE_RANGE, UpscaleOptions
from .output_size import resample
from .compiled import ArtifactCache, cache_key_parts, warm_up_persistent
from .runtime import (  # noqa: F401 (re-exported)
    compile_cache_dir, cpu_has_fast_bf16, plan_compile, resolve_runtime, use_channels_last,
)
from .s3diff import S3DiffModel
from .tiling import (
    choose_tile_size, count_tiles, estimator_view, overlap_for, run_with_oom_retry, stage_tile_counts, tiled_unet,
    tiled_vae_decode, tiled_vae_encode,
)

log = logging.getLogger(__name__)
ScoreOverride = float | Sequence[float | None] | None
Progress = Callable[[int, int], None]


@dataclass
class DegradationScores:
    noise: torch.Tensor
    blur: torch.Tensor


@dataclass(frozen=True)
class UpscalePlan:
    """What one upscale will cost and how it runs, on this pipeline's device, before it runs:
    the geometry every caller (limits, queue cost, batching, progress) reads instead of
    re-deriving it."""

    input_size: tuple[int, int]  # (height, width)
    output_size: tuple[int, int]  # after the options' resize of the x4 result
    model_size: tuple[int, int]  # the x4 image the model makes
    padded_size: tuple[int, int]  # model_size reflect-padded to PAD_MULTIPLE: what the VAE sees
    latent_size: tuple[int, int]  # padded_size / LATENT_FACTOR
    tile: int  # latent tile side; an image with both latent sides <= tile runs untiled
    tiles: int  # tiles per stage (1 = untiled)
    batch_key: tuple | None  # equal keys may run as one pipeline call; None: runs alone (tiled)

    @property
    def tiled(self) -> bool:
        return self.tiles > 1

    @property
    def work_pixels(self) -> int:
        """The cost: image pixels the encoder and decoder process, padding and tile overlaps
        included (a 1x2000 input is 4x8000 model pixels but 64x8000 padded ones)."""
        tile_h, tile_w = (min(self.tile, side) for side in self.latent_size)
        return self.tiles * tile_h * tile_w * LATENT_FACTOR * LATENT_FACTOR

    @property
    def work_units(self) -> int:
        """Progress units: encoder, UNet and decoder tiles."""
        return 3 * self.tiles


@dataclass
class EnhanceResult:
    images: torch.Tensor
    noise: torch.Tensor
    blur: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


def pad_to_multiple(image: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Reflect-pad bottom/right to a multiple (as the reference). Reflection cannot reach further
    than the image itself, so tiny inputs are padded by repeated reflection, then replication."""
    while True:
        height, width = image.shape[-2:]
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h == 0 and pad_w == 0:
            return image
        step_h, step_w = min(pad_h, height - 1), min(pad_w, width - 1)
        if step_h == 0 and step_w == 0:
            return F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
        image = F.pad(image, (0, step_w, 0, step_h), mode="reflect")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_sample(value: ScoreOverride, batch: int, name: str) -> list[float | None]:
    values = [value] * batch if value is None or isinstance(value, (int, float)) else list(value)
    if len(values) != batch:
        raise InvalidInputError(f"{name}: got {len(values)} values for a batch of {batch}")
    low, high = SCORE_RANGE
    for item in values:
        if item is not None and not (low <= float(item) <= high):
            raise InvalidInputError(f"{name} must be in [{low:g}, {high:g}], got {item}")
    return values


class S3DiffPipeline:
    scale = SCALE

    def __init__(self, model: S3DiffModel, config: MergedConfig, device=None, dtype=None, source: str = "",
                 compile: str | bool | None = None):
        """`compile`: "auto" | "on" | "off" (None: $S3DIFF_COMPILE, else auto); see
        model/runtime.py. Compiled shapes are built by `warmup`, never on a request."""
        self.device, self.dtype = resolve_runtime(device, dtype)
        self.config = config
        self.source = source  # where the weights came from: a folder, or "builtin-demo"
        networks = (model.unet, model.vae)
        parameters = sum(p.numel() for network in networks for p in network.parameters())
        self.compile_plan = plan_compile(self.device, self.dtype, compile, parameters)
        channels_last = use_channels_last(self.device, self.dtype)
        self.model = model.to_runtime(self.device, self.dtype, channels_last).eval().requires_grad_(False)
        self.model.compile_calls(self.compile_plan)

    @classmethod
    def from_merged(cls, merged_dir: str | Path | None = None, device=None, dtype=None,
                    compile: str | bool | None = None) -> "S3DiffPipeline":
        """A merged weights folder; with none, the built-in demo model."""
        folder, source = resolve_weights(merged_dir)
        model, config = load_merged(folder)
        return cls(model, config, device, dtype, source, compile)

    @classmethod
    def from_release(cls, sd_turbo_dir, s3diff_pkl, de_net_pth, device=None, dtype=None,
                     compile: str | bool | None = None) -> "S3DiffPipeline":
        model = load_release(sd_turbo_dir, s3diff_pkl, de_net_pth)
        config = MergedConfig(unet=dict(model.unet.config), vae=dict(model.vae.config), scheduler=model.scheduler_config)
        return cls(model, config, device, dtype, compile=compile)

    @property
    def weights_id(self) -> str:
        return self.config.weights_id

    # --- pre/post-processing ----------------------------------------------------------------
    def to_tensor(self, images) -> torch.Tensor:
        """PIL image(s) or a (B,3,h,w)/(3,h,w) tensor in [0,1] -> float32 (B,3,h,w) on device."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, (list, tuple)):
            if not images or not all(isinstance(im, Image.Image) for im in images):
                raise InvalidInputError("expected a tensor, a PIL image or a non-empty list of PIL images")
            if len({im.size for im in images}) != 1:
                raise InvalidInputError("all images of one batch must have the same size")
            arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        if not isinstance(images, torch.Tensor):
            raise InvalidInputError(f"unsupported image type {type(images).__name__}")
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0 or min(images.shape[-2:]) < 1:
            raise InvalidInputError(f"expected images of shape (B,3,h,w), got {tuple(images.shape)}")
        images = images.to(self.device, torch.float32).contiguous()
        if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise InvalidInputError("image values must be finite and in [0, 1]")
        return images

    @staticmethod
    def upscale(lowres: torch.Tensor) -> torch.Tensor:
        """Bilinear x4, align_corners=False: the reference CLI's resize."""
        height, width = lowres.shape[-2:]
        return F.interpolate(lowres, size=(height * SCALE, width * SCALE), mode="bilinear", align_corners=False)

    # --- stages (seams for tiling) ------------------------------------------------------------
    # Each stage runs over tiles (model/tiling.py); an input that fits one tile runs untiled.
    def _encode(self, image_norm: torch.Tensor, sample: bool, generator: torch.Generator | None, fold: bool,
                tile: int, on_tile=None) -> torch.Tensor:
        encode = lambda part: self.model.encode(part, generator, sample, fold)  # noqa: E731
        return tiled_vae_encode(encode, image_norm, tile, on_tile=on_tile)

    def _denoise(self, latent: torch.Tensor, guidance_scale: float, tile: int, on_tile=None) -> torch.Tensor:
        denoise = lambda part: self.model.clean_sample(part, self.model.predict_noise(part, guidance_scale))  # noqa: E731
        return tiled_unet(denoise, latent, tile, on_tile=on_tile)

    def _decode(self, latent: torch.Tensor, tile: int, on_tile=None) -> torch.Tensor:
        return tiled_vae_decode(self.model.decode, latent, tile, on_tile=on_tile)

    # --- entry points -------------------------------------------------------------------------
    @torch.inference_mode()
    def estimate(self, images) -> DegradationScores:
        scores = self.model.estimate(estimator_view(self.to_tensor(images)))
        return DegradationScores(noise=scores[:, NOISE_INDEX].cpu(), blur=scores[:, BLUR_INDEX].cpu())

    def _scores(self, lowres: torch.Tensor, noise: ScoreOverride, blur: ScoreOverride) -> tuple[torch.Tensor, torch.Tensor]:
        batch = lowres.shape[0]
        noise_values, blur_values = _per_sample(noise, batch, "noise"), _per_sample(blur, batch, "blur")
        if None in noise_values or None in blur_values:
            estimated = self.model.estimate(estimator_view(lowres))
            noise_values = [estimated[i, NOISE_INDEX].item() if v is None else v for i, v in enumerate(noise_values)]
            blur_values = [estimated[i, BLUR_INDEX].item() if v is None else v for i, v in enumerate(blur_values)]
        as_tensor = lambda values: torch.tensor([float(v) for v in values], device=self.device)  # noqa: E731
        return as_tensor(noise_values), as_tensor(blur_values)

    def plan(self, height: int, width: int, options: UpscaleOptions | None = None,
             tile_size: int | None = None) -> UpscalePlan:
        """How an input of (height, width) would run with `options` here (see UpscalePlan).
        Raises InvalidInputError for an impossible output size or tile size."""
        options = options or UpscaleOptions()
        output_size = options.output_size((height, width))
        model_size = (height * SCALE, width * SCALE)
        padded_size = tuple(-(-side // PAD_MULTIPLE) * PAD_MULTIPLE for side in model_size)
        latent_size = tuple(side // LATENT_FACTOR for side in padded_size)
        tile = self.tile_for(tile_size)
        tiles = count_tiles(*latent_size, tile, overlap_for(tile))
        guidance = self.guidance_for(options)
        # What one pipeline call shares: the input size, guidance, colour fix and output size;
        # noise/blur may differ per sample. Tiled images run alone.
        batch_key = None if tiles > 1 else ((height, width), guidance, options.color_fix, output_size)
        return UpscalePlan((height, width), output_size, model_size, padded_size, latent_size, tile, tiles, batch_key)

    def guidance_for(self, options: UpscaleOptions) -> float:
        """The options' guidance scale, else the weights' default (1.07 for the released model)."""
        return self.config.guidance_scale if options.guidance_scale is None else options.guidance_scale

    def tile_for(self, tile_size: int | None = None) -> int:
        """The first latent tile side on this device: `tile_size`, else the weights' configured tile on the CPU,
        else (CUDA) the largest that fits the free memory."""
        if tile_size is None and self.device.type != "cuda":
            tile_size = self.config.tiling.latent_tile
        try:
            return choose_tile_size(self.device, self.dtype, tile_size)
        except ValueError as err:
            raise InvalidInputError(str(err)) from err

    @torch.inference_mode()
    def enhance(
        self,
        images,
        options: UpscaleOptions | None = None,
        *,
        noise: ScoreOverride = None,
        blur: ScoreOverride = None,
        sample: bool = False,
        seed: int | None = None,
        progress: Progress | None = None,
        tile_size: int | None = None,
    ) -> EnhanceResult:
        """Upscale a batch of same-size images with `options` (UpscaleOptions; the default is x4
        with estimated scores). `noise`/`blur` override the options' scores per sample (a value
        or one per image, None = estimate). `tile_size`: latent tile side (multiple of 8, >= 32);
        None picks it from free CUDA memory (the weights' tile on the CPU). On CUDA
        out-of-memory the image is retried with smaller tiles."""
        options = options or UpscaleOptions()
        noise = options.noise if noise is None else noise
        blur = options.blur if blur is None else blur
        guidance = self.guidance_for(options)
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            _synchronize(self.device)
            now = time.perf_counter()
            timings[stage] = now - clock
            clock = now

        start = clock
        lowres = self.to_tensor(images)
        plan = self.plan(*lowres.shape[-2:], options, tile_size)  # an impossible size fails before any work
        noise_scores, blur_scores = self._scores(lowres, noise, blur)
        lap("estimate")
        upscaled = self.upscale(lowres)
        height, width = upscaled.shape[-2:]
        image_norm = pad_to_multiple((upscaled * 2 - 1).clamp(-1, 1))
        self.model.set_degradation(blur=blur_scores, noise=noise_scores)
        one_modulation = bool((noise_scores == noise_scores[0]).all() and (blur_scores == blur_scores[0]).all())
        generator = torch.Generator(self.device).manual_seed(seed) if sample and seed is not None else None

        def run_stages(tile: int) -> torch.Tensor:
            total, done = stage_tile_counts(image_norm.shape[-2] // LATENT_FACTOR, image_norm.shape[-1] // LATENT_FACTOR, tile), 0

            def on_tile() -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress(done, total)

            latent = self._encode(image_norm, sample, generator, one_modulation, tile, on_tile)
            lap("encode")
            clean_latent = self._denoise(latent, guidance, tile, on_tile)
            lap("unet")
            decoded = self._decode(clean_latent, tile, on_tile)
            lap("decode")
            return decoded

        decoded = run_with_oom_retry(run_stages, plan.tile)[..., :height, :width]
        output = apply_color_fix(decoded * 0.5 + 0.5, upscaled, options.color_fix)
        lap("color_fix")
        if not torch.isfinite(output).all():
            raise NonFiniteOutputError(f"non-finite values in the output ({self.dtype}); retry in fp32")
        output = output.float().cpu()
        if tuple(output.shape[-2:]) != plan.output_size:
            output = resample(output, plan.output_size)
            lap("resize")
        timings["total"] = time.perf_counter() - start
        return EnhanceResult(output, noise_scores.cpu(), blur_scores.cpu(), timings)

    def warmup(self, sizes: Sequence[tuple[int, int]] | None = None, batch_sizes: Sequence[int] = (1,)) -> dict:
        """Pay before the first request for what it would otherwise pay. Eager: one small pass (lazy
        initialisation). Compiled: compile the encoder, UNet and decoder for each low-res
        (height, width) in `sizes` at each batch size; default the size whose latent is one tile,
        the shape every tile of a large image has. Later, other shapes run eager, never compiling
        on a request (model/compiled.py). The compiled code persists in the compile cache
        (runtime.compile_cache_dir), so a restart with the same weights and shapes compiles from it.
        Returns the seconds spent, "cold"/"warm" compile cache and, per network call, the compile
        (+ first run) seconds of the shapes compiled here."""
        start, options = time.perf_counter(), UpscaleOptions(noise=0.0, blur=0.0)
        if not self.model.compiled:
            log.info("not compiling (%s): the encoder, UNet and decoder run eager", self.compile_plan.reason)
            self.enhance(torch.full((1, 3, 16, 16), 0.5), options)
            return {"seconds": round(time.perf_counter() - start, 3), "compile_seconds": {}}
        tile = self.tile_for()
        sizes = sizes or [(tile * LATENT_FACTOR // SCALE,) * 2]
        shapes = [(batch, 3, height, width) for batch in batch_sizes for height, width in sizes]
        before = {name: set(call.compile_seconds) for name, call in self.model.compiled.items()}

        def run() -> None:
            with self.model.warming_up():
                for shape in shapes:
                    self.enhance(torch.full(shape, 0.5), options, tile_size=tile)

        cache = ArtifactCache(compile_cache_dir(), cache_key_parts(self.device, self.dtype, self.compile_plan,
                                                                   shapes + [("tile", tile)], self.weights_id))
        report = warm_up_persistent(self.model.compiled.values(), cache, shapes, run)
        compile_seconds = {name: round(sum(s for key, s in call.compile_seconds.items() if key not in before[name]), 3)
                           for name, call in self.model.compiled.items()}
        return {"seconds": round(time.perf_counter() - start, 3), "compile_seconds": compile_seconds,
                "compile_cache": report["cache"]}
