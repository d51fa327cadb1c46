"""POST /v1/upscale and /v1/degradation: HTTP in (query and form fields, multipart or raw body ->
`Upload`), HTTP out (the handler's reply plus batch size and Server-Timing). The walk itself is
service/request_path.py; what each kind does is service/handlers.py."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile

from s3diff_serve.model import UpscaleOptions
from s3diff_serve.service.auth import require_api_key
from s3diff_serve.service.errors import ServiceError, error_responses
from s3diff_serve.service.handlers import Upload
from s3diff_serve.service.request_log import note, request_id
from s3diff_serve.service.request_path import Resolved, Served, execute, resolve

router = APIRouter(prefix="/v1", tags=["upscale"], dependencies=[Depends(require_api_key)],
                   responses=error_responses(401))

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")  # documented in and out; more formats are read
IMAGE_RESPONSES = {200: {"content": {media_type: {} for media_type in IMAGE_TYPES}, "description": "the image"}}
# What reading, resolving and decoding an upload may answer (accept), and what the queue adds
# (execute, batcher.submit).
UPLOAD_ERRORS = (400, 413, 415, 422, 503)
QUEUE_ERRORS = (429, 499, 500, 503, 504)
FRAMES_HEADER = {"X-S3Diff-Input-Frames": {
    "description": "sent when the input has several frames (animation, pages, MPO pictures): their number; "
                   "only the first frame is used", "schema": {"type": "integer"}}}


def _not_null(schema: dict) -> dict:
    """A field is sent or left out, never null: `anyOf [X, null]` becomes X."""
    variants = [variant for variant in schema.get("anyOf", []) if variant != {"type": "null"}]
    if len(variants) != 1:
        return schema
    return {**{key: value for key, value in schema.items() if key != "anyOf"}, **variants[0]}


def image_body(options: type[BaseModel] | None = None) -> dict:
    """`openapi_extra` documenting what `read_upload` reads: the `options` as query parameters,
    and a multipart form with a required file `image` (plus the same fields, which override the
    query) or a raw image body. Written here rather than generated from parameters: FastAPI would
    then demand the form, refuse raw bodies and validate the options a second time."""
    binary = {"type": "string", "format": "binary"}
    fields = {name: _not_null(schema) for name, schema in
              (options.model_json_schema()["properties"] if options else {}).items()}
    form = {"type": "object", "required": ["image"], "additionalProperties": False, "properties": {
        "image": {**binary, "description": "the image file (PNG, JPEG, WebP, TIFF, BMP, GIF)"}, **fields}}
    parameters = [{"name": name, "in": "query", "required": False, "schema": schema,
                   **({"description": schema["description"]} if "description" in schema else {})}
                  for name, schema in fields.items()]
    return {"parameters": parameters, "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form, "encoding": {"image": {"contentType": ", ".join(IMAGE_TYPES)}}},
        **{media_type: {"schema": binary} for media_type in IMAGE_TYPES}}}}


def _add_field(fields: dict[str, str], name: str, value: str, where: str) -> None:
    if name in fields:
        raise ServiceError(422, "invalid_parameter", f"{name}: given twice in the {where}")
    fields[name] = value


async def read_upload(request: Request) -> Upload:
    """The image bytes (a multipart file field `image`, or a raw `image/*` body; never a URL) and the
    text fields: query parameters, overridden by form fields. Content-Type is parsed here only."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        _add_field(fields, name, value, "query")
    if content_type == "multipart/form-data":
        form = await request.form()
        images = form.getlist("image")
        if len(images) > 1:
            raise ServiceError(400, "multiple_images", f"the multipart body has {len(images)} 'image' parts; send one")
        if not images or not isinstance(images[0], UploadFile):
            raise ServiceError(400, "missing_image", "the multipart body has no 'image' file field")
        form_fields: dict[str, str] = {}
        for name, value in form.multi_items():
            if name == "image":
                continue
            if not isinstance(value, str):
                raise ServiceError(422, "invalid_parameter", f"{name}: a file where a value was expected")
            _add_field(form_fields, name, value, "form")
        return Upload(await images[0].read(), {**fields, **form_fields})
    if content_type.startswith("image/") or content_type in ("application/octet-stream", ""):
        return Upload(await request.body(), fields)
    raise ServiceError(415, "unsupported_media_type",
                       f"send the image as multipart/form-data field 'image' or as a raw image/* body, not {content_type}")


async def accept(request: Request, kind: str) -> Resolved:
    """What every image route does first: refuse when not ready, read the upload, resolve it."""
    handler = request.app.state.service.handler(kind)
    upload = await read_upload(request)
    note(request, input_bytes=len(upload.data))
    resolved = await resolve(request.app.state.service, handler, upload, request_id(request))
    note(request, **resolved.request.log_fields)
    return resolved


async def serve(request: Request, kind: str) -> Response:
    """accept -> execute -> the reply as a response."""
    service = request.app.state.service
    resolved = await accept(request, kind)
    served: Served = await execute(service, resolved, request_id(request),
                                   timeout_s=service.settings.request_timeout_s, client_gone=request.is_disconnected)
    note(request, noise=round(served.result.noise, 4), blur=round(served.result.blur, 4),
         batch_size=served.batch_size, output_bytes=len(served.reply.body),
         times={stage: round(seconds, 4) for stage, seconds in served.timings.items()})
    return Response(served.reply.body, media_type=served.reply.media_type, headers={
        **served.reply.headers, "X-S3Diff-Batch-Size": str(served.batch_size),
        "Server-Timing": ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in served.timings.items())})


@router.post("/upscale", openapi_extra=image_body(UpscaleOptions), response_class=Response,
             responses={**IMAGE_RESPONSES, **error_responses(*UPLOAD_ERRORS, *QUEUE_ERRORS)},
             summary="Upscale an image x4 (or to the requested size) with S3Diff")
async def upscale_image(request: Request) -> Response:
    return await serve(request, "upscale")


class DegradationScores(BaseModel):
    noise: float = Field(ge=0, le=1)
    blur: float = Field(ge=0, le=1)


@router.post("/degradation", openapi_extra=image_body(), response_model=DegradationScores,
             responses=error_responses(*UPLOAD_ERRORS, *QUEUE_ERRORS),
             summary="The degradation estimator's noise and blur scores of an image")
async def estimate_degradation(request: Request) -> Response:
    return await serve(request, "estimate")
