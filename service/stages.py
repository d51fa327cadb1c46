"""The request pipeline as LitServe shapes it: decode -> (batch) -> predict -> (unbatch) -> encode.

Each step is a plain function over plain data, so the server machinery (queue, threads, metrics)
stays in batcher.py/app.py and the model is reached only through `S3DiffPipeline.enhance`.
Image files are read and written by `model.image_io` (EXIF orientation, alpha, 16-bit, gray, ICC).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch

from s3diff_serve.model import NonFiniteOutputError, S3DiffPipeline, UpscaleOptions, UpscalePlan
from s3diff_serve.model.image_io import DecodedImage, decode_image, encode_like, output_format_for
from s3diff_serve.service.errors import ServiceError

Progress = Callable[[int, int], None]


@dataclass
class UpscaleTask:
    """One decoded request on its way to the model, with the pipeline's plan for it."""

    image: DecodedImage
    options: UpscaleOptions
    plan: UpscalePlan
    progress: Progress | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class EstimateTask:
    """A /v1/degradation request: the estimator's scores only."""

    image: DecodedImage


@dataclass
class Prediction:
    """One sample of a batch's result."""

    image: torch.Tensor  # (3, H, W) float32 in [0, 1], already at the requested output size
    noise: float
    blur: float
    timings: dict[str, float]  # the batch's stage times (shared by its samples)


# --- decode -------------------------------------------------------------------------------------
def decode(data: bytes, options: UpscaleOptions, pipeline: S3DiffPipeline, *, max_input_pixels: int,
           max_output_pixels: int) -> UpscaleTask:
    """Bytes -> planned task. Typed model errors (corrupt, unsupported, too large, impossible
    size) map to 4xx upstream. The output limit counts what the model really processes: the
    larger of the output and the padded, tiled work (`UpscalePlan.work_pixels`)."""
    if not data:
        raise ServiceError(400, "empty_body", "the request carries no image bytes")
    started = time.perf_counter()
    image = decode_image(data, max_pixels=max_input_pixels)
    plan = pipeline.plan(*image.size, options)
    output_pixels = plan.output_size[0] * plan.output_size[1]
    if max(output_pixels, plan.work_pixels) > max_output_pixels:
        height, width = image.size
        raise ServiceError(413, "output_too_large",
                           f"a {width}x{height} input makes {output_pixels} output pixels and {plan.work_pixels} "
                           f"padded model pixels; the limit is {max_output_pixels}")
    return UpscaleTask(image, options, plan, timings={"image_read": time.perf_counter() - started})


def decode_for_estimate(data: bytes, *, max_input_pixels: int) -> EstimateTask:
    """Bytes -> estimator task; no output is made, so only the input limit applies."""
    if not data:
        raise ServiceError(400, "empty_body", "the request carries no image bytes")
    return EstimateTask(decode_image(data, max_pixels=max_input_pixels))


# --- batch --------------------------------------------------------------------------------------
def batch_key(task: UpscaleTask) -> Hashable | None:
    """The plan's batch signature (equal keys run as one untiled pipeline call; tiled images
    run alone); jobs, which report progress, always run alone. Exact size rather than padded
    size: padding an input to share a batch would change its border pixels, and a result should
    not depend on its batch-mates."""
    return None if task.progress is not None else task.plan.batch_key


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
        progress = tasks[0].progress if len(tasks) == 1 else None
        if progress is not None:
            progress(0, tasks[0].plan.work_units)  # started
        result = pipeline.enhance(
            torch.stack([task.image.rgb for task in tasks]),
            tasks[0].options,  # batch-mates share everything but noise/blur (batch_key)
            noise=[task.options.noise for task in tasks],
            blur=[task.options.blur for task in tasks],
            progress=progress,
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
    """Write the output (already at the requested size) like the input."""
    started = time.perf_counter()
    fmt = output_format_for(task.image.source_format, task.options.format)
    body = encode_like(prediction.image, task.image, format=fmt, quality=task.options.quality)
    task.timings["image_write"] = time.perf_counter() - started
    return EncodedImage(body, f"image/{fmt}", task.plan.output_size)
