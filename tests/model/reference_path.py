"""An independent re-statement of the reference inference path (docs/model.md, "The one-step
inference path", in the reference code's order): two separate UNet calls, diffusers'
DDPMScheduler for the step, the modulation computed from the released formula, output truncated
to uint8 through PIL like the reference.
Used only to check that the pipeline's output matches it within 8-bit rounding."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def modulation(head, w, scores):
    proj = scores[..., None] * w[None, None, :] * 2 * np.pi
    proj = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
    proj = torch.cat([proj[:, 0], proj[:, 1]], dim=-1)
    de = head.de_mlp(proj)
    blocks = head.block_mlp(head.block_embeddings.weight)
    n = blocks.shape[0]
    fused = head.fuse_mlp(torch.cat([de.unsqueeze(1).repeat(1, n, 1), blocks.unsqueeze(0).repeat(scores.shape[0], 1, 1)], -1))
    return fused.reshape(scores.shape[0], n, head.rank, head.rank)


def wavelet_blur(image, radius):
    kernel = torch.tensor([[0.0625, 0.125, 0.0625], [0.125, 0.25, 0.125], [0.0625, 0.125, 0.0625]])
    kernel = kernel[None, None].repeat(3, 1, 1, 1)
    image = F.pad(image, (radius, radius, radius, radius), mode="replicate")
    return F.conv2d(image, kernel, groups=3, dilation=radius)


def wavelet_decomposition(image, levels=5):
    high = torch.zeros_like(image)
    for i in range(levels):
        low = wavelet_blur(image, 2**i)
        high += image - low
        image = low
    return high, low


@torch.no_grad()
def reference_upscale(model, lowres: torch.Tensor, guidance: float = 1.07) -> np.ndarray:
    """lowres (1,3,h,w) in [0,1] -> uint8 HWC array, the reference's way (on the model's device;
    the 8-bit colour fix on the CPU)."""
    lowres = lowres.to(model.fourier_frequencies.device)
    h, w = lowres.shape[-2:]
    upscaled = F.interpolate(lowres, size=(h * 4, w * 4), mode="bilinear", align_corners=False)
    norm = torch.clamp(upscaled * 2 - 1.0, -1.0, 1.0)
    rh, rw = norm.shape[2:]
    pad_h, pad_w = math.ceil(rh / 64) * 64 - rh, math.ceil(rw / 64) * 64 - rw
    norm = F.pad(norm, pad=(0, pad_w, 0, pad_h), mode="reflect")
    scores = model.de_net(lowres)
    model.vae_slot.modulation = modulation(model.vae_modulation, model.fourier_frequencies, scores)
    model.unet_slot.modulation = modulation(model.unet_modulation, model.fourier_frequencies, scores)
    latent = model.vae.encode(norm).latent_dist.mean * model.vae.config.scaling_factor
    pos = model.unet(latent, 999, encoder_hidden_states=model.positive_embeds).sample
    neg = model.unet(latent, 999, encoder_hidden_states=model.negative_embeds).sample
    eps = neg + guidance * (pos - neg)
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(1)
    x0 = scheduler.step(eps, 999, latent, return_dict=True).prev_sample
    out = model.vae.decode(x0 / model.vae.config.scaling_factor).sample.clamp(-1, 1)
    out = out[:, :, :rh, :rw] * 0.5 + 0.5
    # ToPILImage on a float tensor: mul(255).byte() (truncation), then back to [0,1] for the fix
    out_u8 = (out[0].cpu() * 255).byte().float() / 255
    ref_u8 = (upscaled[0].cpu() * 255).byte().float() / 255
    high, _ = wavelet_decomposition(out_u8[None])
    _, low = wavelet_decomposition(ref_u8[None])
    fixed = (high + low).clamp(0, 1)
    return (fixed[0] * 255).byte().permute(1, 2, 0).numpy()
