"""One PNG that shows every method side by side, with its numbers, so a result can be judged by eye.

Tiles are resized to a fixed side to keep the file small: images larger than that are downscaled
(Lanczos), smaller ones (the LR) are enlarged with nearest so their pixels stay visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAPTION = (("PSNR-Y", "psnr_y", "{:.2f}"), ("LPIPS-alex", "lpips_alex", "{:.3f}"),
           ("DISTS", "dists", "{:.3f}"), ("NIQE", "niqe", "{:.2f}"))
LINE = 16
GAP = 6


@dataclass
class Tile:
    label: str
    image: np.ndarray  # uint8 HxWx3
    metrics: dict | None = None


def _font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def _caption(tile: Tile) -> list[str]:
    if not tile.metrics:
        return [tile.label]
    parts = [f"{name} {fmt.format(tile.metrics[key])}" for name, key, fmt in CAPTION if key in tile.metrics]
    return [tile.label] + ["  ".join(parts[i:i + 2]) for i in range(0, len(parts), 2)]


def _resized(image: np.ndarray, side: int) -> Image.Image:
    picture = Image.fromarray(image)
    height, width = image.shape[:2]
    scale = side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return picture.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)


def sheet_size(rows: list[list[Tile]], tile: int = 256) -> tuple[int, int]:
    """(width, height) in pixels of the sheet `contact_sheet` draws for these rows."""
    columns = max(len(row) for row in rows)
    lines = max(len(_caption(t)) for row in rows for t in row)
    return GAP + columns * (tile + GAP), GAP + len(rows) * (tile + lines * LINE + 2 * GAP)


def contact_sheet(rows: list[list[Tile]], path: Path, tile: int = 256) -> Path:
    """Draw one row per image (its tiles left to right, each captioned below) and save a PNG."""
    if not rows or not all(rows):
        raise ValueError("contact_sheet needs at least one non-empty row")
    width, height = sheet_size(rows, tile)
    lines = max(len(_caption(t)) for row in rows for t in row)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font()
    row_height = tile + lines * LINE + 2 * GAP
    for r, row in enumerate(rows):
        top = GAP + r * row_height
        for c, item in enumerate(row):
            left = GAP + c * (tile + GAP)
            sheet.paste(_resized(item.image, tile), (left, top))
            for i, text in enumerate(_caption(item)):
                draw.text((left, top + tile + GAP // 2 + i * LINE), text, fill="black", font=font)
    sheet.save(path, optimize=True)
    return Path(path)
