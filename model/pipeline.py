"""One-step S3Diff inference (docs/model.md, "The one-step inference path"): plan, then execute.

`plan` resolves how an input runs here (sizes, the tile, guidance, colour fix, cost, batch key);
`execute` runs a plan: the degradation scores (estimated where not given), then the recipe
written once in model/one_step.py, its steps 4-7 over tiles, then the resize to the requested
size. `enhance(images, options)` is the two in one call. The CLI and the Python API call
`enhance`; the service plans when it decodes a request and executes that plan when it runs.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .builtin import resolve_weights
from .degradation_estimator import BLUR_INDEX, NOISE_INDEX
from .checkpoints import load_merged, load_release
from .config import PAD_MULTIPLE, SCALE, MergedConfig, latent_factor
from .errors import InvalidInputError, NonFiniteOutputError
from .options import SCORE_RANGE, UpscaleOptions
from .compiled import ArtifactCache, cache_key_parts, warm_up_persistent
from .one_step import one_step
from .output_size import pre_resize, resample
from .runtime import (  # noqa: F401 (re-exported)
    compile_cache_dir, cpu_has_fast_bf16, plan_compile, resolve_runtime, use_channels_last,
)
from .s3diff import S3DiffModel
from .tiling import (
    choose_tile_size, count_tiles, estimator_view, overlap_for, run_with_oom_retry, tiled_unet, tiled_vae_decode,
    tiled_vae_encode,
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
    """How one upscale runs on this pipeline's device, fully resolved before it runs: `execute`
    runs it as it is, and every caller (limits, queue cost, batching, progress) reads it instead
    of re-deriving anything. The tile is fixed here (on CUDA from the free memory read once, at
    planning); only an out-of-memory retry runs smaller tiles (`with_tile`)."""

    input_size: tuple[int, int]  # (height, width)
    output_size: tuple[int, int]  # after the options' resize of the x4 result
    model_size: tuple[int, int]  # the x4 image the model makes
    padded_size: tuple[int, int]  # model_size reflect-padded to PAD_MULTIPLE: what the VAE sees
    latent_size: tuple[int, int]  # padded_size / latent_factor
    latent_factor: int  # the weights' (MergedConfig.latent_factor): image pixels per latent pixel
    tile: int  # latent tile side; an image with both latent sides <= tile runs untiled
    guidance: float  # classifier-free guidance scale
    color_fix: str

    @property
    def tiles(self) -> int:
        """Tiles per stage (1 = untiled)."""
        return count_tiles(*self.latent_size, self.tile, overlap_for(self.tile, self.latent_factor))

    @property
    def tiled(self) -> bool:
        return self.tiles > 1

    @property
    def batch_key(self) -> tuple | None:
        """Equal keys may run as one pipeline call: the input size, guidance, colour fix and
        output size (noise/blur may differ per sample). None: runs alone (tiled)."""
        return None if self.tiled else (self.input_size, self.guidance, self.color_fix, self.output_size)

    @property
    def work_pixels(self) -> int:
        """The cost: image pixels the encoder and decoder process, padding and tile overlaps
        included (a 1x2000 input is 4x8000 model pixels but 64x8000 padded ones)."""
        tile_h, tile_w = (min(self.tile, side) for side in self.latent_size)
        return self.tiles * tile_h * tile_w * self.latent_factor**2

    @property
    def work_units(self) -> int:
        """Progress units: encoder, UNet and decoder tiles."""
        return 3 * self.tiles

    def with_tile(self, tile: int) -> "UpscalePlan":
        return dataclasses.replace(self, tile=tile)


@dataclass
class EnhanceResult:
    images: torch.Tensor
    noise: torch.Tensor
    blur: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_sample(value: ScoreOverride, batch: int, name: str) -> list[float | None]:
    """A score override as one value per sample (None: estimate), checked: the Python API's
    boundary (the service's come checked by UpscaleOptions)."""
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
        self.latent_factor = latent_factor(dict(model.vae.config))  # the network's own VAE config
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

    def upscale(self, lowres: torch.Tensor) -> torch.Tensor:
        """x4 with the weights' pre-resize (bilinear for the released weights: the reference CLI's)."""
        return pre_resize(lowres, self.config.pre_resize)

    # --- entry points -------------------------------------------------------------------------
    @torch.inference_mode()
    def estimate(self, images) -> DegradationScores:
        scores = self.model.estimate(estimator_view(self.to_tensor(images)))
        return DegradationScores(noise=scores[:, NOISE_INDEX].cpu(), blur=scores[:, BLUR_INDEX].cpu())

    def _scores(self, lowres: torch.Tensor, noise: Sequence[float | None],
                blur: Sequence[float | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (noise, blur) on the device: the given ones, the estimator's where None."""
        if None in noise or None in blur:
            estimated = self.model.estimate(estimator_view(lowres))
            noise = [estimated[i, NOISE_INDEX].item() if v is None else v for i, v in enumerate(noise)]
            blur = [estimated[i, BLUR_INDEX].item() if v is None else v for i, v in enumerate(blur)]
        as_tensor = lambda values: torch.tensor([float(v) for v in values], device=self.device)  # noqa: E731
        return as_tensor(noise), as_tensor(blur)

    def plan(self, height: int, width: int, options: UpscaleOptions | None = None,
             tile_size: int | None = None) -> UpscalePlan:
        """How an input of (height, width) runs with `options` here (see UpscalePlan).
        Raises InvalidInputError for an impossible output size or tile size."""
        options = options or UpscaleOptions()
        model_size = (height * SCALE, width * SCALE)
        padded_size = tuple(-(-side // PAD_MULTIPLE) * PAD_MULTIPLE for side in model_size)
        return UpscalePlan(
            input_size=(height, width), output_size=options.output_size((height, width)), model_size=model_size,
            padded_size=padded_size, latent_size=tuple(side // self.latent_factor for side in padded_size),
            latent_factor=self.latent_factor, tile=self.tile_for(tile_size), guidance=self.guidance_for(options),
            color_fix=options.color_fix)

    def guidance_for(self, options: UpscaleOptions) -> float:
        """The options' guidance scale, else the weights' default (1.07 for the released model)."""
        return self.config.guidance_scale if options.guidance_scale is None else options.guidance_scale

    def tile_for(self, tile_size: int | None = None) -> int:
        """The first latent tile side on this device: `tile_size`, else the weights' configured tile on the CPU,
        else (CUDA) the largest that fits the free memory."""
        if tile_size is None and self.device.type != "cuda":
            tile_size = self.config.tiling.latent_tile
        try:
            return choose_tile_size(self.device, self.dtype, self.latent_factor, tile_size)
        except ValueError as err:
            raise InvalidInputError(str(err)) from err

    def enhance(self, images, options: UpscaleOptions | None = None, *, noise: ScoreOverride = None,
                blur: ScoreOverride = None, sample: bool = False, seed: int | None = None,
                progress: Progress | None = None, tile_size: int | None = None) -> EnhanceResult:
        """Plan, then execute: upscale a batch of same-size images with `options` (UpscaleOptions;
        the default is x4 with estimated scores). `noise`/`blur` override the options' scores per
        sample (a value or one per image, None = estimate). `tile_size`: latent tile side
        (multiple of the latent factor, >= 32); None picks it from free CUDA memory (the weights'
        tile on the CPU)."""
        options = options or UpscaleOptions()
        lowres = self.to_tensor(images)
        plan = self.plan(*lowres.shape[-2:], options, tile_size)  # an impossible size fails before any work
        batch = lowres.shape[0]
        noise = _per_sample(options.noise if noise is None else noise, batch, "noise")
        blur = _per_sample(options.blur if blur is None else blur, batch, "blur")
        return self.execute(lowres, plan, noise, blur, progress=progress, sample=sample, seed=seed)

    @torch.inference_mode()
    def execute(self, lowres: torch.Tensor, plan: UpscalePlan, noise: Sequence[float | None],
                blur: Sequence[float | None], *, progress: Progress | None = None, sample: bool = False,
                seed: int | None = None) -> EnhanceResult:
        """Run `plan` on `lowres` ((B,3,h,w) in [0,1], of the plan's input size) with one score per
        sample for each of noise and blur (None: estimate). Nothing is planned, validated or
        defaulted here. On CUDA out-of-memory steps 4-7 are retried with smaller tiles."""
        timer = _StageTimer(self.device)
        lowres = lowres.to(self.device, torch.float32)
        noise_scores, blur_scores = self._scores(lowres, noise, blur)
        timer.lap("estimate")
        one_modulation = bool((noise_scores == noise_scores[0]).all() and (blur_scores == blur_scores[0]).all())
        generator = torch.Generator(self.device).manual_seed(seed) if sample and seed is not None else None

        def run(tile: int) -> torch.Tensor:
            stages = _TiledStages(self.model, plan.with_tile(tile), timer, progress, fold=one_modulation,
                                  sample=sample, generator=generator)
            return one_step(self.model, lowres, blur_scores, noise_scores, stages, pre_resize=self.config.pre_resize,
                            guidance=plan.guidance, color_fix=plan.color_fix)

        output = run_with_oom_retry(run, plan.tile, self.latent_factor)
        timer.lap("color_fix")
        if not torch.isfinite(output).all():
            raise NonFiniteOutputError(f"non-finite values in the output ({self.dtype}); retry in fp32")
        output = output.float().cpu()
        if tuple(output.shape[-2:]) != plan.output_size:
            output = resample(output, plan.output_size)
            timer.lap("resize")
        return EnhanceResult(output, noise_scores.cpu(), blur_scores.cpu(), timer.timings())

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
        sizes = sizes or [(tile * self.latent_factor // SCALE,) * 2]
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


class _StageTimer:
    """Seconds per stage, each measured from the end of the one before (device synchronised)."""

    def __init__(self, device: torch.device):
        self.device, self.start = device, time.perf_counter()
        self.clock, self.seconds = self.start, {}

    def lap(self, stage: str) -> None:
        _synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage], self.clock = now - self.clock, now

    def timings(self) -> dict[str, float]:
        return {**self.seconds, "total": time.perf_counter() - self.start}


class _TiledStages:
    """The pipeline's steps 4-7 of the recipe (model/one_step.py): each over the plan's tiles
    (model/tiling.py; an input within one tile runs untiled), the encoder's LoRA folded when the
    batch shares one modulation, each stage timed, progress counted per tile."""

    def __init__(self, model: S3DiffModel, plan: UpscalePlan, timer: _StageTimer, progress: Progress | None, *,
                 fold: bool, sample: bool, generator: torch.Generator | None):
        self.model, self.plan, self.timer, self.progress = model, plan, timer, progress
        self.fold, self.sample, self.generator = fold, sample, generator
        self.done = 0

    def _on_tile(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.plan.work_units)

    def encode(self, image: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        encode = lambda part: self.model.encode(part, modulation, self.generator, self.sample, self.fold)  # noqa: E731
        latent = tiled_vae_encode(encode, image, self.plan.latent_factor, self.plan.tile, on_tile=self._on_tile)
        self.timer.lap("encode")
        return latent

    def denoise(self, latent: torch.Tensor, modulation: torch.Tensor, guidance: float) -> torch.Tensor:
        model = self.model
        denoise = lambda part: model.clean_sample(part, model.predict_noise(part, modulation, guidance))  # noqa: E731
        clean = tiled_unet(denoise, latent, self.plan.latent_factor, self.plan.tile, on_tile=self._on_tile)
        self.timer.lap("unet")
        return clean

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        decoded = tiled_vae_decode(self.model.decode, latent, self.plan.latent_factor, self.plan.tile,
                                   on_tile=self._on_tile)
        self.timer.lap("decode")
        return decoded
