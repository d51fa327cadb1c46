"""`s3diff` entry point. Each subcommand lives in its own module exposing `register(subparsers)`;
heavy imports happen inside the handlers so `s3diff --help` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMAND_MODULES = [
    "s3diff_serve.cli.convert",
    "s3diff_serve.cli.upscale",
    "s3diff_serve.cli.bench_tiling",
    "s3diff_serve.cli.bench",
    "s3diff_serve.cli.serve",
    "s3diff_serve.cli.loadtest",
    "s3diff_serve.cli.train",
    "s3diff_serve.cli.weights",
    "s3diff_serve.cli.data",
    "s3diff_serve.cli.evaluate",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s3diff", description="S3Diff one-step super-resolution")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
