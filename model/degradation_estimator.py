"""The degradation estimator of MM-RealSR (Mou et al. 2022) that S3Diff ships as `de_net.pth`.

Module names follow that release exactly so its state dict loads strictly:
`conv_first.{i}`, `body.{i}.{j}[.conv1|.conv2]`, `fc_degree.{i}.{0,2}`. Output index 0 is blur,
index 1 is noise (MM-RealSR's order).
"""
from __future__ import annotations

import torch
from torch import nn

BLUR_INDEX = 0
NOISE_INDEX = 1


class ResidualBlockNoBN(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


def _branch_body(feats: list[int], blocks: list[int], downscales: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    last = len(feats) - 1
    for stage, (channels, count, down) in enumerate(zip(feats, blocks, downscales)):
        layers += [ResidualBlockNoBN(channels) for _ in range(count)]
        next_channels = feats[min(stage + 1, last)]
        if down == 2:
            layers.append(nn.Conv2d(channels, next_channels, 3, 2, 1))
        elif stage < last and channels != next_channels:
            layers.append(nn.Conv2d(channels, next_channels, 3, 1, 1))
    return nn.Sequential(*layers)


class DegradationEstimator(nn.Module):
    """Two ResNet-no-BN branches, each ending in a sigmoid score: (B,3,h,w) in [0,1] -> (B,2)."""

    def __init__(
        self,
        feats: tuple[int, ...] = (64, 64, 64, 128),
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        downscales: tuple[int, ...] = (1, 1, 2, 1),
        num_degradations: int = 2,
    ):
        super().__init__()
        self.conv_first = nn.ModuleList(nn.Conv2d(3, feats[0], 3, 1, 1) for _ in range(num_degradations))
        self.body = nn.ModuleList(
            _branch_body(list(feats), list(blocks), list(downscales)) for _ in range(num_degradations)
        )
        self.fc_degree = nn.ModuleList(
            nn.Sequential(nn.Linear(feats[-1], 512), nn.ReLU(inplace=True), nn.Linear(512, 1), nn.Sigmoid())
            for _ in range(num_degradations)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        scores = []
        for conv_first, body, head in zip(self.conv_first, self.body, self.fc_degree):
            features = body(conv_first(image)).mean(dim=(2, 3))
            scores.append(head(features).squeeze(-1))
        return torch.stack(scores, dim=1)
