"""Probes, model facts, metrics and the page: the routes that are not inference."""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from s3diff_serve.service import metrics
from s3diff_serve.service.auth import require_api_key
from s3diff_serve.service.errors import error_response, error_responses

router = APIRouter()


@router.get("/healthz", tags=["probes"], summary="Liveness: the event loop runs")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", tags=["probes"], summary="Readiness: weights loaded and warmed up, not draining",
            responses=error_responses(503))
async def readyz(request: Request) -> JSONResponse:
    service = request.app.state.service
    if service.draining:
        return error_response(503, "draining", "the server is shutting down")
    if not service.ready:
        message = f"loading the model failed: {service.load_error}" if service.load_error else "the model is loading"
        return error_response(503, "not_ready", message)
    return JSONResponse({"status": "ready", "weights_id": service.pipeline.weights_id})


@router.get("/v1/model", tags=["model"], dependencies=[Depends(require_api_key)],
            responses=error_responses(401, 503), summary="The model, weights, device and limits in force")
async def model_info(request: Request) -> dict:
    service = request.app.state.service
    service.require_ready()
    pipeline, settings = service.pipeline, service.settings
    return {
        "model": pipeline.config.model_name,
        "weights": pipeline.source,
        "weights_id": pipeline.weights_id,
        "dtype": str(pipeline.dtype).removeprefix("torch."),
        "devices": [str(pipeline.device)],
        "scale": pipeline.scale,
        "guidance_scale": pipeline.config.guidance_scale,
        "color_fix": pipeline.config.color_fix,
        "tiling": {"latent_tile": pipeline.tile_for()},  # this device's first tile (CUDA: from free memory)
        "limits": {"max_body_bytes": settings.max_body_bytes, "max_input_pixels": settings.max_input_pixels,
                   "max_output_pixels": settings.max_output_pixels, "max_batch": settings.max_batch,
                   "max_wait_ms": settings.max_wait_ms, "max_queue": settings.max_queue,
                   "request_timeout_s": settings.request_timeout_s, "max_jobs": settings.max_jobs,
                   "job_ttl_s": settings.job_ttl_s},
    }


@router.get("/metrics", tags=["probes"], response_class=Response, summary="Prometheus text format",
            responses={200: {"content": {"text/plain": {}}}})
async def prometheus_metrics(request: Request) -> Response:
    body, content_type = metrics.render(request.app.state.service.settings.prometheus_multiproc_dir)
    return Response(body, media_type=content_type)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(resources.files("s3diff_serve.service").joinpath("static/index.html").read_text(encoding="utf-8"))
