"""Overload and shutdown on real servers: a full queue sheds with 429 + Retry-After, the request
deadline gives 504, and SIGTERM drains queued work before the process exits."""
from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service.conftest import start_server
from tests.service.images import metric, png_bytes


@pytest.fixture(scope="module")
def tight_server(tiny_merged_dir, tmp_path_factory):
    """One request at a time, one waiting, a one-second deadline."""
    running = start_server(tiny_merged_dir, tmp_path_factory.mktemp("tight-logs"), max_batch=1, max_queue=1,
                           max_wait_ms=0, request_timeout_s=1.0)
    yield running
    running.stop()


def test_full_queue_sheds_with_429_and_retry_after(tight_server):
    with tight_server.client() as client:
        before = client.get("/metrics").text
        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(lambda seed: client.post("/v1/upscale", content=png_bytes(8, 8, seed)), range(6)))
        after = client.get("/metrics").text
    statuses = [r.status_code for r in responses]
    shed = [r for r in responses if r.status_code == 429]
    assert shed and set(statuses) <= {200, 429, 504}, statuses
    for response in shed:
        assert response.json()["error"]["code"] == "queue_full"
        assert int(response.headers["retry-after"]) >= 1
    rejected = metric(after, "s3diff_rejected_total", reason="queue_full") - metric(
        before, "s3diff_rejected_total", reason="queue_full")
    assert rejected == len(shed)


def test_request_past_its_deadline_gets_504(tight_server):
    # 128x128 -> 512x512 takes seconds on this CPU even with tiny weights: past the 1 s deadline.
    with tight_server.client() as client:
        response = client.post("/v1/upscale", content=png_bytes(128, 128))
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline_exceeded"
        assert metric(client.get("/metrics").text, "s3diff_rejected_total", reason="deadline") >= 1


def test_sigterm_drains_queued_work_then_exits(tiny_merged_dir, tmp_path):
    server = start_server(tiny_merged_dir, tmp_path, max_batch=1, max_wait_ms=0)
    try:
        with server.client() as client, ThreadPoolExecutor(3) as pool:
            in_flight = [pool.submit(client.post, "/v1/upscale", content=png_bytes(16, 16, seed)) for seed in range(3)]
            deadline = time.monotonic() + 30
            while metric(client.get("/metrics").text, "s3diff_inflight_requests") < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            during = [client.get("/readyz"), client.post("/v1/upscale", content=png_bytes(8, 8))]
            finished = [future.result(timeout=120) for future in in_flight]
        assert [r.status_code for r in finished] == [200, 200, 200]
        assert during[0].status_code == 503 and during[0].json()["error"]["code"] == "draining"
        assert during[1].status_code == 503 and during[1].json()["error"]["code"] == "draining"
        assert server.process.wait(60) == 0
        assert "drained" in server.log()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/healthz", timeout=2)
    finally:
        server.stop()
