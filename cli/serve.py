"""`s3diff serve`: the HTTP service. Flags override the S3DIFF_* environment (see README)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve the model over HTTP (FastAPI + uvicorn)")
    parser.add_argument("--weights", type=Path,
                        help="merged weights folder (env S3DIFF_WEIGHTS); default: the built-in demo model")
    parser.add_argument("--host", help="bind address (env S3DIFF_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (env S3DIFF_PORT, default 8000)")
    parser.add_argument("--workers", help="'auto' (one per CUDA device, one on CPU) or a number")
    parser.add_argument("--device", help="torch device for a single worker (default: cuda if present)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights dtype at run time")
    parser.add_argument("--compile", choices=["auto", "on", "off"],
                        help="torch.compile at warm-up (env S3DIFF_COMPILE, default auto: models of >= 100 M parameters, "
                             "on CUDA and in bf16 on the CPU; compiled graphs persist in S3DIFF_COMPILE_CACHE)")
    parser.add_argument("--max-batch", type=int, help="micro-batch size (env S3DIFF_MAX_BATCH, default 4)")
    parser.add_argument("--max-wait-ms", type=float, help="batch fill wait (env S3DIFF_MAX_WAIT_MS, default 10)")
    parser.add_argument("--max-queue", type=int, help="waiting requests before 429 (env S3DIFF_MAX_QUEUE)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from s3diff_serve.service.server import serve
    from s3diff_serve.service.settings import ServiceSettings

    overrides = {name: value for name, value in vars(args).items()
                 if name not in ("command", "handler") and value is not None}
    try:
        settings = ServiceSettings(**overrides)
    except ValidationError as error:
        print(f"error: {error}")
        return 2
    if settings.weights is not None and not (settings.weights / "config.json").is_file():
        print(f"error: {settings.weights} is not a merged weights folder (no config.json); "
              "make one with `s3diff convert`")
        return 2
    try:
        return serve(settings)
    except ValueError as error:
        print(f"error: {error}")
        return 2
