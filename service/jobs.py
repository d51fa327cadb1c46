"""The job API's store: an upscale that outlives an HTTP timeout runs as a background task and is
polled. Jobs live in this worker's memory (a restart loses them), at most `max_jobs`, each kept
`ttl_s` after it was created; expired ones are purged whenever the store is touched."""
from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from s3diff_serve.service.errors import ServiceError

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobCancelled(Exception):
    """Raised from the progress callback to stop a cancelled job at the next work unit."""


@dataclass(eq=False)
class Job:
    id: str
    created_at: float = field(default_factory=time.time)
    status: JobStatus = "queued"
    done: int = 0
    total: int = 0
    finished_at: float | None = None
    result: Any = None  # handlers.Reply when succeeded
    error: ServiceError | None = None
    scores: dict[str, float] = field(default_factory=dict)
    task: asyncio.Task | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")

    def progress(self, done: int, total: int) -> None:
        """The pipeline's progress callback (called on the inference thread)."""
        if self.status == "cancelled":
            raise JobCancelled(self.id)
        self.status, self.done, self.total = "running", done, total

    def describe(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id, "status": self.status, "progress": {"done": self.done, "total": self.total},
            "created_at": self.created_at, "finished_at": self.finished_at,
        }
        if self.scores:
            body["scores"] = self.scores
        if self.error is not None:
            body["error"] = {"code": self.error.code, "message": self.error.message}
        if self.status == "succeeded":
            body["result"] = f"/v1/jobs/{self.id}/result"
        return body


class JobStore:
    def __init__(self, max_jobs: int, ttl_s: float):
        self.max_jobs, self.ttl_s = max_jobs, ttl_s
        self._jobs: dict[str, Job] = {}

    def create(self) -> Job:
        self._purge()
        if len(self._jobs) >= self.max_jobs:
            finished = [job for job in self._jobs.values() if job.finished]
            if not finished:
                raise ServiceError(429, "too_many_jobs", f"{self.max_jobs} jobs are pending; retry later",
                                   {"Retry-After": "60"})
            del self._jobs[min(finished, key=lambda job: job.created_at).id]
        job = Job(uuid.uuid4().hex)
        self._jobs[job.id] = job
        return job

    def get(self, job_id: str) -> Job:
        self._purge()
        job = self._jobs.get(job_id)
        if job is None:
            raise ServiceError(404, "job_not_found", f"no job {job_id!r} (unknown, cancelled, or expired)")
        return job

    def cancel(self, job_id: str) -> Job:
        """Mark cancelled and forget it: a queued job leaves the queue, a running one stops at its
        next progress report (or its result is dropped)."""
        job = self.get(job_id)
        if not job.finished:
            job.status, job.finished_at = "cancelled", time.time()
            if job.task is not None:
                job.task.cancel()
        del self._jobs[job_id]
        return job

    def cancel_all(self) -> None:
        for job in list(self._jobs.values()):
            if job.task is not None:
                job.task.cancel()

    def _purge(self) -> None:
        now = time.time()
        for job in [job for job in self._jobs.values() if now - job.created_at > self.ttl_s]:
            if job.task is not None:
                job.task.cancel()
            del self._jobs[job.id]
