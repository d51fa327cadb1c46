"""The job API: the same upscale as /v1/upscale, run in the background for images whose
processing outlives an HTTP timeout. POST answers 202 + Location at once; poll the status (with
progress in work units, i.e. tiles), fetch the result, or DELETE to cancel."""
from __future__ import annotations

import asyncio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from s3diff_serve.model import UpscaleOptions
from s3diff_serve.service.auth import require_api_key
from s3diff_serve.service.errors import ServiceError, error_responses
from s3diff_serve.service.request_log import note
from s3diff_serve.service.request_path import run_job
from s3diff_serve.service.routes.upscale import IMAGE_RESPONSES, UPLOAD_ERRORS, accept, image_body
# 422 on the job-id routes too: FastAPI documents one for any route with parameters.
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)],
                   responses=error_responses(401, 422))


@router.post("", status_code=202, openapi_extra=image_body(UpscaleOptions), summary="Start an upscale job",
             responses={202: {"description": "the job, queued", "headers": {"Location": {
                 "description": "the job's status URL", "required": True, "schema": {"type": "string"}}}},
                        **error_responses(*UPLOAD_ERRORS, 429)})
async def create_job(request: Request) -> JSONResponse:
    service = request.app.state.service
    resolved = await accept(request, "upscale")
    job = service.jobs.create()
    job.task = asyncio.get_running_loop().create_task(run_job(service, job, resolved))
    note(request, job_id=job.id)
    return JSONResponse(job.describe(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/{job_id}", summary="A job's status and progress", responses=error_responses(404))
async def job_status(request: Request, job_id: str) -> dict:
    return request.app.state.service.jobs.get(job_id).describe()


@router.get("/{job_id}/result", response_class=Response, summary="A finished job's image",
            responses={**IMAGE_RESPONSES, **error_responses(404, 409)})
async def job_result(request: Request, job_id: str) -> Response:
    job = request.app.state.service.jobs.get(job_id)
    if job.status == "failed":
        raise ServiceError(409, "job_failed", f"the job failed: {job.error.message if job.error else 'unknown'}")
    if job.status != "succeeded":
        raise ServiceError(409, "job_not_finished", f"the job is {job.status}; poll /v1/jobs/{job_id}",
                           {"Retry-After": "1"})
    return Response(job.result.body, media_type=job.result.media_type, headers=dict(job.result.headers))


@router.delete("/{job_id}", summary="Cancel a job and forget it", responses=error_responses(404))
async def cancel_job(request: Request, job_id: str) -> dict:
    return request.app.state.service.jobs.cancel(job_id).describe()
