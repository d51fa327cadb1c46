"""The two kinds of request the model serves, each one handler of three steps (the shape LitServe
gives a request):

- `decode`: upload -> one fully resolved request (options checked, image decoded, plan made,
  output format and quality chosen, limits applied), in the codec pool;
- `predict`: a batch of resolved requests -> one result each, on the inference thread;
- `encode`: one request and its result -> the reply's bytes, in the codec pool.

The batcher groups requests by `batch_key`, prices them by `cost` and calls `predict`
(service/request_path.py walks one request through the three). Every value is resolved in
`decode`; later steps only read the request.
"""
from __future__ import annotations

import json
import time
from types import MappingProxyType
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, Sequence

import torch
from pydantic import ValidationError

from s3diff_serve.model import NonFiniteOutputError, S3DiffPipeline, UpscaleOptions, UpscalePlan
from s3diff_serve.model.errors import ImageTooLargeError
from s3diff_serve.model.image_io import DecodedImage, decode_image, encode_like, output_format_for
from s3diff_serve.model.options import describe_validation_error
from s3diff_serve.service import metrics
from s3diff_serve.service.errors import ServiceError

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Upload:
    """What a route hands over: the image bytes and the text fields (query and form, merged)."""

    data: bytes
    fields: Mapping[str, str]


@dataclass(frozen=True)
class Reply:
    """An encoded result: the body, its media type and the headers that describe it."""

    body: bytes
    media_type: str
    headers: Mapping[str, str]
    output_pixels: int = 0


@dataclass(frozen=True)
class UpscaleRequest:
    """One upscale, resolved: nothing about it is decided after this."""

    image: DecodedImage
    options: UpscaleOptions
    plan: UpscalePlan
    format: str  # "png" | "jpeg" | "webp"
    quality: int
    progress: Progress | None = None  # jobs report progress; such requests run alone

    @property
    def log_fields(self) -> dict:
        return {"input_size": list(self.image.size), "output_size": list(self.plan.output_size)}


@dataclass(frozen=True)
class EstimateRequest:
    """One degradation estimate: the decoded image only."""

    image: DecodedImage

    @property
    def log_fields(self) -> dict:
        return {"input_size": list(self.image.size)}


@dataclass(frozen=True)
class Upscaled:
    """One sample of an upscale batch's result."""

    image: torch.Tensor  # (3, H, W) float32 in [0, 1], already at the requested output size
    noise: float
    blur: float
    stage_seconds: Mapping[str, float]  # the model stages of the batch this sample ran in


@dataclass(frozen=True)
class Scores:
    noise: float
    blur: float
    stage_seconds: Mapping[str, float]  # the estimator's time for the batch


def _read_image(data: bytes, max_input_pixels: int) -> DecodedImage:
    if not data:
        raise ServiceError(400, "empty_body", "the request carries no image bytes")
    try:
        return decode_image(data, max_pixels=max_input_pixels)
    except ImageTooLargeError as error:
        raise ServiceError(413, "image_too_large", f"{error} (setting max_input_pixels)") from error


def _frame_headers(image: DecodedImage) -> dict[str, str]:
    """A multi-frame input (animation, pages, MPO) is served from its first frame; say so."""
    return {"X-S3Diff-Input-Frames": str(image.frames)} if image.frames > 1 else {}


def _score_headers(noise: float, blur: float) -> dict[str, str]:
    return {"X-S3Diff-Noise": f"{noise:.6f}", "X-S3Diff-Blur": f"{blur:.6f}"}


def _record_device_memory(pipeline: S3DiffPipeline) -> None:
    if pipeline.device.type == "cuda":
        metrics.GPU_MEMORY.labels(str(pipeline.device)).set(torch.cuda.memory_allocated(pipeline.device))


class UpscaleHandler:
    """POST /v1/upscale and the job API. A non-finite output is retried once in fp32 (docs/service.md,
    'Faults'), on a fp32 copy loaded on first need; if that also fails, or the weights already are
    fp32, the NonFiniteOutputError goes up (500 numerical_error)."""

    kind = "upscale"

    def __init__(self, pipeline: S3DiffPipeline, *, max_input_pixels: int, max_output_pixels: int,
                 load_fp32: Callable[[], S3DiffPipeline] | None = None):
        self.pipeline = pipeline
        self.max_input_pixels, self.max_output_pixels = max_input_pixels, max_output_pixels
        self._load_fp32 = load_fp32
        self._fp32: S3DiffPipeline | None = None

    def decode(self, upload: Upload, progress: Progress | None = None) -> UpscaleRequest:
        """Resolve everything: options (validated once, 422), image (4xx), plan, output size limit
        (the larger of the output and the padded, tiled work: `UpscalePlan.work_pixels`), format
        and quality."""
        try:
            options = UpscaleOptions.model_validate(dict(upload.fields))
        except ValidationError as error:
            raise ServiceError(422, "invalid_parameter", describe_validation_error(error)) from error
        image = _read_image(upload.data, self.max_input_pixels)
        plan = self.pipeline.plan(*image.size, options)
        output_pixels = plan.output_size[0] * plan.output_size[1]
        if max(output_pixels, plan.work_pixels) > self.max_output_pixels:
            height, width = image.size
            raise ServiceError(413, "output_too_large",
                               f"a {width}x{height} input makes {output_pixels} output pixels and {plan.work_pixels} "
                               f"padded model pixels; the limit is {self.max_output_pixels} (setting max_output_pixels)")
        return UpscaleRequest(image, options, plan, output_format_for(image.source_format, options.format),
                              options.output_quality, progress)

    def batch_key(self, request: UpscaleRequest) -> Hashable | None:
        """The plan's batch signature (equal keys run as one untiled pipeline call; tiled images
        run alone); jobs, which report progress, always run alone. Exact size rather than padded
        size: padding an input to share a batch would change its border pixels, and a result
        should not depend on its batch-mates."""
        return None if request.progress is not None else request.plan.batch_key

    def cost(self, request: UpscaleRequest) -> float:
        return request.plan.work_pixels

    def predict(self, requests: Sequence[UpscaleRequest]) -> list[Upscaled]:
        try:
            return self._run(self.pipeline, requests)
        except NonFiniteOutputError:
            if self._load_fp32 is None or self.pipeline.dtype == torch.float32:
                raise
            if self._fp32 is None:
                self._fp32 = self._load_fp32()
            return self._run(self._fp32, requests)
        finally:
            _record_device_memory(self.pipeline)

    @staticmethod
    def _run(pipeline: S3DiffPipeline, requests: Sequence[UpscaleRequest]) -> list[Upscaled]:
        progress = requests[0].progress if len(requests) == 1 else None
        if progress is not None:
            progress(0, requests[0].plan.work_units)  # started
        result = pipeline.execute(  # the plan made at decode, run as it is (batch-mates share it: batch_key)
            torch.stack([request.image.rgb for request in requests]), requests[0].plan,
            noise=[request.options.noise for request in requests], blur=[request.options.blur for request in requests],
            progress=progress,
        )
        stage_seconds = MappingProxyType({stage: s for stage, s in result.timings.items() if stage != "total"})
        return [Upscaled(result.images[i], float(result.noise[i]), float(result.blur[i]), stage_seconds)
                for i in range(len(requests))]

    def encode(self, request: UpscaleRequest, result: Upscaled) -> Reply:
        """Write the output (already at the requested size) like the input."""
        body = encode_like(result.image, request.image, request.format, request.quality)
        height, width = request.plan.output_size
        return Reply(body, f"image/{request.format}",
                     {**_score_headers(result.noise, result.blur), **_frame_headers(request.image)}, height * width)


class EstimateHandler:
    """POST /v1/degradation: the estimator's scores only; no output is made, so only the input
    limit applies. Takes no parameters."""

    kind = "estimate"

    def __init__(self, pipeline: S3DiffPipeline, *, max_input_pixels: int):
        self.pipeline, self.max_input_pixels = pipeline, max_input_pixels

    def decode(self, upload: Upload, progress: Progress | None = None) -> EstimateRequest:
        if upload.fields:
            raise ServiceError(422, "invalid_parameter",
                               f"{', '.join(sorted(upload.fields))}: unknown parameter (this route takes none)")
        return EstimateRequest(_read_image(upload.data, self.max_input_pixels))

    def batch_key(self, request: EstimateRequest) -> Hashable:
        return request.image.size

    def cost(self, request: EstimateRequest) -> float:
        return 1.0

    def predict(self, requests: Sequence[EstimateRequest]) -> list[Scores]:
        started = time.perf_counter()
        try:
            scores = self.pipeline.estimate(torch.stack([request.image.rgb for request in requests]))
        finally:
            _record_device_memory(self.pipeline)
        stage_seconds = MappingProxyType({"estimate": time.perf_counter() - started})
        return [Scores(float(scores.noise[i]), float(scores.blur[i]), stage_seconds) for i in range(len(requests))]

    def encode(self, request: EstimateRequest, result: Scores) -> Reply:
        body = json.dumps({"noise": result.noise, "blur": result.blur}).encode()
        return Reply(body, "application/json", _frame_headers(request.image))


Handler = UpscaleHandler | EstimateHandler
