"""The app factory: wires settings, the micro-batcher, the codec pool, jobs, middleware and
routes. Weights are loaded once per process, on the inference thread, after the server is up,
so `/healthz` answers during loading and `/readyz` turns 200 only after the warm-up pass."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI

from s3diff_serve.model import S3DiffPipeline
from s3diff_serve.service import metrics
from s3diff_serve.service.batcher import Batcher
from s3diff_serve.service.body_limit import BodyLimitMiddleware
from s3diff_serve.service.errors import ServiceError, install_error_handlers
from s3diff_serve.service.handlers import EstimateHandler, Handler, UpscaleHandler
from s3diff_serve.service.jobs import JobStore
from s3diff_serve.service.request_log import RequestLogMiddleware
from s3diff_serve.service.routes import jobs, system, upscale
from s3diff_serve.service.settings import ServiceSettings

logger = logging.getLogger("s3diff.service")
PipelineLoader = Callable[[ServiceSettings, str | None], S3DiffPipeline]


def load_pipeline(settings: ServiceSettings, dtype: str | None) -> S3DiffPipeline:
    return S3DiffPipeline.from_merged(settings.weights, device=settings.device, dtype=dtype, compile=settings.compile)


class ServiceState:
    """Everything the routes share, kept on `app.state.service`."""

    def __init__(self, settings: ServiceSettings, loader: PipelineLoader):
        self.settings, self._loader = settings, loader
        self.pipeline: S3DiffPipeline | None = None
        self.handlers: dict[str, Handler] = {}  # by kind, once the model is loaded
        self.load_error: str | None = None
        self.ready = False
        self.batcher: Batcher | None = None
        self.codec_pool = ThreadPoolExecutor(settings.codec_threads, thread_name_prefix="codec")
        self.jobs = JobStore(settings.max_jobs, settings.job_ttl_s)
        self._loading: asyncio.Task | None = None

    @property
    def draining(self) -> bool:
        return self.batcher is not None and not self.batcher.accepting

    def require_ready(self) -> Batcher:
        if self.draining:
            raise ServiceError(503, "draining", "the server is shutting down; retry on another instance")
        if not self.ready or self.batcher is None:
            detail = f"loading the model failed: {self.load_error}" if self.load_error else "the model is loading"
            raise ServiceError(503, "not_ready", detail, {"Retry-After": "5"})
        return self.batcher

    def handler(self, kind: str) -> Handler:
        """The handler of one kind of request ("upscale", "estimate"), once the service is ready."""
        self.require_ready()
        return self.handlers[kind]

    async def run_codec(self, function: Callable[..., Any], *args: Any) -> Any:
        """Image decode/encode off the event loop, in the small codec pool."""
        return await asyncio.get_running_loop().run_in_executor(self.codec_pool, function, *args)

    async def start(self) -> None:
        settings = self.settings
        self.batcher = Batcher(max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000,
                               max_queue=settings.max_queue)
        self.batcher.start()
        self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        try:
            pipeline = await self.batcher.run_on_inference_thread(lambda: self._loader(self.settings, self.settings.dtype))
            warmup = await self.batcher.run_on_inference_thread(pipeline.warmup)
        except Exception as error:  # noqa: BLE001 - reported by /readyz and the log, the process stays up
            self.load_error = f"{type(error).__name__}: {error}"
            logger.exception("loading the model from %s failed", self.settings.weights or "the built-in demo model")
            return
        self.pipeline = pipeline
        settings = self.settings
        self.handlers = {
            "upscale": UpscaleHandler(pipeline, max_input_pixels=settings.max_input_pixels,
                                      max_output_pixels=settings.max_output_pixels,
                                      load_fp32=lambda: self._loader(settings, "fp32")),
            "estimate": EstimateHandler(pipeline, max_input_pixels=settings.max_input_pixels),
        }
        metrics.MODEL_INFO.labels(pipeline.weights_id, str(pipeline.dtype).removeprefix("torch."),
                                  str(pipeline.device)).set(1)
        self.ready = True
        logger.info("ready: weights %s (%s) on %s (%s); warm-up %.1f s, compile seconds %s", pipeline.source,
                    pipeline.weights_id, pipeline.device, pipeline.dtype, warmup["seconds"], warmup["compile_seconds"])

    async def drain(self) -> bool:
        """SIGTERM: /readyz turns 503, new work is refused, queued and running work gets
        `drain_timeout_s`; what is still running then is answered 503 `shutting_down`."""
        if self.batcher is None or not self.batcher.accepting and self.batcher.depth == 0:
            return True  # nothing to do, or already drained by the signal handler
        finished = await self.batcher.drain(self.settings.drain_timeout_s)
        if finished:
            logger.info("drained")
        else:
            logger.warning("drain timed out after %g s: unfinished requests answered 503 shutting_down",
                           self.settings.drain_timeout_s)
        return finished

    async def stop(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
        self.jobs.cancel_all()
        if self.batcher is not None:
            await self.batcher.stop()
        self.codec_pool.shutdown(wait=False)


def create_app(settings: ServiceSettings | None = None, loader: PipelineLoader = load_pipeline) -> FastAPI:
    settings = settings or ServiceSettings()
    state = ServiceState(settings, loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        yield
        await state.drain()
        await state.stop()

    app = FastAPI(title="s3diff-serve", version="0.1.0", lifespan=lifespan,
                  description="S3Diff one-step 4x super-resolution (arXiv 2409.17058)")
    app.state.service = state
    install_error_handlers(app)
    for router in (upscale.router, jobs.router, system.router):
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestLogMiddleware)  # added last = outermost: it sees every response
    return app
