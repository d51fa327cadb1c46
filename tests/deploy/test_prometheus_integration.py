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


def test_prometheus_scrapes_the_service_and_reports_p99(tiny_merged_dir, tmp_path):
    prometheus_binary = debian_tool("prometheus")
    service_port, prometheus_port = free_port(), free_port()
    service_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    serve = [sys.executable, "-m", "cli.main", "serve", "--weights", str(tiny_merged_dir), "--host", "127.0.0.1",
             "--port", str(service_port), "--workers", "1", "--device", "cpu"]
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(scrape_config_for(f"127.0.0.1:{service_port}")))
    prometheus_args = [prometheus_binary, f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                       f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"]
    service_log, prometheus_log = tmp_path / "service.log", tmp_path / "prometheus.log"

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

        def scraped_upscales():
            return scalar(prometheus, 'sum(s3diff_requests_total{endpoint="/v1/upscale"})')

        statuses, latencies = Counter(), []

        def upscale(body: bytes) -> None:
            started = time.perf_counter()
            statuses[service.post("/v1/upscale", content=body, headers={"Content-Type": "image/png"}).status_code] += 1
            latencies.append(time.perf_counter() - started)

        # One request first, scraped before the rest, so that rate() sees the whole burst.
        upscale(png_bytes(0))
        wait_for(lambda: scraped_upscales() == 1, SCRAPE_TIMEOUT_S, "warm-up scraped", prometheus_process, prometheus_log)
        for seed in range(1, UPSCALES + 1):
            upscale(png_bytes(seed))
        upscale(b"not an image")
        assert statuses[200] == UPSCALES + 1 and sum(statuses.values()) == UPSCALES + 2
        wait_for(lambda: scraped_upscales() == UPSCALES + 2, SCRAPE_TIMEOUT_S, "all requests scraped",
                 prometheus_process, prometheus_log)

        by_status = {item["metric"]["status"]: float(item["value"][1]) for item in
                     instant(prometheus, 'sum by (status) (s3diff_requests_total{endpoint="/v1/upscale"})')}
        assert by_status == {str(status): float(count) for status, count in statuses.items()}

        # Cumulative p99 as Prometheus computes it == the same rule applied to the service's own /metrics.
        stored_p99 = scalar(prometheus, 'histogram_quantile(0.99, sum by (le) '
                                        '(s3diff_request_duration_seconds_bucket{endpoint="/v1/upscale"}))')
        assert stored_p99 == pytest.approx(bucket_quantile(0.99, upscale_buckets_from_service(service)), rel=1e-9)

        # The dashboard's own p99 panel query: every observation is at most the slowest client-side
        # latency, so p99 cannot pass the bucket bound above it (with this few requests, rate()'s
        # extrapolation can move the rank up to that bucket, so no tighter bound holds).
        (p99_panel_query,) = {query for query in dashboard_queries(json.loads(DASHBOARD_FILE.read_text()))
                              if query.startswith("histogram_quantile(0.99,")}
        query = p99_panel_query.replace("$__rate_interval", "1m").replace('=~"$endpoint"', '="/v1/upscale"')
        dashboard_p99 = scalar(prometheus, query)
        bound = min(b for b in upscale_buckets_from_service(service) if b >= max(latencies))
        assert dashboard_p99 is not None and 0 < dashboard_p99 <= bound
        print(f"p99 over {UPSCALES} upscales: dashboard query {dashboard_p99:.4f} s, cumulative {stored_p99:.4f} s, "
              f"client max {max(latencies):.4f} s")

        # The repository's alert rules load and evaluate on real data without errors.
        def evaluated_rules():
            groups = prometheus.get("/api/v1/rules").json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return rules if rules and all(rule.get("lastEvaluation", "").startswith("2") for rule in rules) else None

        rules = wait_for(evaluated_rules, SCRAPE_TIMEOUT_S, "rules evaluated", prometheus_process, prometheus_log)
        assert {rule["name"]: rule["health"] for rule in rules} == {
            "S3DiffHighP99Latency": "ok", "S3DiffHigh5xxRatio": "ok", "S3DiffNotReady": "ok"}
        assert all(rule["state"] == "inactive" for rule in rules)
