"""The Prometheus metrics of docs/service.md. Labels stay bounded: route templates, stage names and
rejection reasons, never raw paths or per-request values.

With several worker processes behind one port, prometheus-client's multiprocess mode (env
PROMETHEUS_MULTIPROC_DIR, set by `s3diff serve` before the workers start) sums the workers'
files at scrape time; gauges say how to combine them."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)

REQUESTS = Counter("s3diff_requests", "HTTP requests by route template and status", ["endpoint", "status"])
REQUEST_DURATION = Histogram("s3diff_request_duration_seconds", "HTTP request latency", ["endpoint"],
                             buckets=REQUEST_BUCKETS)
QUEUE_WAIT = Histogram("s3diff_queue_wait_seconds", "time from queueing to the start of its batch",
                       buckets=REQUEST_BUCKETS)
STAGE_DURATION = Histogram("s3diff_stage_duration_seconds", "time per pipeline or codec stage", ["stage"],
                           buckets=STAGE_BUCKETS)
BATCH_SIZE = Histogram("s3diff_batch_size", "images per pipeline call", buckets=BATCH_BUCKETS)
QUEUE_DEPTH = Gauge("s3diff_queue_depth", "requests waiting for the model", multiprocess_mode="livesum")
INFLIGHT = Gauge("s3diff_inflight_requests", "requests being processed (queued or running)",
                 multiprocess_mode="livesum")
OUTPUT_PIXELS = Counter("s3diff_output_pixels", "pixels of the images returned")
REJECTED = Counter("s3diff_rejected", "requests refused before the model ran", ["reason"])
GPU_MEMORY = Gauge("s3diff_gpu_memory_bytes", "CUDA memory allocated by the weights and activations",
                   ["device"], multiprocess_mode="livemax")
# An info-style gauge rather than prometheus_client.Info, which has no multiprocess mode.
MODEL_INFO = Gauge("s3diff_model_info", "the model this worker serves", ["weights_id", "dtype", "device"],
                   multiprocess_mode="max")


def render(multiproc_dir: str | None) -> tuple[bytes, str]:
    """The exposition text: this process' registry, or every worker's files in multiprocess mode."""
    if multiproc_dir:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiproc_dir)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
