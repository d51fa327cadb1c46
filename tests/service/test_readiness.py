"""Readiness before and after loading, in-process (the loader is injected, so no weights)."""
from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from s3diff_serve.model import CheckpointError
from s3diff_serve.service.app import create_app
from s3diff_serve.service.settings import ServiceSettings
from tests.service.images import png_bytes


def test_loading_failure_keeps_the_process_up_and_says_why():
    def broken_loader(settings, dtype):
        raise CheckpointError("unet.safetensors: missing key conv_in.weight")

    with TestClient(create_app(ServiceSettings(), loader=broken_loader)) as client:
        assert client.get("/healthz").status_code == 200
        for _ in range(100):  # the load runs in the background; wait (bounded) for its failure
            body = client.get("/readyz").json()
            if "failed" in body["error"]["message"]:
                break
            threading.Event().wait(0.02)
        assert body["error"]["code"] == "not_ready" and "missing key conv_in.weight" in body["error"]["message"]
        response = client.post("/v1/upscale", content=png_bytes(8, 8))
        assert response.status_code == 503 and response.headers["retry-after"] == "5"


def test_not_ready_while_loading():
    release = threading.Event()

    def slow_loader(settings, dtype):
        release.wait(10)
        raise CheckpointError("stopped by the test")

    with TestClient(create_app(ServiceSettings(), loader=slow_loader)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        readiness = client.get("/readyz")
        assert readiness.status_code == 503 and readiness.json()["error"]["message"] == "the model is loading"
        assert client.get("/v1/model").json()["error"]["code"] == "not_ready"
        release.set()


def test_the_compile_setting_reaches_the_pipeline(monkeypatch, tiny_merged_dir):
    import pytest
    from pydantic import ValidationError

    from s3diff_serve.service.app import load_pipeline

    monkeypatch.setenv("S3DIFF_COMPILE", "on")
    assert ServiceSettings().compile == "on"  # the same variable the model package reads
    with pytest.raises(ValidationError, match="compile"):
        ServiceSettings(compile="sometimes")
    pipeline = load_pipeline(ServiceSettings(weights=tiny_merged_dir, device="cpu", compile="off"), "fp32")
    assert not pipeline.compile_plan.enabled and not pipeline.model.compiled
