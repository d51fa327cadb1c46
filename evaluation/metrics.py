"""Super-resolution quality metrics, reimplemented to match the reference numbers of the field.

- PSNR / SSIM on uint8 RGB, optionally on the Y channel of MATLAB's rgb2ycbcr (BT.601, 16-235) with
  `border` pixels cropped (the SR convention: border = scale). SSIM is Wang et al.'s: 11x11 gaussian,
  sigma 1.5, valid region only, averaged over channels.
- LPIPS v0.1 (AlexNet or VGG16) and DISTS as frozen, differentiable nn.Modules, so training can use
  them as losses. Their weights come from `s3diff weights fetch-metrics`.
- NIQE as in the MATLAB release (and BasicSR): 96x96 blocks, two scales, MATLAB's bicubic imresize.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from s3diff_serve.evaluation.metric_weights import metric_file

__all__ = ["psnr", "ssim", "rgb_to_y", "niqe", "LPIPS", "DISTS", "MetricSuite"]


# ---------------------------------------------------------------- PSNR / SSIM

def _check_pair(sr: np.ndarray, hr: np.ndarray) -> None:
    for image in (sr, hr):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected uint8 HxWx3 RGB, got {image.dtype} {image.shape}")
    if sr.shape != hr.shape:
        raise ValueError(f"shapes differ: {sr.shape} vs {hr.shape}")


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """Y of MATLAB's rgb2ycbcr (BT.601, studio range 16-235) as float64, not rounded."""
    rgb = image.astype(np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def _prepare(sr: np.ndarray, hr: np.ndarray, y_channel: bool, border: int) -> tuple[np.ndarray, np.ndarray]:
    _check_pair(sr, hr)
    if y_channel:
        a, b = rgb_to_y(sr)[..., None], rgb_to_y(hr)[..., None]
    else:
        a, b = sr.astype(np.float64), hr.astype(np.float64)
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    return a, b


def psnr(sr: np.ndarray, hr: np.ndarray, *, y_channel: bool = False, border: int = 0) -> float:
    """PSNR in dB over all pixels (and channels) after cropping `border`; inf for identical images."""
    a, b = _prepare(sr, hr, y_channel, border)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def _ssim_plane(a: np.ndarray, b: np.ndarray) -> float:
    if min(a.shape) < 11:
        raise ValueError(f"SSIM needs at least 11x11 pixels after cropping, got {a.shape}")
    kernel = cv2.getGaussianKernel(11, 1.5)
    window = kernel @ kernel.T
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return cv2.filter2D(x, -1, window)[5:-5, 5:-5]  # keep only windows fully inside the image

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def ssim(sr: np.ndarray, hr: np.ndarray, *, y_channel: bool = False, border: int = 0) -> float:
    """SSIM (Wang et al. 2004) after cropping `border`; RGB is the mean of the three channels' SSIM."""
    a, b = _prepare(sr, hr, y_channel, border)
    return float(np.mean([_ssim_plane(a[..., c], b[..., c]) for c in range(a.shape[2])]))


# ---------------------------------------------------------------- backbones

_VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_ALEXNET_TAPS = (1, 4, 7, 9, 11)  # relu after each of the five convs


def _vgg16_features(pool=lambda channels: nn.MaxPool2d(2, 2)) -> nn.Sequential:
    """torchvision's `vgg16().features` layout (so `features.N` keys load), pooling swappable."""
    layers: list[nn.Module] = []
    channels = 3
    for item in _VGG16_CONFIG:
        if item == "M":
            layers.append(pool(channels))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU()]
            channels = item
    return nn.Sequential(*layers)


def _alexnet_features() -> nn.Sequential:
    """torchvision's `alexnet().features` layout."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )


def _load_features(features: nn.Sequential, name: str, cache: Path | None) -> None:
    state = load_file(str(metric_file(name, cache)))
    features.load_state_dict({key.removeprefix("features."): value for key, value in state.items()})


def _tapped(features: nn.Sequential, taps: tuple[int, ...], x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for index, layer in enumerate(features[: taps[-1] + 1]):
        x = layer(x)
        if index in taps:
            out.append(x)
    return out


class _Frozen(nn.Module):
    """Metric networks never train: parameters frozen, always in eval mode; gradients still flow to inputs."""

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)


# ---------------------------------------------------------------- LPIPS

class LPIPS(_Frozen):
    """LPIPS v0.1 (Zhang et al. 2018). forward(x, y): (B,3,H,W) in [-1, 1] -> (B,) distances."""

    def __init__(self, net: str = "alex", cache: Path | None = None, pretrained: bool = True):
        """`pretrained=False` (tests and smoke runs only): random backbone, equal positive heads."""
        super().__init__()
        if net == "alex":
            self.features, self.taps, channels = _alexnet_features(), _ALEXNET_TAPS, (64, 192, 384, 256, 256)
            backbone, heads = "alexnet.safetensors", "lpips_alex_heads.safetensors"
        elif net == "vgg":
            self.features, self.taps, channels = _vgg16_features(), _VGG16_TAPS, (64, 128, 256, 512, 512)
            backbone, heads = "vgg16.safetensors", "lpips_vgg_heads.safetensors"
        else:
            raise ValueError(f"net must be 'alex' or 'vgg', got {net!r}")
        self.features = self.features[: self.taps[-1] + 1]
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        if pretrained:
            _load_features(self.features, backbone, cache)
            head_state = load_file(str(metric_file(heads, cache)))
            for i, head in enumerate(self.heads):
                head.weight.data.copy_(head_state[f"lin{i}.weight"])
        else:
            for head, c in zip(self.heads, channels):
                nn.init.constant_(head.weight, 1.0 / c)
        # LPIPS' ScalingLayer: [-1, 1] input -> ImageNet-normalised statistics
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self._freeze()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feats_x = _tapped(self.features, self.taps, (x - self.shift) / self.scale)
        feats_y = _tapped(self.features, self.taps, (y - self.shift) / self.scale)
        total = 0
        for head, fx, fy in zip(self.heads, feats_x, feats_y):
            fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + head((fx - fy) ** 2).mean(dim=(2, 3))
        return total.flatten()


# ---------------------------------------------------------------- DISTS

class _L2Pool(nn.Module):
    """DISTS' anti-aliased pooling: sqrt of a 3x3 Hann-weighted average of x^2, stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        taps = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)  # np.hanning(5)[1:-1]
        window = torch.outer(taps, taps)
        window = (window / window.sum()).float()
        self.register_buffer("window", window.expand(channels, 1, 3, 3).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x * x, self.window, stride=2, padding=1, groups=x.shape[1])
        return (out + 1e-12).sqrt()


class DISTS(_Frozen):
    """DISTS (Ding et al. 2020). forward(x, y): (B,3,H,W) in [0, 1] -> (B,) distances."""

    _CHANNELS = (3, 64, 128, 256, 512, 512)

    def __init__(self, cache: Path | None = None):
        super().__init__()
        self.features = _vgg16_features(pool=_L2Pool)[: _VGG16_TAPS[-1] + 1]
        _load_features(self.features, "vgg16.safetensors", cache)
        weights = load_file(str(metric_file("dists_alpha_beta.safetensors", cache)))
        self.register_buffer("alpha", weights["alpha"])
        self.register_buffer("beta", weights["beta"])
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self._freeze()

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        # the raw image itself is the first "feature" (its 3 channels have weights in alpha/beta)
        return [x, *_tapped(self.features, _VGG16_TAPS, (x - self.mean) / self.std)]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / total, self._CHANNELS, dim=1)
        betas = torch.split(self.beta / total, self._CHANNELS, dim=1)
        c1 = c2 = 1e-6
        similarity = 0
        for fx, fy, alpha, beta in zip(self._features(x), self._features(y), alphas, betas):
            mean_x, mean_y = fx.mean((2, 3), keepdim=True), fy.mean((2, 3), keepdim=True)
            var_x = ((fx - mean_x) ** 2).mean((2, 3), keepdim=True)
            var_y = ((fy - mean_y) ** 2).mean((2, 3), keepdim=True)
            cov = (fx * fy).mean((2, 3), keepdim=True) - mean_x * mean_y
            texture = (2 * mean_x * mean_y + c1) / (mean_x**2 + mean_y**2 + c1)
            structure = (2 * cov + c2) / (var_x + var_y + c2)
            similarity = similarity + (alpha * texture + beta * structure).sum(1, keepdim=True)
        return 1 - similarity.flatten()


# ---------------------------------------------------------------- NIQE

def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return ((1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1)
            + (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)))


def _matlab_resize_matrix(in_len: int, scale: float) -> np.ndarray:
    """(out, in) matrix of MATLAB imresize's bicubic, antialiased when shrinking, symmetric edges."""
    out_len = math.ceil(in_len * scale)
    u = np.arange(1, out_len + 1) / scale + 0.5 * (1 - 1 / scale)  # 1-based input coordinates
    kernel_scale = min(scale, 1.0)
    width = 4.0 / kernel_scale
    left = np.floor(u - width / 2)
    indices = left[:, None] + np.arange(math.ceil(width) + 2)[None, :]
    weights = kernel_scale * _cubic(kernel_scale * (u[:, None] - indices))
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    columns = mirror[(indices.astype(np.int64) - 1) % (2 * in_len)]
    matrix = np.zeros((out_len, in_len))
    np.add.at(matrix, (np.repeat(np.arange(out_len), indices.shape[1]), columns.ravel()), weights.ravel())
    return matrix


def _matlab_imresize(image: np.ndarray, scale: float) -> np.ndarray:
    rows = _matlab_resize_matrix(image.shape[0], scale)
    cols = _matlab_resize_matrix(image.shape[1], scale)
    return rows @ image @ cols.T


@lru_cache(maxsize=1)
def _aggd_table() -> tuple[np.ndarray, np.ndarray]:
    gam = 0.2 + 0.001 * np.arange(9801)  # MATLAB's 0.2:0.001:10
    lg = np.vectorize(math.lgamma)
    return gam, np.exp(2 * lg(2 / gam) - lg(1 / gam) - lg(3 / gam))


def _aggd(values: np.ndarray) -> tuple[float, float, float]:
    """Asymmetric generalised gaussian fit by moment matching: (alpha, left beta, right beta)."""
    gam, r_gam = _aggd_table()
    values = values.ravel()
    left_std = math.sqrt(np.mean(values[values < 0] ** 2))
    right_std = math.sqrt(np.mean(values[values > 0] ** 2))
    gamma_hat = left_std / right_std
    r_hat = np.mean(np.abs(values)) ** 2 / np.mean(values**2)
    r_hat_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    alpha = float(gam[np.argmin((r_gam - r_hat_norm) ** 2)])
    factor = math.sqrt(math.gamma(1 / alpha) / math.gamma(3 / alpha))
    return alpha, left_std * factor, right_std * factor


def _block_features(block: np.ndarray) -> list[float]:
    alpha, beta_l, beta_r = _aggd(block)
    features = [alpha, (beta_l + beta_r) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):
        alpha, beta_l, beta_r = _aggd(block * np.roll(block, shift, axis=(0, 1)))
        mean = (beta_r - beta_l) * math.gamma(2 / alpha) / math.gamma(1 / alpha)
        features += [alpha, mean, beta_l, beta_r]
    return features


@lru_cache(maxsize=4)
def _niqe_params(cache: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with np.load(metric_file("niqe_pris_params.npz", cache), allow_pickle=False) as params:
        return params["mu_pris_param"].ravel(), params["cov_pris_param"], params["gaussian_window"]


def niqe(image: np.ndarray, border: int = 0, *, cache: Path | None = None) -> float:
    """NIQE (Mittal et al. 2013; lower is better). uint8 HxWx3 RGB is scored on its Y channel (MATLAB's
    rgb2ycbcr, rounded as MATLAB does for uint8); a uint8 HxW image is scored as is."""
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"expected uint8 HxWx3 RGB or HxW, got {image.dtype} {image.shape}")
    plane = np.round(rgb_to_y(image)) if image.ndim == 3 else image.astype(np.float64)
    if border:
        plane = plane[border:-border, border:-border]
    mu_pris, cov_pris, window = _niqe_params(cache)
    block = 96
    rows, cols = plane.shape[0] // block, plane.shape[1] // block
    if rows * cols < 2:
        raise ValueError(f"NIQE needs at least two {block}x{block} blocks, got {plane.shape}")
    plane = plane[: rows * block, : cols * block]

    per_scale = []
    for scale in (1, 2):
        mu = cv2.filter2D(plane, -1, window, borderType=cv2.BORDER_REPLICATE)
        sigma = np.sqrt(np.abs(cv2.filter2D(plane * plane, -1, window, borderType=cv2.BORDER_REPLICATE) - mu**2))
        normalised = (plane - mu) / (sigma + 1)
        size = block // scale
        per_scale.append([_block_features(normalised[r * size:(r + 1) * size, c * size:(c + 1) * size])
                          for r in range(rows) for c in range(cols)])
        if scale == 1:
            plane = _matlab_imresize(plane, 0.5)
    features = np.concatenate([np.array(f) for f in per_scale], axis=1)

    mu_dist = np.nanmean(features, axis=0)
    cov_dist = np.cov(features[~np.isnan(features).any(axis=1)], rowvar=False)
    diff = mu_pris - mu_dist
    return float(np.sqrt(diff @ np.linalg.pinv((cov_pris + cov_dist) / 2) @ diff))


# ---------------------------------------------------------------- all at once

class MetricSuite:
    """Every metric of an SR evaluation for one (sr, hr) pair; the networks are loaded once.

    `border` crops PSNR/SSIM only (the SR convention, border = scale); `ssim` is on Y like the SR
    papers report it; LPIPS/DISTS see the whole images; NIQE scores `sr` alone.
    """

    KEYS = ("psnr", "psnr_y", "ssim", "lpips_alex", "lpips_vgg", "dists", "niqe")

    def __init__(self, cache: Path | None = None, device: str = "cpu"):
        self.cache = cache
        self.device = torch.device(device)
        self.lpips_alex = LPIPS("alex", cache).to(self.device)
        self.lpips_vgg = LPIPS("vgg", cache).to(self.device)
        self.dists = DISTS(cache).to(self.device)

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        # np.array copies: decoded images are read-only arrays, which torch warns about
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div(255).to(self.device)

    @torch.inference_mode()
    def __call__(self, sr: np.ndarray, hr: np.ndarray, border: int = 4) -> dict[str, float]:
        _check_pair(sr, hr)
        x, y = self._tensor(sr), self._tensor(hr)
        return {
            "psnr": psnr(sr, hr, border=border),
            "psnr_y": psnr(sr, hr, y_channel=True, border=border),
            "ssim": ssim(sr, hr, y_channel=True, border=border),
            "lpips_alex": float(self.lpips_alex(x * 2 - 1, y * 2 - 1)),
            "lpips_vgg": float(self.lpips_vgg(x * 2 - 1, y * 2 - 1)),
            "dists": float(self.dists(x, y)),
            "niqe": niqe(sr, cache=self.cache),
        }
