"""`s3diff convert`: released files (SD-Turbo folder, s3diff.pkl, de_net.pth) -> merged folder."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="merge the released S3Diff weights into one safetensors folder")
    parser.add_argument("--sd-turbo", required=True, help="SD-Turbo folder (or a HF id with --download)")
    parser.add_argument("--s3diff", required=True, help="s3diff.pkl (or owner/repo[:file] with --download)")
    parser.add_argument("--de-net", required=True, help="de_net.pth (or an https URL with --download)")
    parser.add_argument("--out", required=True, type=Path, help="merged output folder")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--download", action="store_true", help="fetch ids/URLs that are not local paths")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from s3diff_serve.model.checkpoints import load_release, save_merged
    from s3diff_serve.model.errors import S3DiffError

    try:
        if args.download:
            from s3diff_serve.model.hub import fetch_file, fetch_sd_turbo

            sd_turbo = fetch_sd_turbo(args.sd_turbo)
            s3diff = fetch_file(args.s3diff, "s3diff.pkl", args.out / ".download")
            de_net = fetch_file(args.de_net, "de_net.pth", args.out / ".download")
        else:
            sd_turbo, s3diff, de_net = Path(args.sd_turbo), Path(args.s3diff), Path(args.de_net)
        model = load_release(sd_turbo, s3diff, de_net)
        config = save_merged(model, args.out, dtype=args.dtype)
    except S3DiffError as exc:
        print(f"error: {exc}")
        return 2
    print(f"wrote {args.out} (weights id {config.weights_id[:16]}, {args.dtype})")
    return 0
