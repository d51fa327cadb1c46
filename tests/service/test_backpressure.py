"""Overload on a real server: a full queue sheds with 429 + Retry-After, the request deadline
gives 504 (SIGTERM draining is in test_workers.py)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.service.conftest import start_server
from tests.service.images import metric, png_bytes


@pytest.fixture(scope="module")
def tight_server(tiny_merged_dir, tmp_path_factory):
    """One request at a time, one waiting, a half-second deadline."""
    running = start_server(tiny_merged_dir, tmp_path_factory.mktemp("tight-logs"), max_batch=1, max_queue=1,
                           max_wait_ms=0, request_timeout_s=0.5)
    yield running
    running.process.kill()  # no drain needed here (test_workers.py covers it); the 504 request still computes
    running.process.wait(30)


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
    # 96x96 -> 384x384 takes over a second on a 2-core CPU even with tiny weights: past the deadline.
    with tight_server.client() as client:
        response = client.post("/v1/upscale", content=png_bytes(96, 96))
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline_exceeded"
        assert metric(client.get("/metrics").text, "s3diff_rejected_total", reason="deadline") >= 1
