"""Every tunable of the service in one pydantic-settings class (env prefix `S3DIFF_`), so the
README table, the CLI flags and the tests all name the same knobs."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="S3DIFF_", extra="ignore")

    weights: Path | None = Field(None, description="folder of merged weights (`s3diff convert`); "
                                                 "None = the built-in demo model")
    device: str | None = Field(None, description="torch device; None = cuda when present, else cpu")
    dtype: str | None = Field(None, description="fp32/bf16/fp16; None = fp16 on CUDA, bf16 on CPUs with "
                                                 "native bf16 (AVX-512-BF16/AMX), else fp32")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the encoder, UNet and decoder at warm-up: auto = models of >= 100 M "
                            "parameters, on CUDA and for bf16 on the CPU (docs/model.md, 'Compiled fast path')")
    compile_cache: Path | None = Field(None, description="folder that keeps torch.compile's kernels across restarts "
                                                         "(the images' compile-cache volume: /cache/compile)")
    host: str = "127.0.0.1"
    port: int = 8000
    workers: str = Field("auto", description="'auto' = one per visible CUDA device (one on CPU), or a number")

    max_batch: int = Field(4, ge=1, description="largest micro-batch run as one pipeline call")
    max_wait_ms: float = Field(10.0, ge=0, description="how long the batcher waits to fill a batch")
    max_queue: int = Field(32, ge=1, description="requests waiting beyond this are refused with 429")
    request_timeout_s: float = Field(120.0, gt=0, description="per-request deadline, then 504")
    drain_timeout_s: float = Field(30.0, ge=0, description="SIGTERM: how long queued and running work may finish; "
                                                             "then 503 shutting_down and exit")
    codec_threads: int = Field(2, ge=1, description="thread pool for image decode/encode")
    cpu_threads: int | None = Field(None, ge=1, description="torch CPU threads per worker; None = cores / workers")

    max_body_bytes: int = Field(25 * 1024 * 1024, ge=1)
    max_input_pixels: int = Field(4096 * 4096, ge=1)
    max_output_pixels: int = Field(8192 * 8192, ge=1)

    job_ttl_s: float = Field(3600.0, gt=0, description="finished jobs are kept this long")
    max_jobs: int = Field(256, ge=1, description="jobs kept per worker")

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="comma-separated; empty = no auth")
    log_level: str = "info"
    # prometheus-client reads this variable itself; named here so the service knows it is on.
    prometheus_multiproc_dir: str | None = Field(None, validation_alias="PROMETHEUS_MULTIPROC_DIR")

    @field_validator("weights", mode="before")
    @classmethod
    def _empty_is_builtin(cls, value):
        """S3DIFF_WEIGHTS= (set but empty, as a compose file or image may leave it) means the
        built-in model, not the current folder."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        """Env values arrive as one comma-separated string."""
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value
