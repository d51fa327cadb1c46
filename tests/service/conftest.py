"""Real servers for the service tests: `s3diff serve` (cli/serve.py) in a subprocess on a free
127.0.0.1 port with the tiny merged weights, driven over HTTP with httpx."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "test-key-0123456789"
# Runs cli/serve.py's own parser and handler, without the other subcommands' modules.
_LAUNCHER = ("import argparse, sys; from s3diff_serve.cli import serve; parser = argparse.ArgumentParser(); "
             "serve.register(parser.add_subparsers()); args = parser.parse_args(sys.argv[1:]); "
             "sys.exit(args.handler(args))")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen
    log_path: Path
    api_key: str | None

    def client(self, timeout: float = 60, **options) -> httpx.Client:
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout, **options)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_server(merged_dir: Path, log_dir: Path, *, api_key: str | None = None, extra_args: tuple[str, ...] = (),
                 **settings: object) -> RunningServer:
    """Start and wait (bounded) until /readyz says ready; `settings` become S3DIFF_* variables."""
    port = free_port()
    # One torch thread: as fast as two for the tiny model, and immune to OpenMP oversubscription
    # when other processes share the cores (two threads then ran ~100x slower here).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT), "S3DIFF_CPU_THREADS": "1"}
    env.update({f"S3DIFF_{name.upper()}": str(value) for name, value in settings.items()})
    if api_key:
        env["S3DIFF_API_KEYS"] = f"other-key,{api_key}"
    log_path = log_dir / f"server-{port}.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, "serve", "--weights", str(merged_dir), "--host", "127.0.0.1",
             "--port", str(port), "--device", "cpu", *extra_args],
            cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path, api_key)
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=server.url, timeout=2) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
            try:
                if client.get("/readyz").status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready within 120 s:\n{server.log()}")


@pytest.fixture(scope="session")
def server(tiny_merged_dir, tmp_path_factory):
    """The shared server: API keys on, a 1 MB body limit, and a 150 ms batch window so that
    concurrent requests reliably meet in one batch."""
    running = start_server(tiny_merged_dir, tmp_path_factory.mktemp("server-logs"), api_key=API_KEY,
                           max_body_bytes=1_000_000, max_wait_ms=150, max_batch=4)
    yield running
    running.stop()


@pytest.fixture()
def client(server):
    with server.client() as http:
        yield http
