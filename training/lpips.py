"""LPIPS (Zhang et al. 2018) with a VGG16 backbone, built without torchvision.

torchvision does not import beside our pinned CPU torch, and the `lpips` package needs it, so
the VGG16 feature stack and the LPIPS linear heads are written here. Their state-dict layouts
match the published files so users point at those directly:
- VGG16: torchvision's `vgg16-397923af.pth` (keys `features.N.*`; `classifier.*` ignored) or a
  bare `vgg16().features` state dict (keys `N.*`);
- heads: LPIPS' `weights/v0.1/vgg.pth` (keys `linK.model.1.weight`).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
HEADS_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"
# torchvision's VGG16 configuration "D": channels per conv, "M" = 2x2 max-pool.
VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the end index of each slice of `features`.
TAP_ENDS = (4, 9, 16, 23, 30)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS' ScalingLayer: inputs in [-1,1] are shifted/scaled to ImageNet statistics.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file the loss needs is absent; the message says where to get it."""


def vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features`, same indices, so its state dict loads unchanged."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            channels = item
    return nn.Sequential(*layers)


def _load(path: Path, what: str, url: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MissingWeightsError(f"{path}: {what} weights not found; download them from {url}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict for the {what} weights")
    return state


def load_vgg16_features(features: nn.Sequential, path: Path) -> None:
    state = _load(path, "VGG16", VGG16_URL)
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    features.load_state_dict(state, strict=True)


class LPIPS(nn.Module):
    """Perceptual distance per sample, (B,) — inputs in [-1,1]. Backbone and heads are frozen;
    gradients flow to the inputs only."""

    def __init__(self, vgg16_path: Path | None = None, heads_path: Path | None = None, random_weights: bool = False):
        super().__init__()
        self.features = vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in TAP_CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])
        if random_weights:
            for head, channels in zip(self.heads, TAP_CHANNELS):
                nn.init.constant_(head.weight, 1.0 / channels)  # "LPIPS without learned heads", scaled
        else:
            if vgg16_path is None or heads_path is None:
                raise MissingWeightsError(f"LPIPS needs vgg16_path ({VGG16_URL}) and lpips_heads_path ({HEADS_URL})")
            load_vgg16_features(self.features, Path(vgg16_path))
            self.load_heads(Path(heads_path))
        self.requires_grad_(False).eval()

    def load_heads(self, path: Path) -> None:
        state = _load(path, "LPIPS linear heads", HEADS_URL)
        for index, head in enumerate(self.heads):
            key = f"lin{index}.model.1.weight"
            if key not in state:
                raise ValueError(f"{path}: key {key!r} missing; is this LPIPS' vgg.pth (v0.1)?")
            head.weight.data.copy_(state[key])

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # frozen: never switch to training behaviour

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        out, taps, start = (images - self.shift) / self.scale, [], 0
        for end in TAP_ENDS:
            out = self.features[start:end](out)
            taps.append(out)
            start = end
        return taps

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        distance = torch.zeros(prediction.shape[0], device=prediction.device)
        for head, a, b in zip(self.heads, self.taps(prediction), self.taps(target)):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            distance = distance + head((a - b) ** 2).mean(dim=(1, 2, 3))
        return distance
