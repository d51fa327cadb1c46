"""`s3diff evaluate`: every method on the same LR crops of a folder of photos (the corpus, or any
folder of images), measured against the HR.

The crop, the LR and therefore the numbers depend only on the photos, `crop`, `degradation` and
`seed`, so two runs (or two machines) compare like with like. Results go to `metrics.json` (one
row per image and method, with the image's path relative to the folder), the images to
`images/`, and a side-by-side view to `contact_sheet.png`. Files that cannot be read are listed
under `skipped` with the reason, and the rest is evaluated.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

from s3diff_serve.evaluation import DEGRADATIONS, METHODS
from s3diff_serve.evaluation.cache import MissingWeightsError

SCALE = 4
LABELS = {"bicubic": "bicubic", "realesrgan": "Real-ESRGAN", "s3diff": "S3Diff (ours)"}

Method = Callable[[np.ndarray], np.ndarray]  # uint8 HxWx3 LR -> uint8 4Hx4Wx3


def centre_crop(image: np.ndarray, crop: int) -> np.ndarray:
    """The centre `crop`x`crop` square, or the largest multiple-of-4 centre square of a smaller photo."""
    height, width = image.shape[:2]
    side = min(crop, min(height, width) // SCALE * SCALE)
    if side < SCALE:
        raise ValueError(f"image {width}x{height} is too small to crop")
    top, left = (height - side) // 2, (width - side) // 2
    return image[top:top + side, left:left + side]


LowresMaker = Callable[[np.ndarray, int, int], np.ndarray]  # (uint8 HR crop, seed, photo index) -> uint8 LR


def bicubic_lowres(highres: np.ndarray, seed: int = 0, index: int = 0) -> np.ndarray:
    """The `clean` LR: bicubic x1/4 of a uint8 HR crop (seed and index play no part)."""
    height, width = highres.shape[:2]
    return np.asarray(Image.fromarray(highres).resize((width // SCALE, height // SCALE), Image.BICUBIC))


def to_tensor(hwc: np.ndarray) -> torch.Tensor:
    """uint8 HxWx3 -> float (1,3,H,W) in [0,1]; copied, as decoded arrays are read-only."""
    return torch.from_numpy(np.array(hwc)).permute(2, 0, 1)[None].float().div(255)


def to_uint8(chw: torch.Tensor) -> np.ndarray:
    return chw.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def load_methods(methods, weights: Path | None, device: str) -> tuple[dict[str, Method], dict]:
    """Every method ready to run, loaded before any photo so missing weights fail at once.
    Also returns what identifies the S3Diff weights (for the record)."""
    runners: dict[str, Method] = {}
    weights_info = None
    for name in methods:
        if name == "bicubic":
            runners[name] = lambda lr: np.asarray(
                Image.fromarray(lr).resize((lr.shape[1] * SCALE, lr.shape[0] * SCALE), Image.BICUBIC))
        elif name == "realesrgan":
            from s3diff_serve.evaluation.realesrgan import load_realesrgan, upscale_realesrgan

            model = load_realesrgan(device=device)
            runners[name] = lambda lr, model=model: upscale_realesrgan(model, lr)
        elif name == "s3diff":
            from s3diff_serve.model import S3DiffPipeline

            if weights is not None and not Path(weights).is_dir():
                raise MissingWeightsError(f"S3Diff weights {weights} not found: pass a merged weights folder "
                                          "(`s3diff convert` writes one), or none for the built-in demo model")
            # fp32 eager wherever it runs, so numbers compare across machines (bf16 moves outputs by
            # a few 8-bit levels; docs/model.md, "Compiled fast path").
            pipe = S3DiffPipeline.from_merged(weights, device=device, dtype="fp32", compile="off")
            runners[name] = lambda lr, pipe=pipe: to_uint8(pipe.enhance(to_tensor(lr)).images[0])
            weights_info = {"source": pipe.source, "id": pipe.weights_id}
        else:
            raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    return runners, weights_info


def machine() -> dict:
    """What the timings were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def read_highres(path: Path, crop: int) -> np.ndarray:
    """The photo's centre crop (`centre_crop`), upright and RGB. Raises ValueError when the file
    cannot be read as an image or is too small to crop."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise ValueError(f"not a readable image ({type(err).__name__}: {err})") from err
    return centre_crop(pixels, crop)


def evaluate(data_dir: Path, out_dir: Path, methods=("s3diff", "bicubic", "realesrgan"), weights: Path | None = None,
             degradation: str = "clean", crop: int = 512, limit: int | None = None, split: str = "validation",
             seed: int = 0, progress: bool = True, device: str | None = None,
             make_lowres: LowresMaker = bicubic_lowres) -> dict:
    """Run and measure every method on the folder's images (`images_to_evaluate`: the corpus
    split, or every image below the folder); writes and returns the record. `make_lowres` makes
    each LR from its HR crop and `degradation` names it in the record: `s3diff evaluate` passes
    training's seeded Real-ESRGAN degradation for `realistic`
    (`s3diff_serve.training.degradations.realistic_lowres`; evaluation never imports training)."""
    from tqdm import tqdm

    from s3diff_serve.evaluation.contact_sheet import Tile, contact_sheet
    from s3diff_serve.evaluation.metrics import MetricSuite
    from s3diff_serve.evaluation.photos import images_to_evaluate

    methods = tuple(methods)
    if crop < SCALE or crop % SCALE:
        raise ValueError(f"crop must be a positive multiple of {SCALE}, got {crop}")
    if degradation not in DEGRADATIONS:
        raise ValueError(f"degradation must be one of {DEGRADATIONS}, got {degradation!r}")
    if (degradation == "clean") != (make_lowres is bicubic_lowres):
        raise ValueError(f"degradation {degradation!r} does not name make_lowres {make_lowres.__name__}")
    if not methods or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be distinct and not empty, got {methods}")
    photos = images_to_evaluate(data_dir, split)[:limit]
    if not photos:
        raise ValueError(f"no images to evaluate in {data_dir}" + (f" (split {split!r})" if
                                                                  (Path(data_dir) / "manifest.json").is_file() else ""))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    runners, weights_info = load_methods(methods, weights, device)
    suite = MetricSuite(device=device)
    for run in runners.values():  # first calls pay for lazy initialisation; keep that out of the timings
        run(np.full((16, 16, 3), 128, np.uint8))

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    records, rows, skipped = [], [], []
    for index, (relative, path) in enumerate(tqdm(photos, unit="image", disable=not progress, file=sys.stderr)):
        try:
            highres = read_highres(path, crop)
        except ValueError as err:
            skipped.append({"path": relative, "reason": str(err)})
            tqdm.write(f"skipped {relative}: {err}", file=sys.stderr)
            continue
        name_stem = str(Path(relative).with_suffix(""))
        lowres = make_lowres(highres, seed, index)
        _save(out_dir, name_stem, "hr", highres)
        _save(out_dir, name_stem, "lr", lowres)
        row = [Tile(f"{name_stem}: LR", lowres)]
        for name, run in runners.items():
            start = time.perf_counter()
            output = run(lowres)
            seconds = time.perf_counter() - start
            _save(out_dir, name_stem, name, output)
            scores = suite(output, highres, border=SCALE)
            records.append({"path": relative, "id": Path(relative).stem, "method": name, **scores,
                            "seconds": seconds})
            row.append(Tile(LABELS[name], output, scores))
        rows.append(row + [Tile("HR", highres)])
    if not records:
        raise ValueError(f"none of the {len(photos)} images in {data_dir} could be read: {skipped[0]['reason']}")

    result = {
        "conditions": {"degradation": degradation, "crop": crop, "split": split, "seed": seed, "limit": limit,
                       "methods": list(methods), "photos": len(rows), "scale": SCALE, "border": SCALE,
                       "weights": weights_info, "device": device, "dtype": "fp32", "machine": machine(),
                       "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "images": records,
        "skipped": skipped,
        "mean": mean_by_method(records),
    }
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    contact_sheet(rows, out_dir / "contact_sheet.png")
    return result


def _save(out_dir: Path, name_stem: str, kind: str, pixels: np.ndarray) -> None:
    """images/<relative path without suffix>_<kind>.png (sub-folders as in the data folder)."""
    path = out_dir / "images" / f"{name_stem}_{kind}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def mean_by_method(records: list[dict]) -> dict[str, dict[str, float]]:
    """{method: {metric: mean over images}} for every numeric field of the per-image records."""
    means: dict[str, dict[str, float]] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == method]
        keys = [k for k, v in mine[0].items() if isinstance(v, (int, float))]
        means[method] = {k: float(np.mean([r[k] for r in mine])) for k in keys}
    return means


def format_table(mean: dict[str, dict[str, float]]) -> str:
    """The mean table, one method a line, as plain aligned text."""
    metrics = list(next(iter(mean.values())))
    width = max(len(m) for m in [*mean, "method"])
    lines = ["method".ljust(width) + "".join(f"{k:>12}" for k in metrics)]
    for method, values in mean.items():
        cells = "".join(f"{_fmt(values[k]):>12}" for k in metrics)
        lines.append(method.ljust(width) + cells)
    return "\n".join(lines)


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"
