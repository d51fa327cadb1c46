"""Every error leaves the service as JSON `{"error": {"code", "message"}}` with a fitting status:
bad input is a 4xx naming the problem, never a 500 or a crash."""
from __future__ import annotations

import logging

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from s3diff_serve.model.errors import InvalidInputError, NonFiniteOutputError, S3DiffError
from s3diff_serve.model.image_io import CorruptImageError, ImageTooLargeError, UnsupportedImageError

logger = logging.getLogger("s3diff.service")


class ServiceError(Exception):
    """An error with its HTTP status, a stable machine-readable code and optional headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


# What the inference path may raise on purpose; anything else is a bug and a logged 500.
MODEL_ERRORS = (S3DiffError, torch.OutOfMemoryError)


def from_model_error(error: Exception) -> ServiceError:
    """Map the model package's typed errors to HTTP (the order matters: subclasses first)."""
    if isinstance(error, torch.OutOfMemoryError):
        # A batch that ran out of memory was already retried item by item (batcher.py).
        return ServiceError(503, "out_of_memory", "the device ran out of memory for this image; retry later",
                            {"Retry-After": "5"})
    if isinstance(error, ImageTooLargeError):
        return ServiceError(413, "image_too_large", str(error))
    if isinstance(error, UnsupportedImageError):
        return ServiceError(415, "unsupported_image", str(error))
    if isinstance(error, CorruptImageError):
        return ServiceError(400, "corrupt_image", str(error))
    if isinstance(error, NonFiniteOutputError):
        return ServiceError(500, "numerical_error", str(error))
    if isinstance(error, InvalidInputError):
        return ServiceError(422, "invalid_parameter", str(error))
    return ServiceError(500, "internal_error", "internal error; see the server log")


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
        return error_response(error.status_code, code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", "internal error; see the server log")
