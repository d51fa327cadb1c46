"""Output size: the model always works at x4; every other requested size resamples its output.

A request names at most one of: a scale factor (1..8), a target width and/or height, or a target
longest side. The result is exact integer dimensions, and `resample` produces exactly those.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from s3diff_serve.model.config import MAX_SCALE, MIN_SCALE, PRE_RESIZE_MODES, SCALE
from s3diff_serve.model.errors import InvalidInputError


def resolve_output_size(
    input_size: tuple[int, int],
    *,
    scale: float | None = None,
    width: int | None = None,
    height: int | None = None,
    longest_side: int | None = None,
) -> tuple[int, int]:
    """(height, width) of the output for an input of `input_size` = (height, width).

    Width alone or height alone keeps the aspect ratio; both together give exactly that size.
    Each axis' implied scale must lie in [1, 8]: SR never shrinks, and past x8 the model's x4
    output would be stretched more than 2x by a plain filter.
    """
    in_h, in_w = input_size
    if in_h < 1 or in_w < 1:
        raise InvalidInputError(f"input size must be positive, got {in_w}x{in_h}")
    given = [name for name, value in (("scale", scale), ("longest_side", longest_side)) if value is not None]
    if width is not None or height is not None:
        given.append("width/height")
    if len(given) > 1:
        raise InvalidInputError(f"give only one of scale, width/height, longest_side (got {', '.join(given)})")
    for name, value in (("width", width), ("height", height), ("longest_side", longest_side)):
        if value is not None and (not float(value).is_integer() or value < 1):
            raise InvalidInputError(f"{name} must be a positive integer, got {value}")

    if width is not None or height is not None:
        if width is not None and height is not None:
            out_h, out_w = int(height), int(width)
        elif width is not None:
            out_w = int(width)
            out_h = max(1, round(in_h * out_w / in_w))
        else:
            out_h = int(height)
            out_w = max(1, round(in_w * out_h / in_h))
    elif longest_side is not None:
        factor = int(longest_side) / max(in_h, in_w)
        out_h, out_w = (int(longest_side), max(1, round(in_w * factor))) if in_h >= in_w else (
            max(1, round(in_h * factor)), int(longest_side))
    else:
        factor = float(SCALE if scale is None else scale)
        if not MIN_SCALE <= factor <= MAX_SCALE:
            raise InvalidInputError(f"scale must be in [{MIN_SCALE:g}, {MAX_SCALE:g}], got {factor:g}")
        return max(1, round(in_h * factor)), max(1, round(in_w * factor))

    for axis, out_len, in_len in (("height", out_h, in_h), ("width", out_w, in_w)):
        implied = out_len / in_len
        # Rounding may put an axis a hair outside the range; allow half a pixel of slack.
        if not (MIN_SCALE * in_len - 0.5 <= out_len <= MAX_SCALE * in_len + 0.5):
            raise InvalidInputError(
                f"output {axis} {out_len} implies a scale of {implied:.3g} from {in_len}; "
                f"allowed scales are [{MIN_SCALE:g}, {MAX_SCALE:g}]")
    return out_h, out_w


def resample(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize float images (..., H, W) in [0, 1] to exactly `size` = (height, width).

    Uses Pillow's Lanczos filter on 32-bit float planes (mode "F"): a high-quality filter that
    anti-aliases when shrinking, with no 8-bit round trip. Lanczos rings slightly past the input
    range, so the result is clamped to [0, 1]. The same size returns the input unchanged.
    """
    out_h, out_w = size
    if tuple(images.shape[-2:]) == (out_h, out_w):
        return images
    planes = images.detach().to(torch.float32).cpu().reshape(-1, *images.shape[-2:]).numpy()
    resized = np.stack([
        np.asarray(Image.fromarray(np.ascontiguousarray(plane)).resize((out_w, out_h), Image.Resampling.LANCZOS))
        for plane in planes
    ])
    result = torch.from_numpy(resized).clamp_(0.0, 1.0)
    return result.reshape(*images.shape[:-2], out_h, out_w)


def pre_resize(lowres: torch.Tensor, mode: str) -> torch.Tensor:
    """The x4 resize of the low-res input that the VAE sees, with the weights' `pre_resize` mode
    (MergedConfig.pre_resize): training and serving both call this. align_corners=False as the
    reference; clamped to [0, 1] (bicubic overshoots; bilinear never does, so it stays exact)."""
    if mode not in PRE_RESIZE_MODES:
        raise ValueError(f"pre_resize must be one of {', '.join(PRE_RESIZE_MODES)}, got {mode!r}")
    height, width = lowres.shape[-2:]
    upscaled = F.interpolate(lowres, size=(height * SCALE, width * SCALE), mode=mode, align_corners=False)
    return upscaled if mode == "bilinear" else upscaled.clamp(0, 1)
