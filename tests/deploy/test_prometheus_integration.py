"""A real Prometheus (Debian's binary) scrapes a real `s3diff serve` with tiny weights, using the
repository's scrape config and alert rules; the p99 latency is read through its HTTP query API."""
from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from .deploy_helpers import DASHBOARD_FILE, PROMETHEUS_DIR, REPO_ROOT, dashboard_queries, debian_tool

UPSCALES = 8
START_TIMEOUT_S = 120
SCRAPE_TIMEOUT_S = 30
NEVER_EVALUATED = "0001-01-01T00:00:00Z"  # Prometheus' lastEvaluation before the first run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str, process: subprocess.Popen, log: Path):
    """Poll (bounded) until `condition()` returns something truthy; fail with the process log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what}: process exited with {process.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            result = condition()
        except httpx.TransportError:
            result = None
        if result:
            return result
        time.sleep(0.25)
    pytest.fail(f"{what}: not within {timeout_s} s:\n{log.read_text(errors='replace')[-4000:]}")


@contextmanager
def running(args: list[str], log: Path, env: dict[str, str] | None = None):
    with open(log, "wb") as log_file:
        process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(45)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def scrape_config_for(service_address: str, scrape_interval: str = "1s") -> dict:
    """The repository's prometheus.yml, pointed at the test service and scraping every second."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    config["rule_files"] = [str(PROMETHEUS_DIR / pattern) for pattern in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"][0]["targets"] = [service_address]
    return config


def instant(prometheus: httpx.Client, query: str) -> list[dict]:
    response = prometheus.get("/api/v1/query", params={"query": query})
    response.raise_for_status()
    return response.json()["data"]["result"]


def scalar(prometheus: httpx.Client, query: str) -> float | None:
    result = instant(prometheus, query)
    return float(result[0]["value"][1]) if len(result) == 1 else None


def bucket_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile on cumulative buckets (linear inside the bucket, lower bound 0
    for the first); written out here to check Prometheus' answer independently."""
    bounds = sorted(buckets)
    rank = q * buckets[math.inf]
    index = next(i for i, bound in enumerate(bounds) if buckets[bound] >= rank)
    if bounds[index] == math.inf:
        return bounds[-2]
    lower = bounds[index - 1] if index > 0 else 0.0
    below = buckets[bounds[index - 1]] if index > 0 else 0.0
    return lower + (bounds[index] - lower) * (rank - below) / (buckets[bounds[index]] - below)


def png_bytes(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def upscale_buckets_from_service(service: httpx.Client) -> dict[float, float]:
    text = service.get("/metrics").text
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == "s3diff_request_duration_seconds"]
    return {float(sample.labels["le"]): sample.value for sample in family.samples
            if sample.name.endswith("_bucket") and sample.labels["endpoint"] == "/v1/upscale"}


@dataclass
class ScrapedBurst:
    """A service and a Prometheus scraping it, after a burst of upscales Prometheus has seen."""
    service: httpx.Client
    prometheus: httpx.Client
    statuses: Counter
    latencies: list[float]
    prometheus_process: subprocess.Popen
    prometheus_log: Path


@pytest.fixture(scope="module")
def burst(tiny_merged_dir, tmp_path_factory):
    prometheus_binary = debian_tool("prometheus")
    work_dir = tmp_path_factory.mktemp("prometheus-integration")
    service_port, prometheus_port = free_port(), free_port()
    service_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    serve = [sys.executable, "-m", "s3diff_serve.cli.main", "serve", "--weights", str(tiny_merged_dir), "--host", "127.0.0.1",
             "--port", str(service_port), "--workers", "1", "--device", "cpu"]
    config_file = work_dir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(scrape_config_for(f"127.0.0.1:{service_port}")))
    prometheus_args = [prometheus_binary, f"--config.file={config_file}", f"--storage.tsdb.path={work_dir / 'tsdb'}",
                       f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"]
    service_log, prometheus_log = work_dir / "service.log", work_dir / "prometheus.log"

    with running(serve, service_log, service_env) as service_process, \
            running(prometheus_args, prometheus_log) as prometheus_process, \
            httpx.Client(base_url=f"http://127.0.0.1:{service_port}", timeout=60) as service, \
            httpx.Client(base_url=f"http://127.0.0.1:{prometheus_port}", timeout=10) as prometheus:
        wait_for(lambda: service.get("/readyz").status_code == 200, START_TIMEOUT_S, "service ready",
                 service_process, service_log)
        wait_for(lambda: prometheus.get("/-/ready").status_code == 200, SCRAPE_TIMEOUT_S, "prometheus ready",
                 prometheus_process, prometheus_log)
        wait_for(lambda: scalar(prometheus, 'up{job="s3diff"}') == 1, SCRAPE_TIMEOUT_S, "first scrape",
                 prometheus_process, prometheus_log)
        statuses, latencies = Counter(), []

        def upscale(body: bytes) -> None:
            started = time.perf_counter()
            statuses[service.post("/v1/upscale", content=body, headers={"Content-Type": "image/png"}).status_code] += 1
            latencies.append(time.perf_counter() - started)

        def scraped_upscales():
            return scalar(prometheus, 'sum(s3diff_requests_total{endpoint="/v1/upscale"})')

        # One request first, scraped before the rest, so that rate() sees the whole burst.
        upscale(png_bytes(0))
        wait_for(lambda: scraped_upscales() == 1, SCRAPE_TIMEOUT_S, "first upscale scraped",
                 prometheus_process, prometheus_log)
        for seed in range(1, UPSCALES + 1):
            upscale(png_bytes(seed))
        upscale(b"not an image")
        wait_for(lambda: scraped_upscales() == UPSCALES + 2, SCRAPE_TIMEOUT_S, "all upscales scraped",
                 prometheus_process, prometheus_log)
        yield ScrapedBurst(service, prometheus, statuses, latencies, prometheus_process, prometheus_log)


def test_status_counts_reach_prometheus(burst):
    assert burst.statuses[200] == UPSCALES + 1 and sum(burst.statuses.values()) == UPSCALES + 2
    by_status = {item["metric"]["status"]: float(item["value"][1]) for item in
                 instant(burst.prometheus, 'sum by (status) (s3diff_requests_total{endpoint="/v1/upscale"})')}
    assert by_status == {str(status): float(count) for status, count in burst.statuses.items()}


def test_p99_over_all_requests_matches_the_service_histogram(burst):
    # Prometheus' answer on what it stored == the same rule applied to the service's own /metrics.
    stored_p99 = scalar(burst.prometheus, 'histogram_quantile(0.99, sum by (le) '
                                          '(s3diff_request_duration_seconds_bucket{endpoint="/v1/upscale"}))')
    assert stored_p99 == pytest.approx(bucket_quantile(0.99, upscale_buckets_from_service(burst.service)), rel=1e-9)
    print(f"cumulative p99 of {UPSCALES + 2} upscale requests: {stored_p99:.4f} s")


def test_dashboard_p99_query_answers_on_real_data(burst):
    # Every observation is at most the slowest client-side latency, so p99 cannot pass the bucket
    # bound above it (with this few requests, rate()'s extrapolation can move the rank up to that
    # bucket, so no tighter bound holds).
    (p99_panel_query,) = {query for query in dashboard_queries(json.loads(DASHBOARD_FILE.read_text()))
                          if query.startswith("histogram_quantile(0.99,")}
    query = p99_panel_query.replace("$__rate_interval", "1m").replace('=~"$endpoint"', '="/v1/upscale"')
    dashboard_p99 = scalar(burst.prometheus, query)
    bound = min(b for b in upscale_buckets_from_service(burst.service) if b >= max(burst.latencies))
    assert dashboard_p99 is not None and 0 < dashboard_p99 <= bound
    print(f"dashboard p99 {dashboard_p99:.4f} s; slowest client-side request {max(burst.latencies):.4f} s")


def test_alert_rules_evaluate_quietly_on_a_healthy_service(burst):
    def evaluated_rules():
        groups = burst.prometheus.get("/api/v1/rules").json()["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if rules and all(rule["lastEvaluation"] != NEVER_EVALUATED for rule in rules) else None

    rules = wait_for(evaluated_rules, SCRAPE_TIMEOUT_S, "rules evaluated", burst.prometheus_process, burst.prometheus_log)
    assert {rule["name"]: (rule["health"], rule["state"]) for rule in rules} == {
        "S3DiffHighP99Latency": ("ok", "inactive"), "S3DiffHigh5xxRatio": ("ok", "inactive"),
        "S3DiffNotReady": ("ok", "inactive")}
