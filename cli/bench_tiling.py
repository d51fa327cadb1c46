"""`s3diff bench-tiling`: time and peak memory of whole upscales as images grow, tiling on, with
random weights of real layer sizes; in the same run, the untiled path where it fits and the
degradation estimator's score drift for the bounded-cost views (centre crop vs resize).

Each output size runs in its own process, so one size's peak memory does not hide the next's.
Peak RSS is the kernel's high-water mark (VmHWM), reset after the model is built, so it measures
inference, not weight construction.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench-tiling", help="benchmark time/peak memory vs image size with tiling (JSON)")
    parser.add_argument("--preset", default="sd-turbo", choices=["tiny", "sd-turbo"])
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="output sides (input = side/4)")
    parser.add_argument("--tile-size", type=int, default=None, help="latent tile (default: the pipeline's choice)")
    parser.add_argument("--untiled-up-to", type=int, default=1024, help="also time untiled runs up to this output side")
    parser.add_argument("--warmup", action="store_true",
                        help="warm up on the timed shapes first (matters for small models; full-size ones are compute-bound)")
    parser.add_argument("--skip-drift", action="store_true", help="do not measure the estimator's score drift")
    parser.add_argument("--out", type=Path, default=Path("bench-results/bench-tiling.json"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size in this process
    parser.add_argument("--untiled", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)


def _photo(side: int):
    """scikit-image's astronaut (a real photo) resized to side x side, as a (1,3,h,w) tensor."""
    import numpy as np
    import torch
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.astronaut()).resize((side, side), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255).permute(2, 0, 1)[None]


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM, the peak RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_one(args: argparse.Namespace) -> dict:
    """One output size in this process: build the model, warm up, reset the peak, upscale once."""
    import torch

    from s3diff_serve.model import MergedConfig, S3DiffPipeline
    from s3diff_serve.model.presets import build_model

    pipe = S3DiffPipeline(build_model(args.preset, seed=0), MergedConfig(unet={}, vae={}, scheduler={}),
                          args.device, args.dtype)
    lowres = _photo(args.one // 4)
    tile = 10_000 if args.untiled else args.tile_size
    if args.warmup:
        # On the shapes the timed run uses (oneDNN/cuDNN pick kernels per shape): the same image
        # when untiled; one full tile when tiled, since every tile has the tile's shape.
        warmup_side = args.one // 4 if args.untiled else min(args.one, 8 * (tile or 96)) // 4
        pipe.enhance(_photo(warmup_side), noise=0.5, blur=0.5, tile_size=tile)
    else:
        pipe.warmup()
    peak_reset = _reset_peak_rss()
    rss_before = _rss_mib("VmRSS")
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    tiles = []
    start = time.perf_counter()
    result = pipe.enhance(lowres, tile_size=tile, progress=lambda done, total: tiles.append(total))
    seconds = time.perf_counter() - start
    record = {
        "output_side": args.one, "input_side": args.one // 4, "tiled": not args.untiled,
        "tile_size": tile if tile != 10_000 else None, "work_units": tiles[-1] if tiles else None,
        "seconds": round(seconds, 2), "stage_seconds": {k: round(v, 2) for k, v in result.timings.items()},
        "rss_before_mib": rss_before, "peak_rss_mib": _rss_mib("VmHWM") if peak_reset else None,
        "noise": round(result.noise.item(), 4), "blur": round(result.blur.item(), 4),
    }
    if pipe.device.type == "cuda":
        record["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated(pipe.device) / 2**20, 1)
    torch.save(result.images, Path(args.out).with_suffix(f".{args.one}{'-untiled' if args.untiled else ''}.pt"))
    return record


def estimator_drift(preset: str) -> dict:
    """How much the bounded estimator views move degradation scores, on scikit-image's photos
    degraded by a Gaussian blur (sigma 1.5) and Gaussian noise (sigma 10/255). The bound is set to
    256 px so it bites on these 300-1000 px photos (the pipeline's bound is 512 px).

    Two measurers: the S3Diff estimator with the preset's random weights (no real weights can be
    fetched here), and scikit-image's classical measures of the same two degradations (wavelet
    noise sigma, blur effect), which respond to them the way a trained estimator should.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F
    from skimage import data, filters, measure, restoration

    from s3diff_serve.model.presets import build_model
    from s3diff_serve.model.tiling import estimator_view

    estimator = build_model(preset, seed=0).de_net.eval()
    rng = np.random.default_rng(0)
    rows = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"):
        photo = filters.gaussian(getattr(data, name)().astype(np.float32) / 255, sigma=1.5, channel_axis=-1)
        photo = np.clip(photo + rng.normal(0, 10 / 255, photo.shape), 0, 1).astype(np.float32)
        full = torch.from_numpy(photo).permute(2, 0, 1)[None]
        height, width = full.shape[-2:]
        factor = 256 / max(height, width)
        views = {
            "full": full,
            "crop": estimator_view(full, max_side=256),
            "resize": F.interpolate(full, size=(round(height * factor), round(width * factor)), mode="bicubic",
                                    antialias=True, align_corners=False).clamp(0, 1),
        }
        row = {"photo": name, "size": [height, width]}
        for view_name, view in views.items():
            pixels = view[0].permute(1, 2, 0).numpy()
            with torch.inference_mode():
                blur_score, noise_score = estimator(view)[0].tolist()
            row[view_name] = {
                "de_net_blur": round(blur_score, 4), "de_net_noise": round(noise_score, 4),
                "noise_sigma_255": round(float(restoration.estimate_sigma(pixels, channel_axis=-1, average_sigmas=True)) * 255, 3),
                "blur_effect": round(float(measure.blur_effect(pixels, channel_axis=-1)), 4),
            }
        rows.append(row)

    def mean_drift(view_name: str) -> dict:
        return {key: round(float(np.mean([abs(r[view_name][key] - r["full"][key]) for r in rows])), 4)
                for key in rows[0]["full"]}
    return {"degradation": "gaussian blur sigma 1.5 + gaussian noise sigma 10/255", "bound_px": 256,
            "de_net_weights": f"random ({preset} preset)", "photos": rows,
            "mean_abs_drift": {"crop": mean_drift("crop"), "resize": mean_drift("resize")}}


def run(args: argparse.Namespace) -> int:
    if args.one is not None:
        print(json.dumps(measure_one(args)))
        return 0
    import torch

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"preset": args.preset, "dtype": args.dtype, "device": args.device, "machine": platform.machine(),
              "processor": platform.processor(), "cpu_threads": torch.get_num_threads(), "runs": []}
    plan = [(side, False) for side in args.sizes] + [(side, True) for side in args.sizes if side <= args.untiled_up_to]
    for side, untiled in plan:
        command = [sys.executable, "-m", "s3diff_serve.cli.main", "bench-tiling", "--one", str(side), "--preset", args.preset,
                   "--dtype", args.dtype, "--device", args.device, "--out", str(args.out)]
        command += ["--untiled"] if untiled else []
        command += ["--warmup"] if args.warmup else []
        command += ["--tile-size", str(args.tile_size)] if args.tile_size else []
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            print(completed.stderr[-2000:], file=sys.stderr)
            return completed.returncode
        record = json.loads(completed.stdout.strip().splitlines()[-1])
        report["runs"].append(record)
        print(json.dumps(record), flush=True)
        args.out.write_text(json.dumps(report, indent=2))
    report["tiled_vs_untiled"] = _compare_saved_outputs(args.out, [s for s, u in plan if u])
    if not args.skip_drift:
        report["estimator_drift"] = estimator_drift(args.preset)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


def _compare_saved_outputs(out: Path, sides: list[int]) -> dict:
    import torch

    comparison = {}
    for side in sides:
        tiled = torch.load(out.with_suffix(f".{side}.pt"))
        untiled = torch.load(out.with_suffix(f".{side}-untiled.pt"))
        difference = (tiled - untiled).abs()
        comparison[str(side)] = {"max_abs": round(difference.max().item(), 4), "mean_abs": round(difference.mean().item(), 5)}
    for saved in out.parent.glob(out.stem + ".*.pt"):
        saved.unlink()
    return comparison
