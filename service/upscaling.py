"""The upscale use case, shared by POST /v1/upscale and the job API: decode -> plan -> queue ->
predict -> encode. Routes only turn HTTP into (bytes, UpscaleOptions) and results into
responses; everything between lives here, once."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from s3diff_serve.model import UpscaleOptions
from s3diff_serve.service import metrics
from s3diff_serve.service.errors import ServiceError, as_service_errors, from_model_error
from s3diff_serve.service.jobs import Job, JobCancelled
from s3diff_serve.service.stages import (EncodedImage, EstimateTask, Prediction, UpscaleTask, batch_key, decode,
                                         decode_for_estimate, encode)


@dataclass
class Upscaled:
    encoded: EncodedImage
    prediction: Prediction
    batch_size: int
    timings: dict[str, float]


async def prepare_upscale(service, data: bytes, options: UpscaleOptions, request_id: str) -> UpscaleTask:
    """Decode and plan in the codec pool; refuses (4xx) what cannot or may not run."""
    settings = service.settings
    with as_service_errors(request_id):
        return await service.run_codec(lambda: decode(
            data, options, service.pipeline, max_input_pixels=settings.max_input_pixels,
            max_output_pixels=settings.max_output_pixels))


async def prepare_estimate(service, data: bytes, request_id: str) -> EstimateTask:
    with as_service_errors(request_id):
        return await service.run_codec(lambda: decode_for_estimate(data, max_input_pixels=service.settings.max_input_pixels))


async def run_upscale(service, task: UpscaleTask, request_id: str, *, timeout_s: float, client_gone=None) -> Upscaled:
    """Queue (priced by the plan's padded work) -> predict on the inference thread -> encode."""
    with as_service_errors(request_id):
        outcome = await service.batcher.submit(task, key=batch_key(task), cost=task.plan.work_pixels,
                                               timeout_s=timeout_s, client_gone=client_gone)
    prediction = outcome.result
    encoded = await service.run_codec(encode, task, prediction)
    metrics.OUTPUT_PIXELS.inc(encoded.size[0] * encoded.size[1])
    timings = {"queue": outcome.queue_wait, "image_read": task.timings["image_read"], **prediction.timings,
               "image_write": task.timings["image_write"]}
    timings.pop("total", None)
    for stage, seconds in timings.items():
        metrics.STAGE_DURATION.labels(stage).observe(seconds)
    return Upscaled(encoded, prediction, outcome.batch_size, timings)


async def run_estimate(service, task: EstimateTask, request_id: str, *, timeout_s: float,
                       client_gone=None) -> tuple[tuple[float, float], int]:
    """The estimator's (noise, blur) for one image, batched with same-size estimates."""
    with as_service_errors(request_id):
        outcome = await service.batcher.submit(task, key=("estimate", *task.image.size), timeout_s=timeout_s,
                                               client_gone=client_gone)
    return outcome.result, outcome.batch_size


async def run_job(service, job: Job, task: UpscaleTask) -> None:
    """A job's upscale: queued like a request (alone in its batch, with a progress callback);
    when the queue is full, wait the advertised Retry-After and try again until the job's
    lifetime runs out. The outcome is recorded on the job, never raised."""
    deadline = time.monotonic() + service.settings.job_ttl_s
    task.progress = job.progress
    request_id = f"job {job.id}"
    try:
        while True:
            try:
                done = await run_upscale(service, task, request_id, timeout_s=max(1.0, deadline - time.monotonic()))
                break
            except ServiceError as error:
                if error.status != 429 or time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(float(error.headers.get("Retry-After", "1")))
        job.result = done.encoded
        job.scores = {"noise": done.prediction.noise, "blur": done.prediction.blur}
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
