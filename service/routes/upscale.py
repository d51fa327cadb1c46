"""POST /v1/upscale and /v1/degradation: read the upload, decode it in the codec pool, queue it
for the inference thread, encode the result, answer with the scores and stage timings."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from s3diff_serve.service import metrics
from s3diff_serve.service.auth import require_api_key
from s3diff_serve.service.errors import MODEL_ERRORS, ServiceError, error_responses, from_model_error
from s3diff_serve.service.request_log import note, request_id
from s3diff_serve.service.stages import (EncodedImage, EstimateTask, Prediction, UpscaleOptions, UpscaleTask, batch_key, decode,
                            decode_for_estimate, encode)

router = APIRouter(prefix="/v1", tags=["upscale"], dependencies=[Depends(require_api_key)],
                   responses=error_responses(401))

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")  # documented in and out; more formats are read
IMAGE_RESPONSES = {200: {"content": {media_type: {} for media_type in IMAGE_TYPES}, "description": "the image"}}
# What reading and decoding an upload may answer (accept_upscale, decode_upload), and what the
# batcher adds (run_upscale, batcher.submit).
UPLOAD_ERRORS = (400, 413, 415, 503)
QUEUE_ERRORS = (429, 499, 500, 503, 504)


def _not_null(schema: dict) -> dict:
    """A form field is sent or left out, never null: `anyOf [X, null]` becomes X."""
    variants = [variant for variant in schema.get("anyOf", []) if variant != {"type": "null"}]
    if len(variants) != 1:
        return schema
    return {**{key: value for key, value in schema.items() if key != "anyOf"}, **variants[0]}


def image_body(form_fields: type[BaseModel] | None = None) -> dict:
    """`openapi_extra` documenting the body `read_upload` reads: a multipart form with a required
    file `image` (plus `form_fields`, which override the query parameters), or a raw image body.
    It is written here rather than generated from a parameter: FastAPI would then demand the
    form and refuse raw bodies."""
    binary = {"type": "string", "format": "binary"}
    fields = form_fields.model_json_schema()["properties"] if form_fields else {}
    form = {"type": "object", "required": ["image"], "properties": {
        "image": {**binary, "description": "the image file (PNG, JPEG, WebP, TIFF, BMP)"},
        **{name: _not_null(schema) for name, schema in fields.items()}}}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form, "encoding": {"image": {"contentType": ", ".join(IMAGE_TYPES)}}},
        **{media_type: {"schema": binary} for media_type in IMAGE_TYPES}}}}


class UpscaleParams(BaseModel):
    """Query parameters (multipart form fields of the same names override them)."""

    model_config = ConfigDict(extra="ignore")

    scale: float = Field(4.0, ge=1, le=8, description="output scale; the model works at x4, others resize its output")
    noise: float | None = Field(None, ge=0, le=1, description="noise score override (else estimated)")
    blur: float | None = Field(None, ge=0, le=1, description="blur score override (else estimated)")
    guidance_scale: float | None = Field(None, ge=0, le=20, description="CFG scale; default 1.07, 1 = no negative")
    color_fix: Literal["wavelet", "adain", "none"] = "wavelet"
    format: Literal["png", "jpeg", "webp"] | None = Field(None, description="default: JPEG for JPEG input, else PNG")
    quality: int | None = Field(None, ge=1, le=100, description="JPEG/WebP quality")

    def options(self) -> UpscaleOptions:
        return UpscaleOptions(**self.model_dump())


async def read_upload(request: Request) -> bytes:
    """The image bytes of a multipart file field `image` or of a raw `image/*` body (never a URL)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        image = (await request.form()).get("image")
        if not isinstance(image, UploadFile):
            raise ServiceError(400, "missing_image", "the multipart body has no 'image' file field")
        return await image.read()
    if content_type.startswith("image/") or content_type in ("application/octet-stream", ""):
        return await request.body()
    raise ServiceError(415, "unsupported_media_type",
                       f"send the image as multipart/form-data field 'image' or as a raw image/* body, not {content_type}")


async def merged_params(request: Request, query: UpscaleParams) -> UpscaleParams:
    """Form fields override query parameters; both pass the same validation (422 otherwise)."""
    form = await request.form() if request.headers.get("content-type", "").startswith("multipart/") else {}
    fields = {name: value for name, value in form.items() if isinstance(value, str)}
    if not fields:
        return query
    try:
        return UpscaleParams.model_validate({**query.model_dump(exclude_unset=True), **fields})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ServiceError(422, "invalid_parameter", problems) from error


async def accept_upscale(request: Request, query: UpscaleParams) -> UpscaleTask:
    """What every upscale route does first: refuse when not ready, merge params, read, decode."""
    request.app.state.service.require_ready()
    params = await merged_params(request, query)
    return await decode_upload(request, await read_upload(request), params)


async def decode_upload(request: Request, data: bytes, params: UpscaleParams | None) -> UpscaleTask | EstimateTask:
    """Decode in the codec pool: an upscale task, or an estimator task when `params` is None."""
    service = request.app.state.service
    settings = service.settings
    note(request, input_bytes=len(data))
    try:
        if params is None:
            task = await service.run_codec(lambda: decode_for_estimate(data, max_input_pixels=settings.max_input_pixels))
        else:
            task = await service.run_codec(lambda: decode(
                data, params.options(), max_input_pixels=settings.max_input_pixels,
                max_output_pixels=settings.max_output_pixels))
            note(request, output_size=list(task.output_size))
    except MODEL_ERRORS as error:
        raise from_model_error(error, request_id(request)) from error
    note(request, input_size=list(task.image.size))
    return task


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in timings.items())


@dataclass
class Upscaled:
    encoded: EncodedImage
    prediction: Prediction
    batch_size: int
    timings: dict[str, float]


async def run_upscale(service, task: UpscaleTask, *, timeout_s: float, client_gone=None) -> Upscaled:
    """Queue -> predict (inference thread) -> encode (codec pool); shared by /v1/upscale and jobs."""
    latent_tile = service.pipeline.config.tiling.latent_tile
    try:
        outcome = await service.batcher.submit(task, key=batch_key(task, latent_tile), timeout_s=timeout_s,
                                               client_gone=client_gone)
    except MODEL_ERRORS as error:
        raise from_model_error(error, request_id(request)) from error
    prediction = outcome.result
    encoded = await service.run_codec(encode, task, prediction)
    metrics.OUTPUT_PIXELS.inc(encoded.size[0] * encoded.size[1])
    timings = {"queue": outcome.queue_wait, "image_read": task.timings["image_read"], **prediction.timings,
               "image_write": task.timings["image_write"]}
    timings.pop("total", None)
    for stage, seconds in timings.items():
        metrics.STAGE_DURATION.labels(stage).observe(seconds)
    return Upscaled(encoded, prediction, outcome.batch_size, timings)


@router.post("/upscale", openapi_extra=image_body(UpscaleParams), response_class=Response,
             responses={**IMAGE_RESPONSES, **error_responses(*UPLOAD_ERRORS, 422, *QUEUE_ERRORS)},
             summary="Upscale an image x4 (or to `scale`) with S3Diff")
async def upscale_image(request: Request, query: Annotated[UpscaleParams, Query()]) -> Response:
    service = request.app.state.service
    task = await accept_upscale(request, query)
    done = await run_upscale(service, task, timeout_s=service.settings.request_timeout_s,
                             client_gone=request.is_disconnected)
    noise, blur = done.prediction.noise, done.prediction.blur
    note(request, noise=round(noise, 4), blur=round(blur, 4), batch_size=done.batch_size,
         output_bytes=len(done.encoded.body), times={k: round(v, 4) for k, v in done.timings.items()})
    return Response(done.encoded.body, media_type=done.encoded.media_type, headers={
        "X-S3Diff-Noise": f"{noise:.6f}", "X-S3Diff-Blur": f"{blur:.6f}",
        "X-S3Diff-Batch-Size": str(done.batch_size), "Server-Timing": server_timing(done.timings),
    })


class DegradationScores(BaseModel):
    noise: float = Field(ge=0, le=1)
    blur: float = Field(ge=0, le=1)


@router.post("/degradation", openapi_extra=image_body(), response_model=DegradationScores,
             responses=error_responses(*UPLOAD_ERRORS, *QUEUE_ERRORS),
             summary="The degradation estimator's noise and blur scores of an image")
async def estimate_degradation(request: Request) -> DegradationScores:
    service = request.app.state.service
    batcher = service.require_ready()
    task = await decode_upload(request, await read_upload(request), None)
    try:
        outcome = await batcher.submit(task, key=("estimate", *task.image.size),
                                       timeout_s=service.settings.request_timeout_s, client_gone=request.is_disconnected)
    except MODEL_ERRORS as error:
        raise from_model_error(error, request_id(request)) from error
    noise, blur = outcome.result
    note(request, noise=round(noise, 4), blur=round(blur, 4), batch_size=outcome.batch_size)
    return DegradationScores(noise=noise, blur=blur)
