"""Running the app: uvicorn with a graceful SIGTERM drain, and one worker process per device.

Drain (docs/service.md, 'Graceful shutdown'): the first SIGTERM/SIGINT does not stop uvicorn at once; the
service first turns /readyz to 503 and refuses new work while queued and running work finishes (at
most `drain_timeout_s`; what is left then is answered 503 `shutting_down`), and only then lets
uvicorn close connections and exit, without waiting for a cut-off batch still on the inference
thread. So the process is gone a few seconds after `drain_timeout_s`, inside Compose's and
Kubernetes' grace periods. A second signal exits at once.

Workers: one process per visible CUDA device (worker i on cuda:i), one CPU worker otherwise.
They share one listening socket bound here; with several, Prometheus multiprocess mode is
switched on so /metrics on any of them reports all of them."""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile

import uvicorn
from fastapi import FastAPI

from s3diff_serve.service.settings import ServiceSettings

logger = logging.getLogger("s3diff.service")
# After the drain, uvicorn only has to send the responses already decided (results or 503s).
RESPONSE_FLUSH_S = 5.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self._drain_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if self._drain_task is not None or self._loop is None:
            super().handle_exit(sig, frame)  # second signal (or not started yet): stop now
            return
        logger.info("signal %s: draining", signal.Signals(sig).name)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        async def drain_then_exit() -> None:
            await self.config.app.state.service.drain()
            self.should_exit = True

        self._drain_task = self._loop.create_task(drain_then_exit())


def configure_logging(level: str) -> None:
    """Request lines are already JSON (request_log.py); print them bare, one per line."""
    logging.basicConfig(level=level.upper(), format="%(message)s", stream=sys.stdout, force=True)


def worker_devices(settings: ServiceSettings) -> list[str | None]:
    """The device of each worker process: cuda:0..n-1 when CUDA is visible, else one CPU worker
    (or N CPU workers when N is asked for explicitly)."""
    import torch

    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if settings.workers == "auto":
        count = cuda_count or 1
    elif settings.workers.isdigit() and int(settings.workers) >= 1:
        count = int(settings.workers)
    else:
        raise ValueError(f"workers must be 'auto' or a positive number, got {settings.workers!r}")
    if settings.device is not None and count == 1:
        return [settings.device]
    if cuda_count:
        return [f"cuda:{index % cuda_count}" for index in range(count)]
    return [settings.device or "cpu"] * count


def run_worker(settings: ServiceSettings, sock: socket.socket | None = None) -> None:
    """One worker: build the app (weights load in the background), serve until drained."""
    import torch

    from s3diff_serve.service.app import create_app

    configure_logging(settings.log_level)
    if settings.cpu_threads is not None:
        torch.set_num_threads(settings.cpu_threads)
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                            log_config=None, timeout_graceful_shutdown=RESPONSE_FLUSH_S)
    DrainingServer(config).run(sockets=[sock] if sock is not None else None)
    exit_past_cut_off_batch(app)


def exit_past_cut_off_batch(app: FastAPI) -> None:
    """A batch cut off by the drain (or a load still running) keeps the inference thread busy, and
    Python joins that thread at exit; leave now instead: its requests have had their 503."""
    batcher = app.state.service.batcher
    if batcher is not None and batcher.busy:
        logger.info("exiting without waiting for the inference thread (a cut-off batch or a load)")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def serve(settings: ServiceSettings) -> int:
    configure_logging(settings.log_level)
    devices = worker_devices(settings)
    if len(devices) == 1:
        run_worker(settings.model_copy(update={"device": devices[0]}))
        return 0
    return _serve_many(settings, devices)


def _serve_many(settings: ServiceSettings, devices: list[str | None]) -> int:
    """Spawn one process per device on a shared socket, forward signals, reap them."""
    from prometheus_client import multiprocess

    if settings.cpu_threads is None and all(device in (None, "cpu") for device in devices):
        # CPU workers split the cores: several processes each spinning as many OpenMP threads as
        # there are cores oversubscribe them and slow every worker down many times over.
        settings = settings.model_copy(update={"cpu_threads": max(1, (os.cpu_count() or 1) // len(devices))})
    metrics_dir = tempfile.mkdtemp(prefix="s3diff-metrics-")
    # prometheus-client reads this at import time in each (spawned) worker.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    settings = settings.model_copy(update={"prometheus_multiproc_dir": metrics_dir})
    sock = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.set_inheritable(True)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=run_worker, args=(settings.model_copy(update={"device": device}), sock),
                               name=f"s3diff-worker-{index}") for index, device in enumerate(devices)]
    for worker in workers:
        worker.start()
    logger.info("started %d workers on %s:%d: %s", len(workers), settings.host, settings.port, devices)

    def forward(sig: int, frame) -> None:
        for worker in workers:
            if worker.is_alive():
                os.kill(worker.pid, sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    for worker in workers:
        worker.join()
        multiprocess.mark_process_dead(worker.pid, metrics_dir)
    sock.close()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return max((abs(worker.exitcode or 0) for worker in workers), default=0)
