"""The deployment for real: the service image built from docker/service.Dockerfile on a local
Debian base, the compose file's `demo` service and Prometheus brought up together, then a real
photo upscaled, the latency histogram scraped, a graceful `docker compose stop`, the drain
deadline's JSON 503, and a killed server restarted by the restart policy.

Runs as root with a Docker engine and Compose v2 (scripts/install-dev.sh); skips with the reason
elsewhere. Base images are cached by content and image layers by Docker, so only the first run
on a machine builds everything (docs/deploy.md: how long each takes)."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from s3diff_serve.model.builtin import BUILTIN_DIR

from .deploy_helpers import DASHBOARD_FILE, RULES_FILE, dashboard_queries
from .stack import ComposeStack, free_port, wait_ready

SERVICE = "s3diff-demo"
HISTOGRAM = "s3diff_request_duration_seconds"
# A real photo (scikit-image's astronaut): a small crop for quick requests; a 160x160 crop as the
# request running when the container is stopped (~8 s on a 2-core CPU, inside the 30 s drain) or
# killed; the whole 512x512 picture as the one still running at a 1 s drain deadline.
SMALL_CROP = (slice(40, 136), slice(160, 288))
MEDIUM_CROP = (slice(0, 160), slice(128, 288))
BUILTIN_CONFIG = json.loads((BUILTIN_DIR / "config.json").read_text())


def photo_png(crop=(slice(None), slice(None))) -> tuple[bytes, tuple[int, int]]:
    pixels = skimage_data.astronaut()[crop]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue(), (pixels.shape[1], pixels.shape[0])


def decoded_size(body: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(body)).size


@pytest.fixture(scope="module")
def stack(images):
    running = ComposeStack("s3diff-stacktest", "demo", *images)
    running.down()  # a previous run killed before its teardown
    running.compose("up", "-d", "--no-build", SERVICE, "prometheus")
    try:
        running.wait_healthy(SERVICE)
        yield running
    finally:
        running.down()


def upscale(url: str, png: bytes, timeout: float = 300) -> httpx.Response:
    return httpx.post(f"{url}/v1/upscale", content=png, headers={"Content-Type": "image/png"}, timeout=timeout)


def wait_until_running(url: str, response_future) -> None:
    """Until the service reports the request in flight (so a signal meets it mid-request)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not response_future.done():
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        match = re.search(r"^s3diff_inflight_requests (\S+)$", metrics, flags=re.MULTILINE)
        if match and float(match.group(1)) >= 1:
            return
        time.sleep(0.05)
    raise AssertionError("the request was not in flight")


def test_real_photo_comes_back_4x(stack):
    png, (width, height) = photo_png(SMALL_CROP)
    response = upscale(stack.url, png)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert decoded_size(response.content) == (4 * width, 4 * height)
    model = httpx.get(f"{stack.url}/v1/model", timeout=10).json()  # S3DIFF_WEIGHTS unset: the built-in model
    assert (model["weights"], model["weights_id"]) == ("builtin-demo", BUILTIN_CONFIG["weights_id"])


def test_prometheus_scrapes_the_latency_histogram_the_dashboard_and_alerts_query(stack):
    upscale(stack.url, photo_png(SMALL_CROP)[0]).raise_for_status()
    count = f'{HISTOGRAM}_count{{job="s3diff",endpoint="/v1/upscale"}}'
    scraped = stack.wait_for_query(count, lambda result: result and float(result[0]["value"][1]) >= 2)
    assert scraped[0]["metric"]["endpoint"] == "/v1/upscale"
    buckets = stack.query(f'{HISTOGRAM}_bucket{{job="s3diff",endpoint="/v1/upscale"}}')
    assert {series["metric"]["le"] for series in buckets} >= {"0.5", "1.0", "+Inf"}
    alert_exprs = [rule["expr"] for group in yaml_rules()["groups"] for rule in group["rules"]]
    queries = [q for q in dashboard_queries(json.loads(DASHBOARD_FILE.read_text())) + alert_exprs if HISTOGRAM in q]
    assert queries
    for query in queries:
        # Grafana's variables, as the dashboard fills them in.
        promql = query.replace("$endpoint", "/v1/upscale").replace("$__rate_interval", "1m")
        # Grafana's label_values(metric, label) variable query, in PromQL.
        promql = re.sub(r"^label_values\((.+),\s*(\w+)\)$", r"count by (\2) (\1)", promql.strip())
        promql = re.sub(r"\)\s*>\s*[\d.]+\s*$", ")", promql.strip())  # the alert's threshold: the series itself
        assert stack.wait_for_query(promql), promql


def yaml_rules() -> dict:
    import yaml

    return yaml.safe_load(RULES_FILE.read_text())


def test_compose_stop_lets_a_running_request_finish_then_exits_0(stack):
    png, (width, height) = photo_png(MEDIUM_CROP)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(upscale, stack.url, png)
        wait_until_running(stack.url, running)
        stopped = stack.compose("stop", SERVICE)  # SIGTERM, then SIGKILL after stop_grace_period
        response = running.result(timeout=120)
    assert stopped.returncode == 0
    assert response.status_code == 200, response.text
    assert decoded_size(response.content) == (4 * width, 4 * height)
    assert stack.inspect(SERVICE, "{{.State.ExitCode}}") == "0"  # not 137: it left before the SIGKILL
    assert "drained" in stack.logs(SERVICE)
    stack.compose("start", SERVICE)
    stack.wait_ready()


def test_request_running_at_the_drain_deadline_gets_json_503_and_the_process_exits(images):
    """A short drain deadline (S3DIFF_DRAIN_TIMEOUT_S=1) on the same image: the running request is
    answered 503 `shutting_down` and the process exits on its own, long before `docker stop`'s
    SIGKILL (an exit code of 0, not 137)."""
    port = free_port()
    container = subprocess.run(
        ["docker", "run", "-d", "-p", f"127.0.0.1:{port}:8000", "-e", "S3DIFF_DRAIN_TIMEOUT_S=1",
         "-e", "S3DIFF_COMPILE=off", images[0]],
        capture_output=True, text=True, check=True).stdout.strip()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(upscale, url, photo_png()[0])
            wait_until_running(url, running)
            stop = threading.Thread(target=subprocess.run, args=(["docker", "stop", "-t", "60", container],),
                                    kwargs={"capture_output": True})
            stop.start()
            response = running.result(timeout=120)
            stop.join(120)
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == "shutting_down"
        state = json.loads(subprocess.run(["docker", "inspect", "--format", "{{json .State}}", container],
                                          capture_output=True, text=True, check=True).stdout)
        assert (state["Running"], state["ExitCode"]) == (False, 0)
        logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True).stdout
        assert "answered 503 shutting_down" in logs
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)


def test_killed_server_is_restarted_and_prometheus_sees_it_down_then_up(stack):
    restarts = int(stack.inspect(SERVICE, "{{.RestartCount}}"))
    stack.wait_for_query('up{job="s3diff"} == 1')
    for _attempt in range(3):  # a restart quicker than one scrape interval can hide the outage
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(upscale, stack.url, photo_png(MEDIUM_CROP)[0])
            wait_until_running(stack.url, running)
            # SIGKILL to the server process from outside, as a crash or the OOM killer would;
            # (`docker kill` counts as a manual stop, which the restart policy leaves stopped.)
            os.kill(int(stack.inspect(SERVICE, "{{.State.Pid}}")), signal.SIGKILL)
            with pytest.raises(httpx.TransportError):
                running.result(timeout=60)
        stack.wait_ready()
        stack.wait_for_query('up{job="s3diff"} == 1')
        if stack.query('min_over_time(up{job="s3diff"}[3m]) == 0'):
            break
    assert int(stack.inspect(SERVICE, "{{.RestartCount}}")) > restarts
    assert stack.query('min_over_time(up{job="s3diff"}[3m]) == 0'), "Prometheus never saw the service down"
    png, (width, height) = photo_png(SMALL_CROP)
    response = upscale(stack.url, png)
    assert response.status_code == 200 and decoded_size(response.content) == (4 * width, 4 * height)
