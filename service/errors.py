"""Every error leaves the service as JSON `{"error": {"code", "message"}}` with a fitting status:
bad input is a 4xx naming the problem, never a 500 or a crash."""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from s3diff_serve.model.errors import (
    CorruptImageError, ImageTooLargeError, InvalidInputError, NonFiniteOutputError, S3DiffError, TilingOutOfMemoryError,
    UnsupportedImageError,
)
from s3diff_serve.service.request_log import request_id

logger = logging.getLogger("s3diff.service")


class ServiceError(Exception):
    """An error with its HTTP status, a stable machine-readable code and optional headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


def error_body(code: str, message: str) -> dict:
    return ErrorBody(error=ErrorDetail(code=code, message=message)).model_dump()


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


# What the inference path may raise on purpose; anything else is a bug and a logged 500.
MODEL_ERRORS = (S3DiffError, torch.OutOfMemoryError)


def from_model_error(error: Exception, request_id: str = "-") -> ServiceError:
    """Map the model package's typed errors to HTTP (the order matters: subclasses first). Server
    faults are logged here with the request id, so "see the server log" finds them."""
    if isinstance(error, (torch.OutOfMemoryError, TilingOutOfMemoryError)):
        # A batch that ran out of memory was already retried item by item (batcher.py), and the
        # pipeline itself retried with smaller tiles.
        logger.warning("request %s: out of device memory after retries: %s", request_id, error)
        return ServiceError(503, "out_of_memory", "the device ran out of memory for this image; retry later",
                            {"Retry-After": "5"})
    if isinstance(error, ImageTooLargeError):
        return ServiceError(413, "image_too_large", str(error))
    if isinstance(error, UnsupportedImageError):
        return ServiceError(415, "unsupported_image", str(error))
    if isinstance(error, CorruptImageError):
        return ServiceError(400, "corrupt_image", str(error))
    if isinstance(error, NonFiniteOutputError):
        logger.error("request %s: non-finite model output: %s", request_id, error)
        return ServiceError(500, "numerical_error", str(error))
    if isinstance(error, InvalidInputError):
        return ServiceError(422, "invalid_parameter", str(error))
    logger.error("request %s: unexpected error", request_id, exc_info=error)
    return ServiceError(500, "internal_error", "internal error; see the server log")


@contextlib.contextmanager
def as_service_errors(request_id: str) -> Iterator[None]:
    """Inside: the model package's typed errors leave as their mapped ServiceError."""
    try:
        yield
    except MODEL_ERRORS as error:
        raise from_model_error(error, request_id) from error


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}

# The OpenAPI documentation of each error status: what it means here and the `error.code`s it
# carries. Each route lists the statuses it can answer with `error_responses(...)`.
ERROR_RESPONSES: dict[int, dict] = {
    400: {"description": "Not a readable upload: `bad_request` (malformed body), `missing_image`, `empty_body`, "
                         "`corrupt_image`"},
    401: {"description": "API keys are configured and none or a wrong one was sent: `missing_api_key`, "
                         "`invalid_api_key`",
          "headers": {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}}},
    404: {"description": "`job_not_found`: unknown, cancelled or expired"},
    409: {"description": "`job_not_finished` (with Retry-After), `job_failed`", "headers": _RETRY_AFTER},
    413: {"description": "Too large: `body_too_large` (the request body), `image_too_large` (input pixels), "
                         "`output_too_large` (output pixels)"},
    415: {"description": "`unsupported_media_type` (the request's Content-Type), `unsupported_image` "
                         "(the file's format)"},
    422: {"description": "`invalid_parameter`: a parameter is out of range or of the wrong type, or the model "
                         "refuses the input"},
    429: {"description": "`queue_full` or `too_many_jobs`: retry after Retry-After seconds",
          "headers": {"Retry-After": {**_RETRY_AFTER["Retry-After"], "required": True}}},
    499: {"description": "`client_closed_request`: the client disconnected before its turn (logged only, "
                         "nobody receives it)"},
    500: {"description": "`numerical_error` (the output was not finite), `internal_error` (a bug; see the log)"},
    503: {"description": "`not_ready` (loading, with Retry-After), `draining`, `shutting_down`, `out_of_memory` "
                         "(with Retry-After)", "headers": _RETRY_AFTER},
    504: {"description": "`deadline_exceeded`: no result within the request deadline"},
}


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """`responses=` for a route or router: the given error statuses, with the error body schema."""
    return {status: {**ERROR_RESPONSES[status], "model": ErrorBody} for status in statuses}


def allowed_methods(request: Request, routers_allow: str) -> str:
    """`Allow` for a 405: every method the schema documents for the path. The router's own header
    names only the first route matching the path, and /v1/jobs/{job_id} has two (GET, DELETE)."""
    for template, operations in request.app.openapi()["paths"].items():
        if compile_path(template)[0].match(request.url.path):
            return ", ".join(sorted(method.upper() for method in operations))
    return routers_allow  # a route left out of the schema (the page, the docs)


_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 400: "bad_request"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, error: ServiceError) -> JSONResponse:
        return error_response(error.status, error.code, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in issue['loc'])}: {issue['msg']}" for issue in error.errors())
        return error_response(422, "invalid_parameter", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(error.status_code, "http_error")
        headers = dict(getattr(error, "headers", None) or {})
        if error.status_code == 405:
            headers["Allow"] = allowed_methods(request, headers.get("Allow", ""))
        return error_response(error.status_code, code, str(error.detail), headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("request %s: unhandled error on %s", request_id(request), request.url.path)
        return error_response(500, "internal_error", "internal error; see the server log")
