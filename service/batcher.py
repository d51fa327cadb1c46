"""The micro-batcher: a bounded queue in front of ONE inference thread.

Requests wait in arrival order; the scheduler takes the oldest live one, then up to `max_batch`
compatible ones (same handler, same key), waiting at most `max_wait` for more, and runs them as
one `handler.predict` call on the inference thread (the model is never touched from the event
loop or two threads). Knows nothing about images or HTTP beyond the errors it raises: each
request comes with its handler (service/handlers.py), so it is unit-tested with a fake one.
LitServe and TGI's router keep the same separation.
"""
from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Hashable, Protocol, Sequence

from s3diff_serve.service import metrics
from s3diff_serve.service.errors import ServiceError



class BatchHandler(Protocol):
    """What the batcher needs of a kind of request."""

    kind: str

    def batch_key(self, request: Any) -> Hashable | None:
        """Requests with equal keys may share a batch; None: always alone."""

    def cost(self, request: Any) -> float:
        """Relative work, for Retry-After."""

    def predict(self, requests: Sequence[Any]) -> Sequence[Any]:
        """One result per request, in order (runs on the inference thread)."""


@dataclass
class Outcome:
    """What a request gets back: the predict result and how it was scheduled (for logs/headers)."""

    result: Any
    queue_wait: float
    batch_size: int


@dataclass(eq=False)
class _Item:
    handler: BatchHandler
    payload: Any
    key: Hashable | None  # None: never shares a batch (tiled images, jobs)
    cost: float  # relative work (the pipeline plan's padded pixels), for Retry-After
    future: asyncio.Future
    enqueued_at: float = field(default_factory=time.perf_counter)
    queue_wait: float = 0.0
    batch_size: int = 0


class Batcher:
    def __init__(self, *, max_batch: int = 4, max_wait_s: float = 0.01, max_queue: int = 32):
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._queue: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        # One thread: all model work of this worker is serialised on it.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        # Running estimate of seconds per unit of cost, for Retry-After; None until a batch ran.
        self._seconds_per_cost: float | None = None
        self._running_cost = 0.0
        self._running: list[_Item] = []  # the batch being run now
        self._thread_busy = False  # anything (a batch, loading, warm-up) on the inference thread
        self._scheduler: asyncio.Task | None = None

    # --- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._scheduler = asyncio.get_running_loop().create_task(self._schedule(), name="batcher")

    async def run_on_inference_thread(self, function: Callable[[], Any]) -> Any:
        """Run `function` on the inference thread, serialised with the batches (e.g. warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._on_thread, function)

    def _on_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        self._thread_busy = True
        try:
            return function(*args)
        finally:
            self._thread_busy = False

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new work and let queued and running work finish; True when it did within
        `timeout_s`. Otherwise what is left is answered 503 `shutting_down` at once (a running
        batch's result is dropped), so a shutdown with a deadline still answers in JSON."""
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            for item in [*self._running, *self._queue]:
                if not item.future.done():
                    item.future.set_exception(ServiceError(503, "shutting_down", "the server is shutting down"))
            return False

    @property
    def busy(self) -> bool:
        """The inference thread is working (a batch whose answer may be gone, loading, warm-up)."""
        return self._thread_busy

    async def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(ServiceError(503, "shutting_down", "the server is shutting down"))
        self._queue.clear()
        # No wait: a batch cut off by the drain may run for minutes more; its result is dropped.
        self._thread.shutdown(wait=False, cancel_futures=True)

    # --- public state ---------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def retry_after_s(self) -> int:
        """Estimated seconds until a new request would start: the work queued ahead plus the
        running batch, each priced by its cost (padded pixels: a tall thin image costs what its
        padding costs); 1 s per request until a first batch has been timed."""
        if self._seconds_per_cost is None:
            return max(1, self.depth + (1 if self._running_cost else 0))
        work = sum(item.cost for item in self._queue) + self._running_cost
        return max(1, math.ceil(work * self._seconds_per_cost))

    # --- submitting -----------------------------------------------------------------------------
    async def submit(self, handler: BatchHandler, payload: Any, *, timeout_s: float,
                     client_gone: Callable[[], Awaitable[bool]] | None = None) -> Outcome:
        """Queue one request for `handler` and wait for its result.

        Raises ServiceError: 503 when draining, 429 (+ Retry-After) when the queue is full, 504
        past the deadline, 499 when `client_gone` says the client disconnected first. In the
        last two cases the item leaves the queue and is never run (or its result is dropped)."""
        if not self._accepting:
            metrics.REJECTED.labels("draining").inc()
            raise ServiceError(503, "draining", "the server is shutting down; retry on another instance")
        if len(self._queue) >= self.max_queue:
            metrics.REJECTED.labels("queue_full").inc()
            wait = self.retry_after_s()
            raise ServiceError(429, "queue_full", f"{len(self._queue)} requests are waiting; retry in {wait} s",
                               {"Retry-After": str(wait)})
        key = handler.batch_key(payload)
        key = None if key is None else (handler.kind, key)
        item = _Item(handler, payload, key, handler.cost(payload), asyncio.get_running_loop().create_future())
        metrics.INFLIGHT.inc()
        self._queue.append(item)
        self._on_queue_change()
        self._arrived.set()
        watcher = asyncio.ensure_future(_wait_until_gone(client_gone)) if client_gone else None
        try:
            waiting = {item.future} if watcher is None else {item.future, watcher}
            await asyncio.wait(waiting, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if item.future.done():
                return Outcome(item.future.result(), item.queue_wait, item.batch_size)
            if watcher is not None and watcher.done():
                metrics.REJECTED.labels("client_disconnected").inc()
                raise ServiceError(499, "client_closed_request", "the client disconnected before its turn")
            metrics.REJECTED.labels("deadline").inc()
            raise ServiceError(504, "deadline_exceeded", f"no result within the {timeout_s:g} s request deadline")
        finally:
            metrics.INFLIGHT.dec()
            if watcher is not None:
                watcher.cancel()
            if not item.future.done():
                item.future.cancel()  # the scheduler skips it; a running batch's result is dropped
            if item in self._queue:
                self._queue.remove(item)
                self._on_queue_change()

    # --- scheduling -----------------------------------------------------------------------------
    def _on_queue_change(self) -> None:
        metrics.QUEUE_DEPTH.set(len(self._queue))
        if self._queue:
            self._idle.clear()

    def _take_compatible(self, batch: list[_Item]) -> None:
        """Move queued items with the batch's key into it (oldest first), dropping dead ones."""
        key = batch[0].key
        for item in list(self._queue):
            if len(batch) >= self.max_batch:
                break
            if item.future.done():
                self._queue.remove(item)
            elif key is not None and item.key == key:
                self._queue.remove(item)
                batch.append(item)
        self._on_queue_change()

    async def _collect_batch(self) -> list[_Item]:
        while True:
            while not self._queue:
                self._idle.set()
                self._arrived.clear()
                await self._arrived.wait()
            first = self._queue.popleft()
            self._on_queue_change()
            if not first.future.done():
                break
        batch = [first]
        if first.key is None:
            return batch
        until = time.perf_counter() + self.max_wait_s
        while True:
            self._take_compatible(batch)
            remaining = until - time.perf_counter()
            if len(batch) >= self.max_batch or remaining <= 0:
                return batch
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def _schedule(self) -> None:
        while True:
            batch = [item for item in await self._collect_batch() if not item.future.done()]
            if not batch:
                continue
            self._idle.clear()
            started = time.perf_counter()
            for item in batch:
                item.queue_wait, item.batch_size = started - item.enqueued_at, len(batch)
                metrics.QUEUE_WAIT.observe(item.queue_wait)
            self._running_cost = sum(item.cost for item in batch)
            self._running = batch
            try:
                await self._run(batch)
            finally:
                self._running = []
            per_cost = (time.perf_counter() - started) / max(self._running_cost, 1e-9)
            self._seconds_per_cost = per_cost if self._seconds_per_cost is None else (
                0.8 * self._seconds_per_cost + 0.2 * per_cost)
            self._running_cost = 0.0
            if not self._queue:
                self._idle.set()

    async def _run(self, batch: list[_Item]) -> None:
        """Run one batch; if it fails as a whole, run its items one by one so a single bad input
        (or an out-of-memory batch) does not fail its neighbours."""
        loop = asyncio.get_running_loop()
        metrics.BATCH_SIZE.observe(len(batch))
        try:
            results = await loop.run_in_executor(self._thread, self._on_thread, batch[0].handler.predict,
                                                 [item.payload for item in batch])
        except Exception as error:  # noqa: BLE001 - handed to the waiting requests, never swallowed
            if len(batch) > 1:
                for item in batch:
                    item.batch_size = 1
                    await self._run([item])
                return
            _resolve(batch[0], error=error)
            return
        for item, result in zip(batch, results, strict=True):
            _resolve(item, result=result)


def _resolve(item: _Item, *, result: Any = None, error: BaseException | None = None) -> None:
    if item.future.done():  # the request gave up (deadline, disconnect) while it ran
        return
    if error is not None:
        item.future.set_exception(error)
    else:
        item.future.set_result(result)


async def _wait_until_gone(client_gone: Callable[[], Awaitable[bool]], poll_s: float = 0.05) -> None:
    """Poll Starlette's `is_disconnected`; it returns at once, so a short sleep bounds the cost."""
    while not await client_gone():
        await asyncio.sleep(poll_s)
