"""The drain deadline: work still queued or running when `drain_timeout_s` ends is answered with
the JSON 503 `shutting_down` at once, and the process exits without waiting for the batch still on
the inference thread (Compose's and Kubernetes' grace periods would SIGKILL it otherwise)."""
from __future__ import annotations

import asyncio
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from s3diff_serve.service.batcher import Batcher
from s3diff_serve.service.errors import ServiceError
from tests.service.conftest import start_server
from tests.service.images import metric, png_bytes


def test_drain_deadline_answers_running_and_queued_work_503():
    release = threading.Event()

    class Blocked:
        """A handler whose predict holds the inference thread until released."""

        kind = "test"

        def batch_key(self, request):
            return "a"

        def cost(self, request):
            return 1.0

        def predict(self, requests):
            release.wait(30)
            return list(requests)

    async def scenario():
        batcher = Batcher(max_batch=1, max_wait_s=0, max_queue=10)
        batcher.start()
        handler = Blocked()
        running = asyncio.ensure_future(batcher.submit(handler, "running", timeout_s=30))
        queued = asyncio.ensure_future(batcher.submit(handler, "queued", timeout_s=30))
        while not batcher.busy:
            await asyncio.sleep(0.01)
        finished = await batcher.drain(timeout_s=0.05)
        outcomes = await asyncio.gather(running, queued, return_exceptions=True)
        busy_after = batcher.busy  # the cut-off batch is still on the inference thread
        release.set()
        await batcher.stop()
        return finished, outcomes, busy_after

    finished, outcomes, busy_after = asyncio.run(scenario())
    assert not finished and busy_after
    for outcome in outcomes:
        assert isinstance(outcome, ServiceError)
        assert (outcome.status, outcome.code) == (503, "shutting_down")


@pytest.fixture()
def slow_server(tiny_merged_dir, tmp_path):
    """A server with a 0.5 s drain deadline and one request at a time."""
    server = start_server(tiny_merged_dir, tmp_path, drain_timeout_s=0.5, max_batch=1, max_wait_ms=0)
    yield server
    server.stop()


def test_sigterm_past_the_deadline_gives_json_503_and_exits_without_the_batch(slow_server):
    # Large enough to be mid-computation at SIGTERM: the tiny model takes seconds on it.
    big = png_bytes(384, 384, seed=1)
    with slow_server.client(timeout=300) as client, ThreadPoolExecutor(2) as pool:
        in_flight = [pool.submit(client.post, "/v1/upscale", content=big) for _ in range(2)]
        deadline = time.monotonic() + 60
        while metric(client.get("/metrics").text, "s3diff_inflight_requests") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        slow_server.process.send_signal(signal.SIGTERM)
        responses = [future.result(timeout=120) for future in in_flight]
    for response in responses:  # one running, one queued behind it
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "shutting_down"
    assert slow_server.process.wait(120) == 0
    log = slow_server.log()
    assert "drain timed out after 0.5 s" in log and "exiting without waiting for the inference thread" in log
