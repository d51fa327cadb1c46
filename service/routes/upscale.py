"""POST /v1/upscale and /v1/degradation: HTTP in (query/form fields -> UpscaleOptions, multipart
or raw body -> bytes), HTTP out (image, score headers, Server-Timing). The work itself is the
use case in service/upscaling.py."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from s3diff_serve.model import UpscaleOptions
from s3diff_serve.model.options import describe_validation_error
from s3diff_serve.service.auth import require_api_key
from s3diff_serve.service.errors import ServiceError, error_responses
from s3diff_serve.service.request_log import note, request_id
from s3diff_serve.service.stages import UpscaleTask
from s3diff_serve.service.upscaling import prepare_estimate, prepare_upscale, run_estimate, run_upscale

router = APIRouter(prefix="/v1", tags=["upscale"], dependencies=[Depends(require_api_key)],
                   responses=error_responses(401))

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")  # documented in and out; more formats are read
IMAGE_RESPONSES = {200: {"content": {media_type: {} for media_type in IMAGE_TYPES}, "description": "the image"}}
# What reading, decoding and planning an upload may answer (accept_upscale), and what the
# queue adds (run_upscale, batcher.submit).
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
    form = {"type": "object", "required": ["image"], "additionalProperties": False, "properties": {
        "image": {**binary, "description": "the image file (PNG, JPEG, WebP, TIFF, BMP)"},
        **{name: _not_null(schema) for name, schema in fields.items()}}}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form, "encoding": {"image": {"contentType": ", ".join(IMAGE_TYPES)}}},
        **{media_type: {"schema": binary} for media_type in IMAGE_TYPES}}}}


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


async def merged_options(request: Request, query: UpscaleOptions) -> UpscaleOptions:
    """Form fields override query parameters; both pass the same validation (422 otherwise)."""
    form = await request.form() if request.headers.get("content-type", "").startswith("multipart/") else {}
    fields = {name: value for name, value in form.items() if isinstance(value, str) and name != "image"}
    if not fields:
        return query
    try:
        return UpscaleOptions.model_validate({**query.model_dump(exclude_unset=True), **fields})
    except ValidationError as error:
        raise ServiceError(422, "invalid_parameter", describe_validation_error(error)) from error


async def accept_upscale(request: Request, query: UpscaleOptions) -> UpscaleTask:
    """What every upscale route does first: refuse when not ready, merge the options, read the
    upload, then decode and plan it (the use case's first step)."""
    service = request.app.state.service
    service.require_ready()
    options = await merged_options(request, query)
    data = await read_upload(request)
    note(request, input_bytes=len(data))
    task = await prepare_upscale(service, data, options, request_id(request))
    note(request, input_size=list(task.image.size), output_size=list(task.plan.output_size))
    return task


def server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in timings.items())


@router.post("/upscale", openapi_extra=image_body(UpscaleOptions), response_class=Response,
             responses={**IMAGE_RESPONSES, **error_responses(*UPLOAD_ERRORS, 422, *QUEUE_ERRORS)},
             summary="Upscale an image x4 (or to the requested size) with S3Diff")
async def upscale_image(request: Request, query: Annotated[UpscaleOptions, Query()]) -> Response:
    service = request.app.state.service
    task = await accept_upscale(request, query)
    done = await run_upscale(service, task, request_id(request), timeout_s=service.settings.request_timeout_s,
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
    service.require_ready()
    data = await read_upload(request)
    note(request, input_bytes=len(data))
    task = await prepare_estimate(service, data, request_id(request))
    note(request, input_size=list(task.image.size))
    (noise, blur), batch_size = await run_estimate(service, task, request_id(request),
                                                   timeout_s=service.settings.request_timeout_s,
                                                   client_gone=request.is_disconnected)
    note(request, noise=round(noise, 4), blur=round(blur, 4), batch_size=batch_size)
    return DegradationScores(noise=noise, blur=blur)
