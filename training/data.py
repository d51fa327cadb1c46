"""HR training crops from image folders (LSDIR-style) plus an optional face folder (FFHQ) that
supplies a fixed share of the samples. Degradation happens later, batched, on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from .config import DataConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


class UnreadableImageError(RuntimeError):
    """A training image could not be decoded; names the file so it can be removed."""


def list_images(folders: list[Path]) -> list[Path]:
    """Every image file under the folders (recursively), in a stable order."""
    paths: list[Path] = []
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: image folder not found")
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise FileNotFoundError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
        paths += found
    return paths


def read_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableImageError(f"{path}: cannot read this training image ({type(exc).__name__}: {exc})") from None


class CropDataset(Dataset):
    """Random `crop_size` crops (optionally flipped) as float (3,H,W) tensors in [0,1].

    Images smaller than the crop are first enlarged (bicubic) so the short side fits, rather than
    padded: padding would teach the model mirrored borders. With `resident`, each photo is decoded
    once (after an optional Lanczos `prescale`) and kept in memory: decoding a multi-megapixel
    JPEG for every small crop would cost more than a small model's training step.
    """

    def __init__(self, paths: list[Path], crop_size: int, flip: bool = True, resident: bool = False,
                 prescale: float = 1.0):
        self.paths, self.crop_size, self.flip = paths, crop_size, flip
        self.resident, self.prescale = resident, prescale
        self._decoded: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, index: int) -> Image.Image:
        if index in self._decoded:
            return self._decoded[index]
        image = read_rgb(self.paths[index])
        if self.prescale != 1.0:
            size = (max(1, round(image.width * self.prescale)), max(1, round(image.height * self.prescale)))
            image = image.resize(size, Image.LANCZOS)
        short = min(image.size)
        if short < self.crop_size:
            ratio = self.crop_size / short
            image = image.resize((max(self.crop_size, round(image.width * ratio)), max(self.crop_size, round(image.height * ratio))), Image.BICUBIC)
        if self.resident:
            self._decoded[index] = image
        return image

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self._image(index)
        # torch's RNG: DataLoader seeds it per worker from the loader's generator.
        left = int(torch.randint(image.width - self.crop_size + 1, (1,)))
        top = int(torch.randint(image.height - self.crop_size + 1, (1,)))
        crop = np.asarray(image.crop((left, top, left + self.crop_size, top + self.crop_size)), dtype=np.float32) / 255
        tensor = torch.from_numpy(crop).permute(2, 0, 1).contiguous()
        if self.flip and bool(torch.rand(1) < 0.5):
            tensor = tensor.flip(-1)
        return tensor


def mixed_weights(general: int, faces: int, face_share: float) -> torch.Tensor:
    """Per-image sampling weights so faces make up `face_share` of the draws in expectation."""
    if faces == 0:
        return torch.ones(general, dtype=torch.float64)
    return torch.cat([
        torch.full((general,), (1 - face_share) / general, dtype=torch.float64),
        torch.full((faces,), face_share / faces, dtype=torch.float64),
    ])


def build_dataloader(config: DataConfig, batch_size: int, seed: int) -> DataLoader:
    general = list_images(config.hr_dirs)
    faces = list_images(config.face_dirs) if config.face_dirs and config.face_share > 0 else []
    dataset = CropDataset(general + faces, config.crop_size, config.flip, config.resident, config.prescale)
    generator = torch.Generator().manual_seed(seed)
    sampler = WeightedRandomSampler(
        mixed_weights(len(general), len(faces), config.face_share),
        num_samples=max(len(dataset), batch_size), replacement=True, generator=generator,
    )
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=config.num_workers,
        drop_last=True, generator=generator, persistent_workers=config.num_workers > 0,
    )
