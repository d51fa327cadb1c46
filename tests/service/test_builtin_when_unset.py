"""S3DIFF_WEIGHTS unset or set empty (as an image or a compose file may leave it) means the
built-in demo model, in the settings and in `s3diff serve` itself, not the current folder."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from s3diff_serve.model.builtin import BUILTIN_NAME
from s3diff_serve.service.settings import ServiceSettings
from tests.service.conftest import _LAUNCHER, REPO_ROOT, free_port


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_weights_variable_is_the_builtin_model(monkeypatch, value):
    monkeypatch.setenv("S3DIFF_WEIGHTS", value)
    assert ServiceSettings().weights is None


def test_serve_with_an_empty_weights_variable_serves_the_builtin_model(tmp_path):
    port = free_port()
    env = {**os.environ, "S3DIFF_WEIGHTS": "", "S3DIFF_CPU_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen([sys.executable, "-c", _LAUNCHER, "serve", "--port", str(port), "--device", "cpu"],
                               cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        model = None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    model = httpx.get(f"http://127.0.0.1:{port}/v1/model", timeout=5).json()
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert model is not None, (tmp_path / "serve.log").read_text()
        assert model["weights"] == BUILTIN_NAME
    finally:
        process.terminate()
        process.wait(60)
        log.close()
