"""The micro-batcher with a fake handler: grouping, limits, deadlines, disconnects,
failure isolation and draining, without a model."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from s3diff_serve.service.batcher import Batcher
from s3diff_serve.service.errors import ServiceError


class FakeModel:
    """Records each batch it is given; returns payload*10; fails on payload 'bad'; can be held."""

    def __init__(self, delay_s: float = 0.0):
        self.batches: list[list] = []
        self.threads: set[str] = set()
        self.delay_s = delay_s
        self.release = threading.Event()
        self.release.set()

    def __call__(self, payloads):
        self.release.wait(5)
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(payloads))
        time.sleep(self.delay_s)
        if "bad" in payloads:
            raise ValueError("bad payload")
        return [payload * 10 for payload in payloads]


class Keyed:
    """A fake handler: every request gets `key` (None: runs alone) and runs through `model`."""

    kind = "fake"

    def __init__(self, model: FakeModel, key):
        self.predict, self.key = model, key

    def batch_key(self, payload):
        return self.key

    def cost(self, payload) -> float:
        return 1.0


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


async def started(model: FakeModel, **options) -> Batcher:
    batcher = Batcher(**options)
    batcher.start()
    return batcher


def test_compatible_requests_share_a_batch_up_to_max_batch():
    async def scenario():
        model = FakeModel()
        batcher = await started(model, max_batch=3, max_wait_s=0.2, max_queue=10)
        outcomes = await asyncio.gather(*(batcher.submit(Keyed(model, "a"), i, timeout_s=5) for i in range(5)))
        await batcher.stop()
        return model, outcomes

    model, outcomes = run(scenario())
    assert [o.result for o in outcomes] == [0, 10, 20, 30, 40]
    assert model.batches == [[0, 1, 2], [3, 4]]
    assert [o.batch_size for o in outcomes] == [3, 3, 3, 2, 2]
    assert model.threads == {"inference_0"}  # every batch ran on the one inference thread


def test_incompatible_requests_never_share_and_keyless_run_alone():
    async def scenario():
        model = FakeModel()
        batcher = await started(model, max_batch=4, max_wait_s=0.1, max_queue=10)
        submits = [batcher.submit(Keyed(model, "a"), 1, timeout_s=5), batcher.submit(Keyed(model, "b"), 2, timeout_s=5),
                   batcher.submit(Keyed(model, "a"), 3, timeout_s=5), batcher.submit(Keyed(model, None), 4, timeout_s=5),
                   batcher.submit(Keyed(model, None), 5, timeout_s=5)]
        await asyncio.gather(*submits)
        await batcher.stop()
        return model

    model = run(scenario())
    assert sorted(map(sorted, model.batches)) == [[1, 3], [2], [4], [5]]


def test_full_queue_refuses_with_429_and_retry_after():
    async def scenario():
        model = FakeModel()
        model.release.clear()  # hold the first batch so the queue fills behind it
        batcher = await started(model, max_batch=1, max_wait_s=0, max_queue=2)
        running = asyncio.ensure_future(batcher.submit(Keyed(model, "a"), 0, timeout_s=5))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(batcher.submit(Keyed(model, "a"), i, timeout_s=5)) for i in (1, 2)]
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceError) as refused:
            await batcher.submit(Keyed(model, "a"), 3, timeout_s=5)
        model.release.set()
        results = [o.result for o in await asyncio.gather(running, *queued)]
        await batcher.stop()
        return refused.value, results, model

    error, results, model = run(scenario())
    assert error.status == 429 and error.code == "queue_full"
    assert int(error.headers["Retry-After"]) >= 1
    assert results == [0, 10, 20] and [3] not in model.batches


def test_deadline_gives_504_and_the_expired_request_is_never_run():
    async def scenario():
        model = FakeModel()
        model.release.clear()
        batcher = await started(model, max_batch=1, max_wait_s=0, max_queue=5)
        running = asyncio.ensure_future(batcher.submit(Keyed(model, "a"), 0, timeout_s=5))
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceError) as expired:
            await batcher.submit(Keyed(model, "a"), 1, timeout_s=0.1)
        depth_after = batcher.depth
        model.release.set()
        await running
        await batcher.stop()
        return expired.value, depth_after, model

    error, depth_after, model = run(scenario())
    assert (error.status, error.code) == (504, "deadline_exceeded")
    assert depth_after == 0 and model.batches == [[0]]


def test_client_that_disconnects_while_queued_is_dropped():
    async def scenario():
        model = FakeModel()
        model.release.clear()
        batcher = await started(model, max_batch=1, max_wait_s=0, max_queue=5)
        running = asyncio.ensure_future(batcher.submit(Keyed(model, "a"), 0, timeout_s=5))
        await asyncio.sleep(0.05)
        gone = asyncio.Event()

        async def client_gone() -> bool:
            return gone.is_set()

        queued = asyncio.ensure_future(batcher.submit(Keyed(model, "a"), 1, timeout_s=5, client_gone=client_gone))
        await asyncio.sleep(0.05)
        gone.set()
        with pytest.raises(ServiceError) as dropped:
            await queued
        model.release.set()
        await running
        await batcher.submit(Keyed(model, "a"), 2, timeout_s=5)
        await batcher.stop()
        return dropped.value, model

    error, model = run(scenario())
    assert error.status == 499
    assert model.batches == [[0], [2]]  # payload 1 never reached the model


def test_a_failing_batch_is_rerun_item_by_item():
    async def scenario():
        model = FakeModel()
        batcher = await started(model, max_batch=3, max_wait_s=0.2, max_queue=10)
        results = await asyncio.gather(*(batcher.submit(Keyed(model, "a"), p, timeout_s=5) for p in (1, "bad", 3)),
                                       return_exceptions=True)
        await batcher.stop()
        return results, model

    results, model = run(scenario())
    assert results[0].result == 10 and results[2].result == 30
    assert isinstance(results[1], ValueError)
    assert model.batches == [[1, "bad", 3], [1], ["bad"], [3]]
    assert results[0].batch_size == 1


def test_drain_finishes_queued_work_then_refuses_new_work():
    async def scenario():
        model = FakeModel(delay_s=0.05)
        batcher = await started(model, max_batch=1, max_wait_s=0, max_queue=10)
        pending = [asyncio.ensure_future(batcher.submit(Keyed(model, "a"), i, timeout_s=5)) for i in range(3)]
        await asyncio.sleep(0.01)
        finished = await batcher.drain(timeout_s=5)
        with pytest.raises(ServiceError) as refused:
            await batcher.submit(Keyed(model, "a"), 9, timeout_s=5)
        results = [o.result for o in await asyncio.gather(*pending)]
        await batcher.stop()
        return finished, refused.value, results

    finished, error, results = run(scenario())
    assert finished and results == [0, 10, 20]
    assert (error.status, error.code) == (503, "draining")
