"""One request's walk, the same for every kind (service/handlers.py):

    route -> resolve (handler.decode, codec pool) -> queue (batcher) -> execute (handler.predict,
    inference thread) -> encode (handler.encode, codec pool) -> route

Routes only turn HTTP into an `Upload` and a `Served` into a response; the job API runs the same
walk in the background. Each hop's time is measured here, once.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from s3diff_serve.service import metrics
from s3diff_serve.service.errors import ServiceError, as_service_errors, from_model_error
from s3diff_serve.service.handlers import Handler, Progress, Reply, Upload
from s3diff_serve.service.jobs import Job, JobCancelled


@dataclass(frozen=True)
class Resolved:
    """A request after its decode step, with the time that step took."""

    handler: Handler
    request: Any
    decode_seconds: float


@dataclass(frozen=True)
class Served:
    reply: Reply
    result: Any  # the handler's predict result for this request
    batch_size: int
    timings: dict[str, float]  # seconds: queue, image_read (resolve), the model's stages, image_write


async def _timed_codec(service, function, *args) -> tuple[Any, float]:
    started = time.perf_counter()
    value = await service.run_codec(function, *args)
    return value, time.perf_counter() - started


async def resolve(service, handler: Handler, upload: Upload, request_id: str,
                  progress: Progress | None = None) -> Resolved:
    """Decode and resolve in the codec pool; refuses (4xx) what cannot or may not run."""
    with as_service_errors(request_id):
        request, seconds = await _timed_codec(service, handler.decode, upload, progress)
    return Resolved(handler, request, seconds)


async def execute(service, resolved: Resolved, request_id: str, *, timeout_s: float, client_gone=None) -> Served:
    """Queue (priced and grouped by the handler) -> predict on the inference thread -> encode."""
    with as_service_errors(request_id):
        outcome = await service.batcher.submit(resolved.handler, resolved.request, timeout_s=timeout_s,
                                               client_gone=client_gone)
    reply, encode_seconds = await _timed_codec(service, resolved.handler.encode, resolved.request, outcome.result)
    metrics.OUTPUT_PIXELS.inc(reply.output_pixels)
    timings = {"queue": outcome.queue_wait, "image_read": resolved.decode_seconds,
               **outcome.result.stage_seconds, "image_write": encode_seconds}
    for stage, seconds in timings.items():
        metrics.STAGE_DURATION.labels(stage).observe(seconds)
    return Served(reply, outcome.result, outcome.batch_size, timings)


async def run_job(service, job: Job, resolved: Resolved) -> None:
    """A job's upscale: queued like a request (alone in its batch, with the job's progress
    callback); when the queue is full, wait the advertised Retry-After and try again until the
    job's lifetime runs out. The outcome is recorded on the job, never raised."""
    deadline = time.monotonic() + service.settings.job_ttl_s
    resolved = dataclasses.replace(resolved, request=dataclasses.replace(resolved.request, progress=job.progress))
    request_id = f"job {job.id}"
    try:
        while True:
            try:
                done = await execute(service, resolved, request_id, timeout_s=max(1.0, deadline - time.monotonic()))
                break
            except ServiceError as error:
                if error.status != 429 or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(float(error.headers.get("Retry-After", "1")))
        job.result = done.reply
        job.scores = {"noise": done.result.noise, "blur": done.result.blur}
        job.done = job.total = max(job.total, 1)
        job.status = "succeeded"
    except (JobCancelled, asyncio.CancelledError):
        job.status = "cancelled"
    except ServiceError as error:
        job.status, job.error = "failed", error
    except Exception as error:  # noqa: BLE001 - a job's failure is reported by its status, not lost
        job.status, job.error = "failed", from_model_error(error, request_id)  # logs it with the traceback
    finally:
        job.finished_at = time.time()
