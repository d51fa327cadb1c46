"""The request pipeline as LitServe shapes it: decode -> (batch) -> predict -> (unbatch) -> encode.

Each step is a plain function over plain data, so the server machinery (queue, threads, metrics)
stays in batcher.py/app.py and the model is reached only through `S3DiffPipeline.enhance`.
Image files are read and written by `model.image_io` (EXIF orientation, alpha, 16-bit, gray, ICC).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Literal, Sequence

import torch

from s3diff_serve.model import NonFiniteOutputError, S3DiffPipeline
from s3diff_serve.model.image_io import DecodedImage, decode_image, encode_like, output_format_for
from s3diff_serve.model.output_size import resample, resolve_output_size
from s3diff_serve.service.errors import ServiceError

ColorFix = Literal["wavelet", "adain", "none"]
OutputFormat = Literal["png", "jpeg", "webp"]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class UpscaleOptions:
    """The request's knobs, already range-checked by the route's declared types."""

    scale: float = 4.0
    noise: float | None = None
    blur: float | None = None
    guidance_scale: float | None = None
    color_fix: ColorFix = "wavelet"
    format: OutputFormat | None = None
    quality: int | None = None


@dataclass
class UpscaleTask:
    """One decoded request on its way to the model."""

    image: DecodedImage
    options: UpscaleOptions
    output_size: tuple[int, int]  # (height, width) after the optional resize of the x4 output
    progress: Progress | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class EstimateTask:
    """A /v1/degradation request: the estimator's scores only."""

    image: DecodedImage


@dataclass
class Prediction:
    """One sample of a batch's result."""

    image: torch.Tensor  # (3, 4h, 4w) float32 in [0, 1]
    noise: float
    blur: float
    timings: dict[str, float]  # the batch's stage times (shared by its samples)


# --- decode -------------------------------------------------------------------------------------
def decode(data: bytes, options: UpscaleOptions, *, max_input_pixels: int, max_output_pixels: int) -> UpscaleTask:
    """Bytes -> task. Typed model errors (corrupt, unsupported, too large) map to 4xx upstream."""
    if not data:
        raise ServiceError(400, "empty_body", "the request carries no image bytes")
    started = time.perf_counter()
    image = decode_image(data, max_pixels=max_input_pixels)
    height, width = image.size
    output_size = resolve_output_size((height, width), scale=options.scale)
    model_pixels = 16 * height * width  # the model's x4 output exists before any resize
    if max(output_size[0] * output_size[1], model_pixels) > max_output_pixels:
        raise ServiceError(413, "output_too_large",
                           f"a {width}x{height} input at scale {options.scale:g} exceeds the output limit of "
                           f"{max_output_pixels} pixels")
    return UpscaleTask(image, options, output_size, timings={"image_read": time.perf_counter() - started})


def decode_for_estimate(data: bytes, *, max_input_pixels: int) -> EstimateTask:
    """Bytes -> estimator task; no output is made, so only the input limit applies."""
    if not data:
        raise ServiceError(400, "empty_body", "the request carries no image bytes")
    return EstimateTask(decode_image(data, max_pixels=max_input_pixels))


# --- batch --------------------------------------------------------------------------------------
def batch_key(task: UpscaleTask, latent_tile: int) -> Hashable | None:
    """Tasks with equal keys run as one pipeline call: the pipeline takes same-size batches with
    one guidance scale and colour fix; noise/blur may differ (the LoRA modulation is per sample).
    Images whose latent exceeds one tile are tiled by the pipeline instead, so they run alone.
    Exact size rather than padded size: padding an input to share a batch would change its
    border pixels, and a result should not depend on its batch-mates."""
    height, width = task.image.size
    if task.progress is not None or _latent_area(height, width) > latent_tile * latent_tile:
        return None
    return (height, width, task.options.guidance_scale, task.options.color_fix)


def _latent_area(height: int, width: int) -> int:
    """Latent pixels of the x4 image padded to a multiple of 64 (VAE factor 8)."""
    return -(-4 * height // 64) * 8 * (-(-4 * width // 64) * 8)


# --- predict ------------------------------------------------------------------------------------
class Predictor:
    """Runs a batch of tasks through the pipeline. A non-finite output is retried once in fp32
    (docs/service.md, 'Faults'), on a fp32 copy loaded on first need; if that also fails, or the
    weights already are fp32, the NonFiniteOutputError goes up (500 numerical_error)."""

    def __init__(self, pipeline: S3DiffPipeline, load_fp32: Callable[[], S3DiffPipeline] | None = None):
        self.pipeline = pipeline
        self._load_fp32 = load_fp32
        self._fp32: S3DiffPipeline | None = None

    def __call__(self, tasks: Sequence[UpscaleTask | EstimateTask]) -> list[Prediction] | list[tuple[float, float]]:
        if isinstance(tasks[0], EstimateTask):
            scores = self.pipeline.estimate(torch.stack([task.image.rgb for task in tasks]))
            return [(float(scores.noise[i]), float(scores.blur[i])) for i in range(len(tasks))]
        try:
            return self._run(self.pipeline, tasks)
        except NonFiniteOutputError:
            if self._load_fp32 is None or self.pipeline.dtype == torch.float32:
                raise
            if self._fp32 is None:
                self._fp32 = self._load_fp32()
            return self._run(self._fp32, tasks)

    @staticmethod
    def _run(pipeline: S3DiffPipeline, tasks: Sequence[UpscaleTask]) -> list[Prediction]:
        first = tasks[0].options
        if len(tasks) == 1 and tasks[0].progress is not None:
            tasks[0].progress(0, 1)  # started; the pipeline reports its real unit count as it goes
        result = pipeline.enhance(
            torch.stack([task.image.rgb for task in tasks]),
            noise=[task.options.noise for task in tasks],
            blur=[task.options.blur for task in tasks],
            guidance_scale=first.guidance_scale,
            color_fix=first.color_fix,
            progress=tasks[0].progress if len(tasks) == 1 else None,
        )
        return [Prediction(result.images[i], float(result.noise[i]), float(result.blur[i]), dict(result.timings))
                for i in range(len(tasks))]


# --- encode -------------------------------------------------------------------------------------
@dataclass
class EncodedImage:
    body: bytes
    media_type: str
    size: tuple[int, int]  # (height, width)


def encode(task: UpscaleTask, prediction: Prediction) -> EncodedImage:
    """Resize the x4 output to the requested size (Lanczos), then write it like the input."""
    started = time.perf_counter()
    rgb = resample(prediction.image, task.output_size)
    fmt = output_format_for(task.image.source_format, task.options.format)
    body = encode_like(rgb, task.image, format=fmt, quality=task.options.quality)
    task.timings["image_write"] = time.perf_counter() - started
    return EncodedImage(body, f"image/{fmt}", task.output_size)
