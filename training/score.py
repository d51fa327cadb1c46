"""Quick score of merged weights for an ablation: PSNR-Y and LPIPS-alex on the validation split,
`clean` and `realistic` inputs made exactly as `s3diff evaluate` makes them, with bicubic
alongside. The full `s3diff evaluate` (DISTS, NIQE, SSIM, contact sheets) costs minutes per image
on a busy 2-core CPU; these two metrics cost a second.

    python3 -m s3diff_serve.training.score --data datasets/photos --crop 256 WEIGHTS_DIR [WEIGHTS_DIR ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from s3diff_serve.evaluation.evaluate import SCALE, centre_crop, make_lowres
from s3diff_serve.evaluation.metrics import LPIPS, psnr
from s3diff_serve.evaluation.photos import load_manifest
from s3diff_serve.model import S3DiffPipeline


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 255


def inputs(data: Path, crop: int, degradation: str, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(HR crop, LR) uint8 pairs of the validation photos, sorted by id, as s3diff evaluate has them."""
    photos = sorted((p for p in load_manifest(data) if p.split == "validation"), key=lambda p: p.id)
    pairs = []
    for index, photo in enumerate(photos):
        with Image.open(photo.path) as image:
            highres = centre_crop(np.asarray(ImageOps.exif_transpose(image).convert("RGB")), crop)
        pairs.append((highres, make_lowres(highres, degradation, seed, index)))
    return pairs


@torch.no_grad()
def score(upscale, pairs, lpips: LPIPS) -> dict[str, float]:
    """Mean PSNR-Y (border 4, as s3diff evaluate) and LPIPS-alex of `upscale` (LR uint8 -> SR uint8)."""
    values = {"psnr_y": [], "lpips_alex": []}
    for highres, lowres in pairs:
        output = upscale(lowres)
        values["psnr_y"].append(psnr(output, highres, y_channel=True, border=SCALE))
        values["lpips_alex"].append(float(lpips(_tensor(output) * 2 - 1, _tensor(highres) * 2 - 1)))
    return {name: float(np.mean(v)) for name, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--crop", type=int, default=256)
    args = parser.parse_args()
    lpips = LPIPS("alex")
    bicubic = lambda lr: np.asarray(Image.fromarray(lr).resize((lr.shape[1] * SCALE, lr.shape[0] * SCALE),  # noqa: E731
                                                               Image.BICUBIC))
    for degradation in ("clean", "realistic"):
        pairs = inputs(args.data, args.crop, degradation)
        print(json.dumps({"weights": "bicubic", "degradation": degradation, **score(bicubic, pairs, lpips)}), flush=True)
        for weights in args.weights:
            pipe = S3DiffPipeline.from_merged(weights, device="cpu", dtype="fp32", compile="off")
            upscale = lambda lr: (pipe.enhance(_tensor(lr)).images[0].permute(1, 2, 0).numpy() * 255  # noqa: E731
                                  ).round().clip(0, 255).astype(np.uint8)
            print(json.dumps({"weights": str(weights), "degradation": degradation, **score(upscale, pairs, lpips)}),
                  flush=True)


if __name__ == "__main__":
    main()
