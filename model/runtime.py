"""Where and how the model runs: device, dtype, memory format and whether the encoder, UNet and
decoder are compiled (docs/model.md, "Compiled fast path"). One place decides, so the CLI, the
service and `s3diff bench` make the same choice; `S3DIFF_COMPILE` is read here and nowhere else.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import InvalidInputError

COMPILE_ENV = "S3DIFF_COMPILE"
COMPILE_SETTINGS = ("auto", "on", "off")
# The dtypes the model runs and stores in, by the names flags and configs use.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMPILE_CACHE_ENV = "S3DIFF_COMPILE_CACHE"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
# `auto` compiles only models whose UNet + VAE hold at least this many parameters. Compiling costs
# about the same minutes for any size (the graphs have the same structure; tiny and full-size bf16
# both took 3-4 min on 2 cores), while the gain scales with the work: full size saves ~1.7 s per
# 512^2 image in bf16 here, the ~5 M-parameter built-in model a few ms (docs/model.md).
COMPILE_MIN_PARAMETERS = 100_000_000
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX-512-BF16 or AMX). Without it (e.g. AVX2-only
    CPUs) a bf16 conv was measured at ~300x the time of the fp32 one, so bf16 is refused rather
    than silently slow; with it, bf16 is the CPU default."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_flags() -> dict[str, bool]:
    """The SIMD/matrix flags that decide the fast path and the kernels inductor generates (Linux
    /proc/cpuinfo; all False where it cannot be read)."""
    found: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                found = set(value.split())
                break
    except OSError:
        pass
    return {flag: flag in found for flag in CPU_FLAGS}


def has_kernel_compiler(device: torch.device) -> bool:
    """Whether inductor can build kernels here: a C++ compiler on the CPU; Triton and a C
    compiler (for Triton's launcher) on CUDA. The CUDA base image has neither by default."""
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None and bool(shutil.which("cc") or shutil.which("gcc"))
    return bool(os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++"))


def resolve_runtime(device: str | torch.device | None, dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """Defaults: CUDA when present; fp16 on CUDA; on the CPU bf16 where it runs natively, else
    fp32. fp16 is refused on the CPU (slow kernels, no benefit over bf16 there), and so is bf16
    on CPUs without native bf16."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("device 'cuda' requested but CUDA is not available")
    if dtype is None:
        if device.type == "cuda":
            dtype = torch.float16
        else:
            dtype = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InvalidInputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise InvalidInputError(f"unsupported dtype {dtype}")
    if device.type == "cpu" and dtype == torch.float16:
        raise InvalidInputError("fp16 is for CUDA; use bf16 or fp32 on the CPU")
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        raise InvalidInputError(
            "this CPU has no native bf16 (AVX-512-BF16/AMX): bf16 convolutions would run a fallback "
            "that is far slower than fp32; use fp32"
        )
    return device, dtype


def compile_setting(value: str | bool | None = None) -> str:
    """`value` (True/False mean on/off), else $S3DIFF_COMPILE, else "auto"."""
    if isinstance(value, bool):
        return "on" if value else "off"
    setting = (value if value is not None else os.environ.get(COMPILE_ENV) or "auto").strip().lower()
    if setting not in COMPILE_SETTINGS:
        raise InvalidInputError(f"compile must be one of {', '.join(COMPILE_SETTINGS)}, got {setting!r}")
    return setting


@dataclass(frozen=True)
class CompilePlan:
    """How the three network calls are compiled (model/compiled.py), or not (`enabled` False).

    `required`: compiling was asked for explicitly ("on"), so a failure is an error; under
    "auto" a failure falls back to eager with a warning. `reason`: why, for the console.
    """

    enabled: bool
    required: bool = False
    cudagraphs: bool = False  # CUDA: mode="reduce-overhead", one captured graph per shape
    freezing: bool = False  # CPU: weights become constants (constant folding, conv binary folding)
    reason: str = field(default="", compare=False)

    @property
    def mode(self) -> str | None:
        return "reduce-overhead" if self.cudagraphs else None


def plan_compile(device: torch.device, dtype: torch.dtype, setting: str | bool | None = None,
                 parameters: int | None = None) -> CompilePlan:
    """`auto` compiles where it pays back: models of at least COMPILE_MIN_PARAMETERS (UNet + VAE;
    `parameters` None counts as large), on CUDA (CUDA graphs remove the launch overhead of ~1000
    small kernels per UNet call) and on CPUs in bf16 (only CPUs with native bf16 run it; there
    eager bf16 pays a weight reorder per conv and unfused elementwise ops: SD-Turbo's decoder on a
    2-core AMX Xeon went 6.6 s -> 2.6 s compiled). Smaller models stay eager: compiling takes
    minutes whatever the size, and saves milliseconds per image on them. On fp32-only CPUs it stays
    off: the gain is smaller (the same decoder in fp32: 14.8 -> 11.7 s) for minutes of compiling;
    "on" compiles there too. Without a kernel compiler `auto` stays eager."""
    setting = compile_setting(setting)
    if setting == "off":
        return CompilePlan(False, reason="compile=off")
    if setting == "auto":
        if parameters is not None and parameters < COMPILE_MIN_PARAMETERS:
            return CompilePlan(False, reason=f"auto: {parameters / 1e6:.1f} M parameters, below the "
                                             f"{COMPILE_MIN_PARAMETERS / 1e6:.0f} M that pay back a compile")
        if device.type != "cuda" and dtype != torch.bfloat16:
            return CompilePlan(False, reason=f"auto: {str(dtype).removeprefix('torch.')} on the CPU gains too "
                                             "little from compiling")
    if not has_kernel_compiler(device):
        if setting == "on":
            raise InvalidInputError(f"compile=on but inductor has no kernel compiler for {device.type} here")
        return CompilePlan(False, reason=f"auto: no kernel compiler for {device.type}")
    cuda = device.type == "cuda"
    return CompilePlan(True, required=setting == "on", cudagraphs=cuda, freezing=not cuda,
                       reason=f"compile={setting}")


def compile_cache_dir() -> Path:
    """Where compiled graphs persist across restarts: $S3DIFF_COMPILE_CACHE, else `compile/`
    in the project's cache folder. Inductor's own cache goes in its `inductor/` unless
    $TORCHINDUCTOR_CACHE_DIR says otherwise (set here before anything compiles, since inductor
    reads it on first use)."""
    from .cache_root import cache_dir

    folder = Path(os.environ.get(COMPILE_CACHE_ENV) or cache_dir() / "compile").expanduser()
    os.environ.setdefault(INDUCTOR_CACHE_ENV, str(folder / "inductor"))
    return folder


def use_channels_last(device: torch.device, dtype: torch.dtype) -> bool:
    """channels_last (NHWC) for the UNet's and VAE's convolutions: it paid everywhere measured.
    CPU, tiny model at 768^2 output, fp32 eager: 5.63 -> 4.69 s per image (encode 1.33x, decode
    1.36x; outputs move by < 0.001); a 128-channel resnet block at 256^2: fp32 356 -> 289 ms, at
    128^2 bf16 31.7 -> 27.1 ms; on the SD-Turbo decoder in bf16 6.6 -> 4.0 s. On CUDA it is what
    cuDNN's tensor-core convolutions want. Other device types keep NCHW."""
    return device.type in ("cpu", "cuda")
