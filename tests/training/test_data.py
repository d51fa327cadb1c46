"""Image folders, crops, flips, face share, and the error for unreadable files."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from s3diff_serve.training.config import DataConfig
from s3diff_serve.training.data import CropDataset, UnreadableImageError, build_dataloader, list_images, mixed_weights


def test_crops_are_exact_pixels_of_the_image(photo_dirs):
    general, _ = photo_dirs
    path = general / "coffee.png"
    torch.manual_seed(0)
    crop = CropDataset([path], crop_size=64, flip=False)[0]
    assert crop.shape == (3, 64, 64) and crop.dtype == torch.float32
    pixels = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255).permute(2, 0, 1)
    windows = pixels.unfold(1, 64, 1).unfold(2, 64, 1)  # every 64x64 window
    matches = (windows - crop[:, None, None]).abs().amax(dim=(0, 3, 4)) == 0
    assert matches.sum() == 1  # the crop is one window of the image, unchanged


def test_flip_mirrors_the_crop(photo_dirs):
    general, _ = photo_dirs
    dataset = CropDataset([general / "chelsea.png"], crop_size=96, flip=True)  # 96 = full height: only x varies
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        seen.add(dataset[0].sum(dim=(0, 1)).argmax().item())
    assert len(seen) >= 2  # different crops/flips across draws


def test_small_images_are_enlarged_not_padded(tmp_path):
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "small.png")
    crop = CropDataset([tmp_path / "small.png"], crop_size=64)[0]
    assert crop.shape == (3, 64, 64)
    assert torch.allclose(crop[0], torch.full((64, 64), 200 / 255), atol=1 / 255)


def test_face_share_weights_and_sampler(photo_dirs):
    weights = mixed_weights(general=3, faces=1, face_share=0.2)
    assert float(weights[3] / weights.sum()) == pytest.approx(0.2)
    general, faces = photo_dirs
    loader = build_dataloader(DataConfig(hr_dirs=[general], face_dirs=[faces], face_share=0.5, crop_size=64, num_workers=0), 1, seed=0)
    assert len(loader.dataset) == 4
    draws = torch.tensor(list(loader.sampler))
    assert 0 < (draws == 3).sum() < len(draws)


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(UnreadableImageError, match="broken.jpg"):
        CropDataset([bad], crop_size=64)[0]


def test_missing_or_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list_images([tmp_path / "nope"])
    with pytest.raises(FileNotFoundError, match="no images"):
        list_images([tmp_path])
