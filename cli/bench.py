"""`s3diff bench`: per-stage latency of the pipeline on random weights of real layer sizes, plus
the alternatives we chose against, measured in the same run (fused vs separate CFG UNet calls,
folded vs unfolded VAE-encoder LoRA, and a reference-like path: no folding, two UNet calls, the
text encoder run on every call)."""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmark the pipeline stages (writes JSON)")
    parser.add_argument("--preset", default="sd-turbo", choices=["tiny", "sd-turbo"])
    parser.add_argument("--size", type=int, default=128, help="low-resolution side (output is 4x)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-reference", action="store_true", help="do not time the reference-like path")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: bench-results/...)")
    parser.set_defaults(handler=run)


def _timed(fn, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4)


def _text_encoder(preset: str, device, dtype):
    """A random text encoder of the preset's size: the reference re-encodes both prompts per call."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from s3diff_serve.model.config import sd_turbo_text_config, tiny_text_config

    config = sd_turbo_text_config() if preset == "sd-turbo" else tiny_text_config(49408)
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(**config)).to(device, dtype).eval()


def run(args: argparse.Namespace) -> int:
    import torch

    from s3diff_serve.model import MergedConfig, S3DiffPipeline
    from s3diff_serve.model.pipeline import pad_to_multiple
    from s3diff_serve.model.presets import build_model
    from s3diff_serve.model.tiling import DEFAULT_TILE

    pipe = S3DiffPipeline(build_model(args.preset, seed=0), MergedConfig(unet={}, vae={}, scheduler={}), args.device, args.dtype)
    model, device = pipe.model, pipe.device
    lowres = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    pipe.enhance(lowres)  # warm-up (allocator, oneDNN/cuDNN kernel choice)

    stages: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for stage, seconds in pipe.enhance(lowres).timings.items():
            stages.setdefault(stage, []).append(seconds)

    scores = pipe.estimate(lowres)
    image = pad_to_multiple(pipe.upscale(lowres.to(device)) * 2 - 1)
    alternatives: dict[str, list[float]] = {k: [] for k in ("unet_fused", "unet_separate", "encode_folded", "encode_unfolded")}
    with torch.inference_mode():
        model.set_degradation(scores.blur.to(device), scores.noise.to(device))
        latent = model.encode(image)
        timestep = torch.tensor(999, device=device)
        dtype = model.unet.dtype
        tile = max(DEFAULT_TILE, max(image.shape[-2:]) // 8)  # one tile: the same work as the unfolded call

        def separate_cfg() -> None:
            for embeds in (model.positive_embeds, model.negative_embeds):
                model.unet(latent.to(dtype), timestep, encoder_hidden_states=embeds.to(dtype))

        for _ in range(args.repeats):
            alternatives["unet_fused"].append(_timed(lambda: model.predict_noise(latent, 1.07), device))
            alternatives["unet_separate"].append(_timed(separate_cfg, device))
            alternatives["encode_unfolded"].append(_timed(lambda: model.encode(image), device))
            alternatives["encode_folded"].append(_timed(lambda: pipe._encode(image, False, None, True, tile), device))

        reference_like = []
        if not args.skip_reference:
            text_encoder = _text_encoder(args.preset, device, pipe.dtype)
            ids = torch.randint(0, 49407, (2, 77), device=device)
            for _ in range(args.repeats):
                def reference_path() -> None:
                    text_encoder(ids[:1]), text_encoder(ids[1:])
                    model.estimate(lowres.to(device))
                    z = model.encode(image)
                    separate_cfg()
                    model.decode(z)
                reference_like.append(_timed(reference_path, device))

    medians = {stage: _median(values) for stage, values in stages.items()}
    result = {
        "preset": args.preset, "lowres_side": args.size, "output_side": args.size * 4, "dtype": args.dtype,
        "device": str(device), "repeats": args.repeats, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "stages_median_s": medians,
        "alternatives_median_s": {k: _median(v) for k, v in alternatives.items()},
    }
    alt = result["alternatives_median_s"]
    result["unet_fused_speedup"] = round(alt["unet_separate"] / alt["unet_fused"], 3)
    result["encode_fold_speedup"] = round(alt["encode_unfolded"] / alt["encode_folded"], 3)
    if reference_like:
        result["reference_like_total_median_s"] = _median(reference_like)
        result["speedup_vs_reference_like"] = round(_median(reference_like) / medians["total"], 3)
    out = args.out or Path("bench-results") / f"bench-{args.preset}-{args.dtype}-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0
