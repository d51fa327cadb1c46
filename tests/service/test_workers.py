"""`s3diff serve --workers 2` on the CPU: two worker processes share one port, each loads the
weights once; /metrics counts every worker's requests whichever worker answers the scrape
(Prometheus multiprocess mode); SIGTERM to the supervisor drains both, then everything exits."""
from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service.conftest import start_server
from tests.service.images import metric, png_bytes


@pytest.fixture(scope="module")
def two_workers(tiny_merged_dir, tmp_path_factory):
    server = start_server(tiny_merged_dir, tmp_path_factory.mktemp("workers-logs"), extra_args=("--workers", "2"),
                          max_batch=1, max_wait_ms=0)
    deadline = time.monotonic() + 120
    while server.log().count("ready: weights") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    yield server
    server.stop()


def test_each_worker_loads_the_weights_once_and_metrics_cover_all_workers(two_workers):
    assert two_workers.log().count("ready: weights") == 2
    for seed in range(4):
        with two_workers.client() as client:  # a new connection each time: either worker may accept it
            assert client.post("/v1/upscale", content=png_bytes(8, 8, seed)).status_code == 200
    counts = set()
    for _ in range(6):
        with two_workers.client() as client:
            counts.add(metric(client.get("/metrics").text, "s3diff_requests_total", endpoint="/v1/upscale",
                              status="200"))
    assert counts == {4.0}


def test_sigterm_drains_queued_work_then_exits(two_workers):
    with two_workers.client() as client, ThreadPoolExecutor(8) as pool:
        in_flight = [pool.submit(client.post, "/v1/upscale", content=png_bytes(16, 16, seed)) for seed in range(8)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until every request is queued, running or answered
            queued = metric(client.get("/metrics").text, "s3diff_inflight_requests")
            if queued + sum(future.done() for future in in_flight) >= len(in_flight):
                break
            time.sleep(0.02)
        assert not all(future.done() for future in in_flight), "the work finished before SIGTERM could be sent"
        two_workers.process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        during = [client.get("/readyz"), client.post("/v1/upscale", content=png_bytes(8, 8))]
        finished = [future.result(timeout=120) for future in in_flight]
    assert [r.status_code for r in finished] == [200] * 8
    for response in during:
        assert response.status_code == 503 and response.json()["error"]["code"] == "draining"
    assert two_workers.process.wait(60) == 0
    assert two_workers.log().count("signal SIGTERM: draining") == 2  # the supervisor forwarded it to both
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{two_workers.url}/healthz", timeout=2)
