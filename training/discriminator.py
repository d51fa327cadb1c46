"""Vision-aided discriminator (Kumari et al. 2022) as S3Diff uses it: a frozen DINO ViT-B/16 with
trainable heads on three feature levels and the "multilevel sigmoid" loss (BCE summed over levels,
real label 0.8).

The backbone is transformers' `ViTModel` (weights from a local folder, e.g. facebook/dino-vitb16)
instead of a torch.hub download. Levels, following the vision-aided-gan recipe: the patch tokens
after blocks 4 and 8 and the CLS token after block 11, each through the final LayerNorm (DINO's
`get_intermediate_layers`); input resized to the ViT resolution with area interpolation and
normalised. The small conv/linear heads are ours (spectral-normalised, trained from scratch).
"""
from __future__ import annotations

from pathlib import Path

import kornia
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from transformers import ViTConfig, ViTModel

from .config import DiscriminatorConfig
from s3diff_serve.evaluation.cache import MissingWeightsError

DINO_MEAN = (0.48145466, 0.4578275, 0.40821073)  # as vision-aided-gan normalises DINO inputs
DINO_STD = (0.229, 0.224, 0.225)
DINO_SOURCE = "huggingface-cli download facebook/dino-vitb16 --local-dir <folder>"


def load_backbone(config: DiscriminatorConfig) -> ViTModel:
    if config.random_vit is not None:
        return ViTModel(ViTConfig(**config.random_vit), add_pooling_layer=False)
    path = Path(config.dino_path)
    if not (path / "config.json").is_file():
        raise MissingWeightsError(f"{path}: no DINO ViT folder (config.json missing); get it with `{DINO_SOURCE}`")
    return ViTModel.from_pretrained(path, add_pooling_layer=False)


class TokenMapHead(nn.Module):
    """Patch-token map (B,C,h,w) -> (B,h/4,w/4) logits: blur, strided 3x3 conv, LeakyReLU, blur,
    strided 1x1 conv (anti-aliased downsampling as in vision-aided-gan)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(
            kornia.filters.BlurPool2D(kernel_size=3, stride=1),
            spectral_norm(nn.Conv2d(channels, hidden, kernel_size=3, stride=2, padding=1)),
            nn.LeakyReLU(0.2),
            kornia.filters.BlurPool2D(kernel_size=3, stride=1),
            spectral_norm(nn.Conv2d(hidden, 1, kernel_size=1, stride=2)),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.layers(tokens).squeeze(1)


class ClassTokenHead(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(
            spectral_norm(nn.Linear(channels, hidden)), nn.LeakyReLU(0.2), spectral_norm(nn.Linear(hidden, 1)),
        )

    def forward(self, cls_token: torch.Tensor) -> torch.Tensor:
        return self.layers(cls_token)


class DinoDiscriminator(nn.Module):
    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        self.backbone = load_backbone(config).requires_grad_(False).eval()
        vit = self.backbone.config
        depth = vit.num_hidden_layers
        if any(not 1 <= layer <= depth for layer in config.feature_layers):
            raise ValueError(f"discriminator.feature_layers {config.feature_layers} must lie in 1..{depth} (ViT depth)")
        self.image_size, self.patch_size = vit.image_size, vit.patch_size
        self.heads = nn.ModuleList([
            TokenMapHead(vit.hidden_size, config.head_channels),
            TokenMapHead(vit.hidden_size, config.head_channels),
            ClassTokenHead(vit.hidden_size, config.head_channels),
        ])
        self.register_buffer("mean", torch.tensor(DINO_MEAN)[None, :, None, None])
        self.register_buffer("std", torch.tensor(DINO_STD)[None, :, None, None])
        self.augment = kornia.augmentation.AugmentationSequential(
            kornia.augmentation.ColorJiggle(brightness=0.5, contrast=0.5, saturation=1.0, p=1.0),
            kornia.augmentation.RandomAffine(degrees=0, translate=(0.125, 0.125), p=1.0),
            kornia.augmentation.RandomErasing(scale=(0.02, 0.25), ratio=(1.0, 1.0), p=1.0),
        ) if config.diffaug else None

    def train(self, mode: bool = True) -> "DinoDiscriminator":
        super().train(mode)
        self.backbone.eval()  # frozen backbone: no dropout
        return self

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1,1] -> [token map, token map, CLS token] at the configured layers."""
        images = (images.float() + 1) / 2
        if self.augment is not None and self.training:
            images = self.augment(images)  # DiffAugment-style: colour, translation, cutout per sample
        images = F.interpolate(images, size=(self.image_size, self.image_size), mode="area")
        images = (images - self.mean) / self.std
        hidden = self.backbone(pixel_values=images, output_hidden_states=True).hidden_states
        norm = self.backbone.layernorm
        grid = self.image_size // self.patch_size
        first, second, last = (norm(hidden[i]) for i in self.config.feature_layers)
        as_map = lambda tokens: tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, grid, grid)  # noqa: E731
        return [as_map(first), as_map(second), last[:, 0]]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-level logits: (B,h,w), (B,h,w), (B,1)."""
        return [head(feature) for head, feature in zip(self.heads, self.features(images))]

    def loss(self, logits: list[torch.Tensor], real: bool) -> torch.Tensor:
        """Multilevel sigmoid loss per sample (B,): BCE against `real_label` (real/generator) or 0
        (fake), averaged over each level's positions and summed over levels."""
        label = self.config.real_label if real else 0.0
        total = 0
        for level in logits:
            bce = F.binary_cross_entropy_with_logits(level.float(), torch.full_like(level.float(), label), reduction="none")
            total = total + bce.flatten(1).mean(dim=1)
        return total
