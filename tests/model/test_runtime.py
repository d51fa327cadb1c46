"""The runtime choice (model/runtime.py): device, dtype, compile plan and memory format, with the
capability probes monkeypatched so every branch runs on this CPU."""
from __future__ import annotations

import pytest
import torch

from s3diff_serve.model import InvalidInputError, S3DiffPipeline
from s3diff_serve.model import runtime
from s3diff_serve.model.config import MergedConfig
from s3diff_serve.model.presets import build_model
from s3diff_serve.model.runtime import (
    CompilePlan, compile_setting, plan_compile, resolve_runtime,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def cpu(monkeypatch):
    """Set the probes: native bf16 or not, CUDA or not, a kernel compiler or not."""
    def set_(bf16: bool = False, cuda: bool = False, compiler: bool = True) -> None:
        monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: bf16)
        monkeypatch.setattr(runtime, "has_kernel_compiler", lambda device: compiler)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.delenv(runtime.COMPILE_ENV, raising=False)
    return set_


def test_dtype_defaults_and_refusals(cpu):
    cpu(bf16=False)
    assert resolve_runtime("cpu", None) == (CPU, torch.float32)
    with pytest.raises(InvalidInputError, match="no native bf16"):
        resolve_runtime("cpu", "bf16")
    cpu(bf16=True)
    assert resolve_runtime("cpu", None) == (CPU, torch.bfloat16)  # bf16 is the default where native
    assert resolve_runtime("cpu", "fp32") == (CPU, torch.float32)
    with pytest.raises(InvalidInputError, match="fp16 is for CUDA"):
        resolve_runtime("cpu", "fp16")
    with pytest.raises(InvalidInputError, match="dtype must be one of"):
        resolve_runtime("cpu", "int8")
    assert resolve_runtime(None, None)[0].type == "cpu"
    with pytest.raises(InvalidInputError, match="CUDA is not available"):
        resolve_runtime("cuda", None)
    cpu(bf16=False, cuda=True)
    assert resolve_runtime(None, None) == (CUDA, torch.float16)
    assert resolve_runtime("cuda:1", "bf16") == (torch.device("cuda:1"), torch.bfloat16)


def test_compile_setting_reads_the_switch_and_the_environment(monkeypatch):
    monkeypatch.delenv(runtime.COMPILE_ENV, raising=False)
    assert compile_setting() == "auto"
    monkeypatch.setenv(runtime.COMPILE_ENV, "OFF")
    assert compile_setting() == "off"
    assert compile_setting("on") == "on"  # an explicit value wins over the environment
    assert compile_setting(True) == "on" and compile_setting(False) == "off"
    monkeypatch.setenv(runtime.COMPILE_ENV, "sometimes")
    with pytest.raises(InvalidInputError, match="compile must be one of auto, on, off"):
        compile_setting()


@pytest.mark.parametrize(
    "device, dtype, setting, expected",
    [
        (CPU, torch.bfloat16, "auto", CompilePlan(True, freezing=True)),  # native-bf16 CPU default
        (CPU, torch.float32, "auto", CompilePlan(False)),  # fp32-only CPU: eager unless asked
        (CPU, torch.float32, "on", CompilePlan(True, required=True, freezing=True)),
        (CPU, torch.bfloat16, "off", CompilePlan(False)),
        (CUDA, torch.float16, "auto", CompilePlan(True, cudagraphs=True)),  # fp16 + CUDA graphs
        (CUDA, torch.bfloat16, "on", CompilePlan(True, required=True, cudagraphs=True)),
        (CUDA, torch.float16, "off", CompilePlan(False)),
    ],
)
def test_compile_plan(cpu, device, dtype, setting, expected):
    cpu(bf16=True, cuda=device.type == "cuda")
    plan = plan_compile(device, dtype, setting)
    assert plan == expected
    assert plan.mode == ("reduce-overhead" if expected.cudagraphs else None)


def test_compile_without_a_kernel_compiler(cpu, monkeypatch):
    cpu(bf16=True, compiler=False)
    assert plan_compile(CPU, torch.bfloat16, "auto") == CompilePlan(False)  # auto: eager, still serving
    with pytest.raises(InvalidInputError, match="no kernel compiler"):
        plan_compile(CPU, torch.bfloat16, "on")
    monkeypatch.setenv(runtime.COMPILE_ENV, "on")
    with pytest.raises(InvalidInputError, match="no kernel compiler"):
        plan_compile(CPU, torch.float32)


def test_pipeline_applies_the_choice(cpu, monkeypatch):
    cpu(bf16=True)
    pipe = S3DiffPipeline(build_model("tiny", seed=1), MergedConfig(unet={}, vae={}, scheduler={}), "cpu", None,
                          compile="on")
    assert pipe.dtype == torch.bfloat16 and pipe.compile_plan == CompilePlan(True, required=True, freezing=True)
    assert set(pipe.model.compiled) == {"encoder_call", "unet_call", "decoder_call"}
    conv = pipe.model.vae.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert pipe.model.de_net.conv_first[0].weight.is_contiguous()  # the estimator stays NCHW
    monkeypatch.setenv(runtime.COMPILE_ENV, "off")
    fp32 = S3DiffPipeline(build_model("tiny", seed=1), MergedConfig(unet={}, vae={}, scheduler={}), "cpu", "fp32")
    assert fp32.model.compiled == {} and fp32.compile_plan == CompilePlan(False)


@pytest.mark.parametrize("device, dtype", [(CPU, torch.bfloat16), (CUDA, torch.float16)])
def test_auto_compiles_only_models_large_enough_to_pay_back(cpu, device, dtype):
    cpu(bf16=True, cuda=device.type == "cuda")
    small = plan_compile(device, dtype, "auto", parameters=runtime.COMPILE_MIN_PARAMETERS - 1)
    assert small == CompilePlan(False) and "below the 100 M" in small.reason
    assert plan_compile(device, dtype, "auto", parameters=runtime.COMPILE_MIN_PARAMETERS).enabled
    assert plan_compile(device, dtype, "on", parameters=1000).enabled  # asked for: compiled whatever the size


def test_small_models_run_eager_by_default(cpu, monkeypatch):
    """The built-in and tiny models (~5 M parameters) are served without minutes of compiling."""
    cpu(bf16=True)
    monkeypatch.delenv(runtime.COMPILE_ENV, raising=False)
    pipe = S3DiffPipeline(build_model("tiny", seed=1), MergedConfig(unet={}, vae={}, scheduler={}), "cpu", None)
    assert pipe.dtype == torch.bfloat16 and pipe.model.compiled == {}
    assert "M parameters" in pipe.compile_plan.reason


def test_compile_cache_folders(monkeypatch, tmp_path):
    monkeypatch.delenv(runtime.INDUCTOR_CACHE_ENV, raising=False)
    monkeypatch.setenv(runtime.COMPILE_CACHE_ENV, str(tmp_path / "compile"))
    assert runtime.compile_cache_dir() == tmp_path / "compile"
    assert runtime.os.environ[runtime.INDUCTOR_CACHE_ENV] == str(tmp_path / "compile" / "inductor")
    monkeypatch.setenv(runtime.INDUCTOR_CACHE_ENV, str(tmp_path / "elsewhere"))  # an explicit one is kept
    runtime.compile_cache_dir()
    assert runtime.os.environ[runtime.INDUCTOR_CACHE_ENV] == str(tmp_path / "elsewhere")
    monkeypatch.delenv(runtime.COMPILE_CACHE_ENV)
    monkeypatch.setenv("S3DIFF_CACHE", str(tmp_path / "cache"))
    assert runtime.compile_cache_dir() == tmp_path / "cache" / "compile"
