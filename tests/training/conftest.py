"""Fixtures of the training tests: real photos (scikit-image's bundled ones) as HR tensors and
folders, and the tiny training config with random LPIPS/DINO weights."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

TINY_CONFIG = Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.yaml"


def photo_tensor(name: str, size: int, top: int = 0, left: int = 0) -> torch.Tensor:
    image = getattr(skimage_data, name)()
    crop = image[top:top + size, left:left + size].astype(np.float32) / 255
    return torch.from_numpy(crop).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="session")
def hr_batch() -> torch.Tensor:
    """Two 64x64 HR crops of real photos, (2,3,64,64) in [0,1]."""
    return torch.stack([photo_tensor("astronaut", 64, 120, 200), photo_tensor("coffee", 64, 100, 150)])


@pytest.fixture(scope="session")
def photo_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(general folder with three photos, face folder with one face crop)."""
    root = tmp_path_factory.mktemp("photos")
    general, faces = root / "general", root / "faces"
    general.mkdir()
    faces.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage_data, name)()).resize((128, 96)).save(general / f"{name}.png")
    Image.fromarray(skimage_data.astronaut()[20:180, 150:310]).resize((80, 80)).save(faces / "face.png")
    return general, faces
