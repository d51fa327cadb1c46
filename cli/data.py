"""`s3diff data`: fetch the data sets training and evaluation read (`fetch-photos DIR`)."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="fetch training / evaluation data")
    actions = parser.add_subparsers(dest="data_command", required=True)
    fetch = actions.add_parser("fetch-photos", help="download the photo corpus (train/validation split) into DIR")
    fetch.add_argument("dir", type=Path, help="output folder: DIR/<split>/<id>.<ext> and DIR/manifest.json")
    fetch.set_defaults(handler=run_fetch_photos)


def run_fetch_photos(args: argparse.Namespace) -> int:
    from s3diff_serve.evaluation.photos import SPLITS, PhotoFetchError, fetch_photos, load_manifest

    try:
        manifest = fetch_photos(args.dir)
    except PhotoFetchError as exc:
        print(f"error: {exc}")
        return 2
    photos = load_manifest(args.dir)
    for split in SPLITS:
        chosen = [p for p in photos if p.split == split]
        megapixels = sum(p.width * p.height for p in chosen) / 1e6
        print(f"{split}: {len(chosen)} photos, {megapixels:.1f} MP")
    print(f"wrote {manifest}")
    return 0
