"""`s3diff evaluate`: measure S3Diff and the baselines on a folder of photos (the corpus `s3diff data
fetch-photos` writes, or any folder of images) and print the mean of each metric per method
(metrics.json, images, contact sheet). Exit code 2 when nothing could start: no images, missing
weights, bad options."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from s3diff_serve.cli.arguments import positive_int
from s3diff_serve.evaluation import DEGRADATIONS, METHODS


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in METHODS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"give distinct names from {','.join(METHODS)}, got {text!r}")
    return names


def _crop(text: str) -> int:
    value = int(text)
    if value < 4 or value % 4:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 4, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="measure S3Diff and baselines on a folder of photos")
    parser.add_argument("--data", required=True, type=Path, metavar="DIR",
                        help="a folder of images (PNG/JPEG/WebP/TIFF, searched recursively), or the corpus "
                             "`s3diff data fetch-photos DIR` writes (its manifest selects --split)")
    parser.add_argument("--weights", type=Path, metavar="MERGED_DIR",
                        help="merged S3Diff weights (default: the built-in demo model, as `s3diff upscale`)")
    parser.add_argument("--methods", type=_methods, default=METHODS,
                        help=f"comma-separated (default {','.join(METHODS)})")
    parser.add_argument("--degradation", choices=DEGRADATIONS, default="clean",
                        help="clean: bicubic x1/4; realistic: seeded Real-ESRGAN degradation (default clean)")
    parser.add_argument("--crop", type=_crop, default=512, help="HR centre crop side, multiple of 4 (default 512)")
    parser.add_argument("--limit", type=positive_int, help="only the first N photos (by id)")
    parser.add_argument("--split", choices=["train", "validation"], default="validation",
                        help="the corpus split (only for a folder with the corpus manifest; default validation)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the realistic degradation (default 0)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR",
                        help="output folder: metrics.json, contact_sheet.png, images/")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from s3diff_serve.evaluation.cache import MissingWeightsError
    from s3diff_serve.evaluation.evaluate import bicubic_lowres, evaluate, format_table
    from s3diff_serve.model.errors import S3DiffError

    if not args.data.is_dir():
        print(f"error: {args.data} is not a folder; give a folder of images, or write the photo corpus with "
              f"`s3diff data fetch-photos {args.data}`", file=sys.stderr)
        return 2
    weights = args.weights
    try:
        if args.degradation == "realistic":
            from s3diff_serve.training.degradations import realistic_lowres as make_lowres
        else:
            make_lowres = bicubic_lowres
        result = evaluate(args.data, args.out, methods=args.methods, weights=weights, degradation=args.degradation,
                          crop=args.crop, limit=args.limit, split=args.split, seed=args.seed, device=args.device,
                          make_lowres=make_lowres)
    except MissingWeightsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except S3DiffError as err:
        print(f"error: cannot load weights from {weights or 'the built-in demo model'}: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result["mean"]))
    print(f"wrote {args.out / 'metrics.json'} and {args.out / 'contact_sheet.png'}")
    return 0
