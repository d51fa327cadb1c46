"""`s3diff upscale`: files, folders and globs in; upscaled images out, keeping alpha, 16-bit depth,
grayscale, EXIF orientation and ICC profile. A bad file is reported and skipped; the exit code
is 1 when any file failed (2 when nothing could start: no inputs, unloadable weights)."""
from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

from s3diff_serve.model.config import validate_tile_size
from s3diff_serve.model.options import COLOR_FIXES, OUTPUT_FORMATS, UpscaleOptions

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"}
FORMAT_SUFFIXES = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
OUTPUT_SUFFIX_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def _tile_size(text: str) -> int:
    try:
        return validate_tile_size(int(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _described(name: str) -> str:
    return UpscaleOptions.model_fields[name].description or name


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("upscale", help="upscale image files, folders or globs")
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="output file (one input) or folder (created when missing)")
    parser.add_argument("--weights", type=Path, metavar="MERGED_DIR",
                        help="merged weights folder (default: the built-in demo model)")
    # The upscale knobs: names, ranges and help text come from the request contract
    # (UpscaleOptions); values are checked by it in `run`.
    parser.add_argument("--noise", type=float, help=_described("noise"))
    parser.add_argument("--blur", type=float, help=_described("blur"))
    parser.add_argument("--guidance", type=float, dest="guidance_scale", help=_described("guidance_scale"))
    parser.add_argument("--color-fix", default="wavelet", choices=COLOR_FIXES, help=_described("color_fix"))
    parser.add_argument("--scale", type=float, help=_described("scale"))
    parser.add_argument("--longest-side", type=int, help=_described("longest_side"))
    parser.add_argument("--width", type=int, help=_described("width"))
    parser.add_argument("--height", type=int, help=_described("height"))
    parser.add_argument("--format", choices=OUTPUT_FORMATS,
                        help="default: from the output file name, else JPEG for JPEG input and PNG otherwise")
    parser.add_argument("--quality", type=int, help=_described("quality"))
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                        help="default: fp16 on cuda; on the cpu bf16 where native (AVX-512-BF16/AMX), else fp32")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="off",
                        help="torch.compile for the tile shape before the first image (default off: compiling "
                             "takes minutes, which a one-off run rarely wins back; `s3diff serve` compiles by default)")
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

    try:
        options = UpscaleOptions.parse(**{name: getattr(args, name) for name in UpscaleOptions.model_fields
                                          if name != "format"})
    except S3DiffError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    inputs, unmatched = expand_inputs(args.inputs)
    for pattern in unmatched:
        print(f"error: {pattern}: no image file found", file=sys.stderr)
    if not inputs:
        return 2
    try:
        pipe = S3DiffPipeline.from_merged(args.weights, device=args.device, dtype=args.dtype, compile=args.compile)
        if pipe.compile_plan.enabled:
            pipe.warmup()
    except (S3DiffError, OSError) as err:
        print(f"error: cannot load weights from {args.weights or 'the built-in demo model'}: {err}", file=sys.stderr)
        return 2

    failures = len(unmatched)
    with tqdm(total=len(inputs), unit="image", disable=None, file=sys.stderr) as images_bar:
        for source, (stem_path, forced_format) in output_plan(inputs, args.output, args.format).items():
            try:
                target = args.output if stem_path is None else stem_path  # None: `output` is the file
                written = upscale_file(pipe, source, target, stem_path is None, forced_format, options, args.tile_size)
                tqdm.write(f"{source} -> {written}", file=sys.stderr)
            except (S3DiffError, OSError) as err:
                failures += 1
                tqdm.write(f"error: {source}: {err}", file=sys.stderr)
            images_bar.update(1)
    return 1 if failures else 0


def upscale_file(pipe, source: Path, target: Path, exact: bool, forced_format: str | None, options,
                 tile_size: int | None) -> Path:
    """Decode, upscale (to the options' size), encode like the source into `target` (`exact`: that
    file; else that stem plus the format's suffix); returns the path written."""
    from tqdm import tqdm

    from s3diff_serve.model.image_io import decode_image, encode_like, output_format_for

    decoded = decode_image(source)
    fmt = output_format_for(decoded.source_format, forced_format)
    if not exact:
        target = target.with_name(target.name + FORMAT_SUFFIXES[fmt])
    with tqdm(unit="tile", leave=False, disable=None, file=sys.stderr, position=1) as tiles_bar:
        def on_progress(done: int, total: int) -> None:
            tiles_bar.total = total
            tiles_bar.n = done
            tiles_bar.refresh()
        result = pipe.enhance(decoded.rgb[None], options, tile_size=tile_size, progress=on_progress)
    if decoded.frames > 1:
        tqdm.write(f"note: {source} has {decoded.frames} frames; only the first is upscaled", file=sys.stderr)
    encoded = encode_like(result.images[0], decoded, format=fmt, quality=options.output_quality)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(encoded)
    return target
