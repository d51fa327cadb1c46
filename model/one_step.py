"""The one-step S3Diff recipe, written once (docs/model.md, "The one-step inference path").

Serving (S3DiffPipeline.execute), training's forward pass and evaluation (S3DiffModel.forward)
and the bench's reference-like row (cli/bench.py) all call `one_step`; they differ only in
`Stages`, how steps 4 to 7 run: tiled with the LoRA folded (serving), on the whole image without
a clamp (training), or as the reference script does (two UNet calls, the text encoder per call,
the LoRA unfolded).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .color_fix import color_fix as apply_color_fix
from .config import PAD_MULTIPLE
from .output_size import pre_resize as resize_to_model_size


class Stages(Protocol):
    """Steps 4 to 7 of the recipe, on one batch."""

    def encode(self, image: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """Step 4: image in [-1, 1] -> scaled latent, with the VAE's modulation."""

    def denoise(self, latent: torch.Tensor, modulation: torch.Tensor, guidance: float) -> torch.Tensor:
        """Steps 5 and 6: latent -> clean latent x0 (the UNet's eps at t=999, then the step)."""

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Step 7: clean latent -> image in [-1, 1]."""


def pad_to_multiple(image: torch.Tensor, multiple: int = PAD_MULTIPLE) -> torch.Tensor:
    """Reflect-pad bottom/right to a multiple (as the reference). Reflection cannot reach further
    than the image itself, so tiny inputs are padded by repeated reflection, then replication."""
    while True:
        height, width = image.shape[-2:]
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h == 0 and pad_w == 0:
            return image
        step_h, step_w = min(pad_h, height - 1), min(pad_w, width - 1)
        if step_h == 0 and step_w == 0:
            return F.pad(image, (0, pad_w, 0, pad_h), mode="replicate")
        image = F.pad(image, (0, step_w, 0, step_h), mode="reflect")


def one_step(model, lowres: torch.Tensor, blur: torch.Tensor, noise: torch.Tensor, stages: Stages, *,
             pre_resize: str, guidance: float, color_fix: str) -> torch.Tensor:
    """Low-res (B,3,h,w) in [0,1] and per-sample scores (B,) -> the x4 image (B,3,4h,4w) in [0,1]
    (`model`: an S3DiffModel; the scores are given, estimated or overridden, by the caller)."""
    # 1. Pre-resize x4 as the weights were trained (MergedConfig.pre_resize; bilinear for the release).
    upscaled = resize_to_model_size(lowres, pre_resize)
    # 2. To [-1, 1], reflect-padded to the VAE's input grid.
    image = pad_to_multiple(upscaled * 2 - 1)
    # 3. The degradation modulation of each network, from the scores.
    modulation = model.degradation_modulation(blur, noise)
    # 4. Encode: the VAE encoder with its modulated LoRA -> latent (posterior mean).
    latent = stages.encode(image, modulation.vae)
    # 5-6. eps at t=999 (classifier-free guidance fused into one UNet call), closed-form step to x0.
    clean = stages.denoise(latent, modulation.unet, guidance)
    # 7. Decode, and crop the padding off.
    decoded = stages.decode(clean)[..., :upscaled.shape[-2], :upscaled.shape[-1]]
    # 8. Colour fix: the output's colours tied to the pre-resized input's.
    return apply_color_fix(decoded * 0.5 + 0.5, upscaled, color_fix)


class TrainingStages:
    """Training's forward pass and evaluation: the whole image, differentiable (no clamp), one
    UNet call on `states` (per-sample prompts; default the positive prompt)."""

    def __init__(self, model, states: torch.Tensor | None = None):
        self.model, self.states = model, states

    def encode(self, image: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        return self.model.encode(image, modulation)

    def denoise(self, latent: torch.Tensor, modulation: torch.Tensor, guidance: float) -> torch.Tensor:
        return self.model.clean_sample(latent, self.model.predict_noise(latent, modulation, guidance, self.states))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latent, clamp=False)
