"""`s3diff upscale`: files, folders and globs in; upscaled images out, keeping alpha, 16-bit depth,
grayscale, EXIF orientation and ICC profile. A bad file is reported and skipped; the exit code
is 1 when any file failed (2 when nothing could start: no inputs, unloadable weights)."""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

from s3diff_serve.cli.arguments import positive_int

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
FORMAT_SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
OUTPUT_SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def _tile_size(text: str) -> int:
    value = int(text)
    if value < 32 or value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 and at least 32, got {value}")
    return value


def _scale(text: str) -> float:
    value = float(text)
    if not 1.0 <= value <= 8.0:
        raise argparse.ArgumentTypeError(f"must be in [1, 8], got {value}")
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("upscale", help="upscale image files, folders or globs")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="output file (one input) or folder (created when missing)")
    parser.add_argument("--weights", type=Path, metavar="MERGED_DIR",
                        help="merged weights folder (default: the built-in demo model)")
    parser.add_argument("--noise", type=_unit_interval, help="noise score in [0, 1] (default: estimated)")
    parser.add_argument("--blur", type=_unit_interval, help="blur score in [0, 1] (default: estimated)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default 1.07; 1 = no negative prompt)")
    parser.add_argument("--color-fix", default="wavelet", choices=["wavelet", "adain", "none"])
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: fp16 on cuda, fp32 on cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--scale", type=_scale, help="output scale in [1, 8] (default 4, the model's own)")
    size.add_argument("--longest-side", type=positive_int, help="output longest side in pixels")
    parser.add_argument("--width", type=positive_int, help="output width (alone: keeps the aspect ratio)")
    parser.add_argument("--height", type=positive_int, help="output height (alone: keeps the aspect ratio)")
    parser.add_argument("--format", choices=["png", "jpeg", "webp"],
                        help="default: from the output file name, else JPEG for JPEG input and PNG otherwise")
    parser.add_argument("--quality", type=int, choices=range(1, 101), metavar="1..100", help="JPEG/WebP quality (95)")
    parser.add_argument("--tile-size", type=_tile_size, help="latent tile side (default: from free GPU memory, 96 on cpu)")
    parser.set_defaults(handler=run)


def expand_inputs(patterns: list[str]) -> tuple[list[Path], list[str]]:
    """Files named, images inside named folders (not recursive), and glob matches, in order and
    without duplicates; plus the patterns that matched nothing."""
    found: list[Path] = []
    unmatched: list[str] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not matches:
            unmatched.append(pattern)
        found += [match for match in matches if match not in found]
    return found, unmatched


def output_plan(inputs: list[Path], output: Path, requested_format: str | None) -> dict[Path, tuple[Path, str | None]]:
    """Each input's output path without its suffix (None: `output` itself is the file) and the
    format forced for it (None: the per-image default). One input and an output named like an
    image: that file, in the format its suffix names. Otherwise a folder of `<stem>.<ext>`."""
    if len(inputs) == 1 and not output.is_dir() and output.suffix.lower() in OUTPUT_SUFFIX_FORMATS:
        return {inputs[0]: (None, requested_format or OUTPUT_SUFFIX_FORMATS[output.suffix.lower()])}
    taken: set[str] = set()
    plan = {}
    for source in inputs:
        stem, counter = source.stem, 1
        while stem.lower() in taken:  # a.png and a.jpg must not overwrite each other
            counter += 1
            stem = f"{source.stem}_{counter}"
        taken.add(stem.lower())
        plan[source] = (output / stem, requested_format)
    return plan


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from s3diff_serve.model import S3DiffPipeline
    from s3diff_serve.model.errors import S3DiffError

    if (args.width or args.height) and (args.scale or args.longest_side):
        print("error: give only one of --scale, --width/--height, --longest-side", file=sys.stderr)
        return 2
    inputs, unmatched = expand_inputs(args.inputs)
    for pattern in unmatched:
        print(f"error: {pattern}: no image file found", file=sys.stderr)
    if not inputs:
        return 2
    try:
        pipe = S3DiffPipeline.from_merged(args.weights, device=args.device, dtype=args.dtype)
    except (S3DiffError, OSError) as err:
        print(f"error: cannot load weights from {args.weights or 'the built-in demo model'}: {err}", file=sys.stderr)
        return 2

    failures = len(unmatched)
    with tqdm(total=len(inputs), unit="image", disable=None, file=sys.stderr) as images_bar:
        for source, (stem_path, forced_format) in output_plan(inputs, args.output, args.format).items():
            try:
                written = upscale_file(pipe, source, stem_path, forced_format, args)
                tqdm.write(f"{source} -> {written}", file=sys.stderr)
            except (S3DiffError, OSError) as err:
                failures += 1
                tqdm.write(f"error: {source}: {err}", file=sys.stderr)
            images_bar.update(1)
    return 1 if failures else 0


def upscale_file(pipe, source: Path, stem_path: Path | None, forced_format: str | None,
                 args: argparse.Namespace) -> Path:
    """Decode, upscale x4, resample to the requested size, encode like the source; returns the path written."""
    from tqdm import tqdm

    from s3diff_serve.model.image_io import decode_image, encode_like, output_format_for
    from s3diff_serve.model.output_size import resample, resolve_output_size

    decoded = decode_image(source)
    size = resolve_output_size(decoded.size, scale=args.scale, width=args.width, height=args.height,
                               longest_side=args.longest_side)
    fmt = output_format_for(decoded.source_format, forced_format)
    target = args.output if stem_path is None else stem_path.with_name(stem_path.name + FORMAT_SUFFIXES[fmt])
    with tqdm(unit="tile", leave=False, disable=None, file=sys.stderr, position=1) as tiles_bar:
        def on_progress(done: int, total: int) -> None:
            tiles_bar.total = total
            tiles_bar.n = done
            tiles_bar.refresh()
        result = pipe.enhance(decoded.rgb[None], noise=args.noise, blur=args.blur, guidance_scale=args.guidance,
                              color_fix=args.color_fix, tile_size=args.tile_size, progress=on_progress)
    encoded = encode_like(resample(result.images[0], size), decoded, format=fmt, quality=args.quality)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(encoded)
    return target
