"""`s3diff loadtest`: throughput and latency of a real `s3diff serve` under concurrent load, with
micro-batching on (max_batch 4) and off (max_batch 1), in the same run, written as JSON.

Each mode gets its own server subprocess on a free 127.0.0.1 port; each concurrency level sends
the same number of same-size random images from that many concurrent clients. Without
--weights, tiny random weights are built in a temporary folder (the CI/CPU setting)."""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {"batched": 4, "unbatched": 1}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("loadtest", help="load benchmark of the HTTP service (batching on vs off)")
    parser.add_argument("--weights", type=Path, help="merged weights folder (default: build tiny random weights)")
    parser.add_argument("--size", type=int, default=32, help="input image side in pixels (default 32)")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level (default 32)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="batch window of the batched mode")
    parser.add_argument("--out", type=Path, default=Path("bench-results/loadtest.json"), help="JSON output path")
    parser.set_defaults(handler=run)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tiny_weights(folder: Path) -> Path:
    from s3diff_serve.model.checkpoints import save_merged
    from s3diff_serve.model.presets import build_model

    merged = folder / "merged"
    save_merged(build_model("tiny", seed=0), merged, dtype="fp32")
    return merged


def _images(count: int, size: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
        images.append(buffer.getvalue())
    return images


class _Server:
    """`s3diff serve` in a subprocess, stopped with SIGTERM (which drains it)."""

    def __init__(self, weights: Path, max_batch: int, max_wait_ms: float, log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "S3DIFF_MAX_BATCH": str(max_batch),
               "S3DIFF_MAX_WAIT_MS": str(max_wait_ms), "S3DIFF_MAX_QUEUE": "64", "S3DIFF_API_KEYS": ""}
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "s3diff_serve.cli.main", "serve", "--weights", str(weights), "--port", str(self.port),
             "--host", "127.0.0.1", "--workers", "1"], env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 180) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}; see {self._log.name}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout_s:.0f} s; see {self._log.name}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


def _batch_totals(url: str) -> tuple[float, float]:
    """(images, batches) so far, from the server's s3diff_batch_size histogram."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    values = {sample.name: sample.value for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
              for sample in family.samples if sample.name.startswith("s3diff_batch_size")}
    return values.get("s3diff_batch_size_sum", 0.0), values.get("s3diff_batch_size_count", 0.0)


async def _load(url: str, images: list[bytes], concurrency: int) -> tuple[list[float], list[int], float]:
    """Send every image once from `concurrency` clients; latencies, statuses, wall time."""
    import httpx

    latencies, statuses = [], []
    next_index = iter(range(len(images)))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for index in next_index:
            started = time.perf_counter()
            response = await client.post("/v1/upscale", content=images[index], headers={"content-type": "image/png"})
            latencies.append(time.perf_counter() - started)
            statuses.append(response.status_code)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return latencies, statuses, time.perf_counter() - started


def _measure(url: str, images: list[bytes], concurrency: int) -> dict:
    import numpy as np

    images_before, batches_before = _batch_totals(url)
    latencies, statuses, wall = asyncio.run(_load(url, images, concurrency))
    images_after, batches_after = _batch_totals(url)
    ok = [latency for latency, status in zip(latencies, statuses) if status == 200]
    return {
        "concurrency": concurrency, "requests": len(images), "ok": len(ok),
        "throughput_rps": round(len(ok) / wall, 3),
        "p50_s": round(float(np.percentile(ok, 50)), 4) if ok else None,
        "p99_s": round(float(np.percentile(ok, 99)), 4) if ok else None,
        "mean_batch_size": round((images_after - images_before) / max(1.0, batches_after - batches_before), 3),
    }


def run(args: argparse.Namespace) -> int:
    import torch

    levels = [int(level) for level in args.concurrency.split(",")]
    load_before = os.getloadavg()[0]  # other work on the machine skews every number; record it
    images = _images(args.requests, args.size)
    with tempfile.TemporaryDirectory(prefix="s3diff-loadtest-") as scratch:
        weights = args.weights or _tiny_weights(Path(scratch))
        results = []
        for mode, max_batch in MODES.items():
            server = _Server(weights, max_batch, args.max_wait_ms, Path(scratch) / f"{mode}.log")
            try:
                server.wait_ready()
                asyncio.run(_load(server.url, images[:4], 4))  # warm the shapes and the connection pool
                for level in levels:
                    row = {"mode": mode, "max_batch": max_batch, **_measure(server.url, images, level)}
                    results.append(row)
                    print(f"{mode:>9}  c={level:<3} {row['throughput_rps']:7.2f} req/s  p50 {row['p50_s']:.3f} s  "
                          f"p99 {row['p99_s']:.3f} s  mean batch {row['mean_batch_size']:.2f}  ok {row['ok']}/{row['requests']}")
            finally:
                server.stop()
    report = {
        "benchmark": "s3diff loadtest",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available(),
                    "load_average_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}},
        "conditions": {"weights": str(args.weights or "tiny random (built for this run)"), "image_size": args.size,
                       "requests_per_level": args.requests, "max_wait_ms": args.max_wait_ms, "workers": 1},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0
