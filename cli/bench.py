"""`s3diff bench`: per-stage latency of the pipeline on random weights of real layer sizes, in one
run: the reference-like path (fp32 eager, one image at a time, the text encoder run per call, two
UNet calls, unfolded LoRA), ours eager and compiled in fp32, and in bf16/fp16 where the device
runs them natively; plus the alternatives we chose against (fused vs separate CFG UNet calls,
folded vs unfolded VAE-encoder LoRA) and a bare decoder.

Rows that share weights are timed interleaved (one repeat of each in turn), so load drift and
warm-up order on a shared machine hit every row alike rather than whichever ran first.

Compile time is reported cold (an empty compile cache, in this process) and warm (a new process
that loads the cache the cold warm-up wrote: what a restarted service pays), with the RSS after
warm-up of each block.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmark the pipeline stages, eager vs compiled (writes JSON)")
    parser.add_argument("--preset", default="sd-turbo", choices=["tiny", "sd-turbo"])
    parser.add_argument("--size", type=int, default=128, help="low-resolution side (output is 4x)")
    parser.add_argument("--batch", type=int, default=1, help="images per pipeline call")
    parser.add_argument("--dtypes", default="auto",
                        help="comma-separated fp32,bf16,fp16; auto: fp32 plus bf16 where the CPU runs it "
                             "natively (fp32,fp16,bf16 on CUDA)")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="off: eager rows only; otherwise compiled rows too. The reported `total` is the "
                             "configuration this setting gives by default")
    parser.add_argument("--compiled-dtypes", default=None,
                        help="comma-separated: the dtypes that get compiled rows (default: all of --dtypes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-reference", action="store_true", help="do not time the reference-like path")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: bench-results/...)")
    parser.add_argument("--no-warm-compile", action="store_true",
                        help="skip the second process that times a warm-cache compile")
    parser.set_defaults(handler=run)


def cpu_info() -> dict:
    """The CPU model and the SIMD/matrix flags that decide the fast path (Linux /proc/cpuinfo)."""
    import torch

    from s3diff_serve.model.runtime import cpu_flags

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
                break
    except OSError:
        pass
    return {"model": model, "flags": cpu_flags(),
            "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _text_encoder(preset: str, device, dtype):
    """A random text encoder of the preset's size: the reference re-encodes both prompts per call."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from s3diff_serve.model.config import sd_turbo_text_config, tiny_text_config

    config = sd_turbo_text_config() if preset == "sd-turbo" else tiny_text_config(49408)
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(**config)).to(device, dtype).eval()


class _ReferenceStages:
    """Steps 4-7 of the recipe (model/one_step.py) as the reference inference script runs them:
    the encoder's LoRA unfolded, both prompts through the text encoder on every call, and two
    UNet calls (positive, negative) instead of one fused call. Each stage is timed by `lap`."""

    def __init__(self, model, text_encoder, ids, lap):
        self.model, self.text_encoder, self.ids, self.lap = model, text_encoder, ids, lap

    def encode(self, image, modulation):
        latent = self.model.encode(image, modulation)
        self.lap("encode")
        return latent

    def denoise(self, latent, modulation, guidance):
        positive, negative = self.text_encoder(self.ids[:1])[0], self.text_encoder(self.ids[1:])[0]
        self.lap("text_encoder")
        eps_pos, eps_neg = (self.model.predict_noise(latent, modulation, 1.0, states) for states in (positive, negative))
        clean = self.model.clean_sample(latent, eps_neg + guidance * (eps_pos - eps_neg))
        self.lap("unet")
        return clean

    def decode(self, latent):
        decoded = self.model.decode(latent)
        self.lap("decode")
        return decoded


def reference_like(pipe, text_encoder, ids, lowres) -> dict[str, float]:
    """The reference inference script's work, per stage, one image at a time: the estimator, then
    the one-step recipe with `_ReferenceStages` (the weights' pre-resize, guidance and colour fix);
    on `pipe`'s weights with its network calls eager."""
    import torch

    from s3diff_serve.model.degradation_estimator import BLUR_INDEX, NOISE_INDEX
    from s3diff_serve.model.one_step import one_step

    model, device, stages, config = pipe.model, pipe.device, {}, pipe.config
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        _sync(device)
        now = time.perf_counter()
        stages[stage] = stages.get(stage, 0.0) + now - clock[0]
        clock[0] = now

    start = clock[0]
    reference = _ReferenceStages(model, text_encoder, ids, lap)
    with torch.inference_mode(), model.eager():
        for image in lowres.to(device).split(1):
            scores = model.estimate(image)
            lap("estimate")
            one_step(model, image, scores[:, BLUR_INDEX], scores[:, NOISE_INDEX], reference,
                     pre_resize=config.pre_resize, guidance=config.guidance_scale, color_fix=config.color_fix).cpu()
            lap("color_fix")
    stages["total"] = time.perf_counter() - start
    return stages


def _alternatives(pipe, lowres, repeats: int) -> dict[str, list[float]]:
    """Fused vs separate CFG UNet calls, folded vs unfolded encoder LoRA, and the decoder alone on
    a random latent (what a bare decoder costs, against the decode stage of a whole run)."""
    import torch

    from s3diff_serve.model.one_step import pad_to_multiple

    model, device, guidance = pipe.model, pipe.device, pipe.config.guidance_scale
    scores = pipe.estimate(lowres)
    image = pad_to_multiple(pipe.upscale(lowres.to(device)) * 2 - 1)
    found: dict[str, list[float]] = {k: [] for k in ("unet_fused", "unet_separate", "encode_folded", "encode_unfolded",
                                                     "decode_bare")}
    with torch.inference_mode(), model.eager():
        modulation = model.degradation_modulation(blur=scores.blur.to(device), noise=scores.noise.to(device))
        latent = model.encode(image, modulation.vae)
        random_latent = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0)).to(device)

        def separate_cfg() -> None:
            for embeds in (model.positive_embeds, model.negative_embeds):
                model.predict_noise(latent, modulation.unet, 1.0, embeds.expand(latent.shape[0], -1, -1))

        for _ in range(repeats):
            found["unet_fused"].append(_timed(lambda: model.predict_noise(latent, modulation.unet, guidance), device))
            found["unet_separate"].append(_timed(separate_cfg, device))
            found["encode_unfolded"].append(_timed(lambda: model.encode(image, modulation.vae), device))
            found["encode_folded"].append(_timed(lambda: model.encode(image, modulation.vae, fold=True), device))
            found["decode_bare"].append(_timed(lambda: model.decode(random_latent), device))
    return found


def _dtypes(requested: str, device) -> list[str]:
    import torch

    from s3diff_serve.model.runtime import cpu_has_fast_bf16

    if requested != "auto":
        return [name.strip() for name in requested.split(",") if name.strip()]
    if device.type == "cuda":
        return ["fp32", "fp16", "bf16"]
    return ["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"]


def _peak_rss_reset() -> bool:
    from s3diff_serve.cli.bench_tiling import _reset_peak_rss

    return _reset_peak_rss()


def _rss(field: str) -> float | None:
    from s3diff_serve.cli.bench_tiling import _rss_mib

    try:
        return _rss_mib(field)
    except (OSError, RuntimeError):
        return None


def bench_dtype(args, dtype: str, lowres, with_reference: bool, with_compiled: bool) -> dict:
    """Every row of one dtype on one set of weights: reference-like (fp32 only), eager, compiled."""
    import torch

    from s3diff_serve.model import MergedConfig, S3DiffPipeline
    from s3diff_serve.model.presets import build_model

    config = MergedConfig(unet={}, vae={}, scheduler={})
    pipe = S3DiffPipeline(build_model(args.preset, seed=0), config, args.device, dtype,
                          compile="on" if with_compiled else "off")
    device = pipe.device
    peak_reset = _peak_rss_reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    block: dict = {"rss_after_build_mib": _rss("VmRSS")}
    compile_report: dict[str, float | dict] = {}
    runners = {}
    if with_reference:
        text_encoder = _text_encoder(args.preset, device, pipe.dtype)
        ids = torch.randint(0, 49407, (2, 77), generator=torch.Generator().manual_seed(0)).to(device)
        runners[f"reference-{dtype}-eager"] = lambda: reference_like(pipe, text_encoder, ids, lowres)

    def eager() -> dict[str, float]:
        with pipe.model.eager():
            return pipe.enhance(lowres).timings

    runners[f"{dtype}-eager"] = eager
    if with_compiled:
        report = pipe.warmup(sizes=[(args.size, args.size)], batch_sizes=[args.batch])
        compile_report = {"warmup_s": report["seconds"], "compile_s": report["compile_seconds"],
                          "compile_cache": report.get("compile_cache")}
        block["rss_after_compile_mib"] = _rss("VmRSS")
        runners[f"{dtype}-compiled"] = lambda: pipe.enhance(lowres).timings
    for runner in runners.values():  # warm-up: allocator, oneDNN/cuDNN kernel choice
        runner()
    block["rss_after_warmup_mib"] = _rss("VmRSS")  # every row has run once: weights + graphs + activations
    timings: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, runner in runners.items():
            timings[name].append(runner())
    rows = {name: {"stages_median_s": {stage: _median([run[stage] for run in runs]) for stage in runs[0]}}
            for name, runs in timings.items()}
    rows.get(f"{dtype}-compiled", {}).update(compile_report)
    block["alternatives_median_s"] = {k: _median(v) for k, v in _alternatives(pipe, lowres, args.repeats).items()}
    block["peak_rss_mib"] = _rss("VmHWM") if peak_reset else None
    if device.type == "cuda":
        block["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    block["rows"] = rows
    return block


WARM_COMPILE = """
import json, sys, time
start = time.perf_counter()
from s3diff_serve.model import MergedConfig, S3DiffPipeline
from s3diff_serve.model.presets import build_model
from s3diff_serve.cli.bench_tiling import _rss_mib
preset, device, dtype, size, batch = sys.argv[1:6]
pipe = S3DiffPipeline(build_model(preset, seed=0), MergedConfig(unet={}, vae={}, scheduler={}), device, dtype,
                      compile="on")
built = time.perf_counter()
report = pipe.warmup(sizes=[(int(size), int(size))], batch_sizes=[int(batch)])
print(json.dumps({"warmup_s": report["seconds"], "compile_s": report["compile_seconds"],
                  "compile_cache": report["compile_cache"], "build_s": round(built - start, 2),
                  "start_to_ready_s": round(time.perf_counter() - start, 2), "rss_after_warmup_mib": _rss_mib("VmRSS")}))
"""


def warm_compile(args, dtype: str) -> dict:
    """A new process builds the same weights and warms up from the compile cache this run wrote:
    the compile cost of a restart (its start_to_ready_s includes importing and building)."""
    done = subprocess.run([sys.executable, "-c", WARM_COMPILE, args.preset, args.device, dtype, str(args.size),
                           str(args.batch)], capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    """With compiled rows, the compile cache is a fresh temporary folder, so `compile_s` is cold."""
    from s3diff_serve.model.runtime import COMPILE_CACHE_ENV, INDUCTOR_CACHE_ENV

    before = {name: os.environ.get(name) for name in (COMPILE_CACHE_ENV, INDUCTOR_CACHE_ENV)}
    with tempfile.TemporaryDirectory(prefix="s3diff-bench-compile-") as cache:
        os.environ[COMPILE_CACHE_ENV] = cache
        os.environ[INDUCTOR_CACHE_ENV] = str(Path(cache) / "inductor")
        try:
            return _run(args)
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _run(args: argparse.Namespace) -> int:
    import gc

    import torch

    from s3diff_serve.model.runtime import has_kernel_compiler, plan_compile, resolve_runtime

    device, default_dtype = resolve_runtime(args.device, None)
    dtype_names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    dtypes = _dtypes(args.dtypes, device)
    with_compiled = args.compile != "off" and has_kernel_compiler(device)
    default = {"dtype": dtype_names[default_dtype],
               "compiled": args.compile != "off" and plan_compile(device, default_dtype, args.compile).enabled}
    lowres = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    result = {
        "preset": args.preset, "lowres_side": args.size, "output_side": args.size * 4, "batch": args.batch,
        "device": str(device), "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "cpu": cpu_info(), "dtypes": dtypes, "default": default,
        "kernel_compiler": has_kernel_compiler(device), "rows": {}, "blocks": {},
    }
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    compiled_dtypes = dtypes if args.compiled_dtypes is None else _dtypes(args.compiled_dtypes, device)
    for dtype in sorted(dtypes, key=lambda name: name != "fp32"):  # fp32 first: it carries the reference
        block = bench_dtype(args, dtype, lowres, with_reference=dtype == "fp32" and not args.skip_reference,
                            with_compiled=with_compiled and dtype in compiled_dtypes)
        gc.collect()  # the block's pipeline goes before the warm process builds its own
        compiled_row = block["rows"].get(f"{dtype}-compiled")
        if compiled_row and not args.no_warm_compile:
            warm = warm_compile(args, dtype)
            compiled_row["compile_cold_s"] = compiled_row["warmup_s"]
            compiled_row["compile_warm_s"] = warm.get("warmup_s")
            block["warm_restart"] = warm
        result["rows"].update(block.pop("rows"))
        result["blocks"][dtype] = block
        gc.collect()
    rows = result["rows"]
    reference = rows.get("reference-fp32-eager", {}).get("stages_median_s", {}).get("total")
    for name, row in rows.items():
        if reference and not name.startswith("reference"):
            row["speedup_vs_reference"] = round(reference / row["stages_median_s"]["total"], 3)
    for dtype in dtypes:
        eager, compiled = rows.get(f"{dtype}-eager"), rows.get(f"{dtype}-compiled")
        if eager and compiled:
            compiled["speedup_vs_eager"] = round(eager["stages_median_s"]["total"] / compiled["stages_median_s"]["total"], 3)
    default_row = f"{default['dtype']}-{'compiled' if default['compiled'] else 'eager'}"
    if default_row in rows:  # the per-image total is the default configuration's
        result["default"]["row"] = default_row
        result["stages_median_s"] = rows[default_row]["stages_median_s"]
        if reference:
            result["reference_like_total_median_s"] = reference
            result["speedup_vs_reference_like"] = rows[default_row]["speedup_vs_reference"]
    alternatives = result["blocks"][dtypes[0] if "fp32" not in dtypes else "fp32"]["alternatives_median_s"]
    result["unet_fused_speedup"] = round(alternatives["unet_separate"] / alternatives["unet_fused"], 3)
    result["encode_fold_speedup"] = round(alternatives["encode_unfolded"] / alternatives["encode_folded"], 3)
    result["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out = args.out or Path("bench-results") / f"bench-{args.preset}-{args.device.replace(':', '')}-{args.size}-b{args.batch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0
