"""The persistent compile cache (model/compiled.py, ArtifactCache): its key, and a corrupt or
truncated cache file that is logged, removed and compiled again, never a crash. Compiles one
small convolution block (seconds), not the model."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

from s3diff_serve.model.compiled import ArtifactCache, CompiledCall, cache_key_parts, compiling, warm_up_persistent
from s3diff_serve.model.runtime import CompilePlan

CPU = torch.device("cpu")
SHAPE = (1, 8, 16, 16)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    return tmp_path / "compile"


def _block() -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1))
    return block.eval().requires_grad_(False).to(memory_format=torch.channels_last)


def _warm_up(cache: ArtifactCache, block: nn.Module) -> tuple[dict, CompiledCall]:
    torch._dynamo.reset()  # a fresh process as far as Dynamo is concerned
    call = CompiledCall("decoder_call", block, CompilePlan(True, freezing=True))
    x = torch.rand(SHAPE).to(memory_format=torch.channels_last)

    def run() -> None:
        with compiling([call]), torch.inference_mode():
            call(x)

    report = warm_up_persistent([call], cache, [SHAPE], run)
    return report, call


def test_the_key_changes_with_everything_that_decides_the_code():
    plan = CompilePlan(True, freezing=True)
    base = cache_key_parts(CPU, torch.bfloat16, plan, [SHAPE], "w1")
    assert base["torch"] == torch.__version__ and "avx512_bf16" in base["cpu"]
    variants = [cache_key_parts(CPU, torch.float32, plan, [SHAPE], "w1"),
                cache_key_parts(CPU, torch.bfloat16, plan, [(2, 8, 16, 16)], "w1"),
                cache_key_parts(CPU, torch.bfloat16, plan, [SHAPE], "w2"),
                {**base, "torch": "0.0"}, {**base, "cpu": {**base["cpu"], "amx_bf16": not base["cpu"]["amx_bf16"]}}]
    keys = {ArtifactCache("/x", parts).key for parts in [base, *variants]}
    assert len(keys) == 1 + len(variants)
    assert ArtifactCache("/x", dict(base)).key == ArtifactCache("/x", base).key


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_cache_is_logged_dropped_and_compiled_again(caches, caplog, damage):
    caplog.set_level(logging.INFO, logger="s3diff_serve.model.compiled")
    block, x = _block(), torch.rand(SHAPE).to(memory_format=torch.channels_last)
    cache = ArtifactCache(caches, cache_key_parts(CPU, torch.float32, CompilePlan(True, freezing=True), [SHAPE],
                                                  f"corrupt-{damage}"))
    report, _ = _warm_up(cache, block)
    assert report["cache"] == "cold" and cache.path.stat().st_size > 0
    assert "no compile cache for them yet" in caplog.text and "takes minutes" in caplog.text
    assert json.loads(cache.meta_path.read_text())["cold_s"] == report["seconds"]
    good = cache.path.read_bytes()
    cache.path.write_bytes(b"\x00not a cache" * 10 if damage == "garbage" else good[: len(good) // 2])

    report, call = _warm_up(cache, block)
    assert report["cache"] == "cold"
    assert "is unreadable" in caplog.text and "compiling from scratch" in caplog.text
    assert call.enabled and len(call.compile_seconds) == 1  # compiled, not fallen back to eager
    with torch.inference_mode():
        torch.testing.assert_close(call(x), block(x))
    assert cache.path.stat().st_size > 0  # rewritten by the new compile

    caplog.clear()
    report, call = _warm_up(cache, block)  # and that file loads
    assert report["cache"] == "warm" and call.enabled
    assert f"compiling decoder_call for 1 shape(s) [{SHAPE}] from the compile cache {cache.path}" in caplog.text
    assert "that compiling from scratch took" in caplog.text and "(warm cache)" in caplog.text  # how long
    assert set(json.loads(cache.meta_path.read_text())) >= {"cold_s", "warm_s", "key"}
