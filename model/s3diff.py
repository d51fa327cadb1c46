"""The S3Diff network: SD-Turbo UNet + VAE with degradation-guided LoRA, the degradation
estimator and the two modulation heads. A plain nn.Module (diffusers style): no images on disk,
no prompts as text; the pipeline orchestrates it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from peft import LoraConfig
from torch import nn

from . import compiled
from .config import (
    FOURIER_SIZE, TIMESTEP, UNET_ADAPTER, UNET_BLOCKS, UNET_LORA_TARGETS, VAE_ADAPTER, VAE_BLOCKS,
    VAE_LORA_TARGETS,
)
from .degradation_estimator import BLUR_INDEX, NOISE_INDEX, DegradationEstimator
from .degradation_lora import ModulationHead, ModulationSlot, fourier_features, unet_block_id, vae_block_id
from .one_step import TrainingStages, one_step
from .runtime import CompilePlan


@dataclass(frozen=True)
class Modulation:
    """The degradation modulation of one batch, per network: (B, blocks, r, r) each."""

    vae: torch.Tensor
    unet: torch.Tensor


def alpha_bar(scheduler_config: dict[str, Any], timestep: int = TIMESTEP) -> float:
    """ᾱ_t of the SD-Turbo schedule, computed by diffusers from the stored scheduler config."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    with torch.device("cpu"):  # also when the model is being built on the meta device
        scheduler = DDPMScheduler(**{k: scheduler_config[k] for k in keys if k in scheduler_config})
    return float(scheduler.alphas_cumprod[timestep])


class S3DiffModel(nn.Module):
    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler_config: dict[str, Any],
        rank_unet: int = 32,
        rank_vae: int = 16,
        unet_targets: list[str] | None = None,
        vae_targets: str | list[str] = VAE_LORA_TARGETS,
        text_embed_dim: int | None = None,
    ):
        super().__init__()
        self.rank_unet, self.rank_vae = rank_unet, rank_vae
        self.unet_targets = list(unet_targets or UNET_LORA_TARGETS)
        self.vae_targets = vae_targets
        self.scheduler_config = dict(scheduler_config)
        unet.add_adapter(
            LoraConfig(r=rank_unet, init_lora_weights="gaussian", target_modules=self.unet_targets),
            adapter_name=UNET_ADAPTER,
        )
        vae.add_adapter(
            LoraConfig(r=rank_vae, init_lora_weights="gaussian", target_modules=vae_targets),
            adapter_name=VAE_ADAPTER,
        )
        self.unet, self.vae = unet, vae
        self.de_net = DegradationEstimator()
        self.register_buffer("fourier_frequencies", torch.randn(FOURIER_SIZE))
        self.vae_modulation = ModulationHead(rank_vae, VAE_BLOCKS, FOURIER_SIZE)
        self.unet_modulation = ModulationHead(rank_unet, UNET_BLOCKS, FOURIER_SIZE)
        embed_dim = text_embed_dim or unet.config.cross_attention_dim
        self.register_buffer("positive_embeds", torch.zeros(1, 77, embed_dim))
        self.register_buffer("negative_embeds", torch.zeros(1, 77, embed_dim))
        self.unet_slot = ModulationSlot(self.unet, UNET_ADAPTER, unet_block_id)
        self.vae_slot = ModulationSlot(self.vae, VAE_ADAPTER, vae_block_id)
        self.alpha_bar = alpha_bar(self.scheduler_config)
        self.compiled: dict[str, compiled.CompiledCall] = {}  # empty: the network calls run eager

    @classmethod
    def from_configs(cls, unet_config: dict, vae_config: dict, scheduler_config: dict, **kwargs) -> "S3DiffModel":
        return cls(
            UNet2DConditionModel.from_config(unet_config),
            AutoencoderKL.from_config(vae_config),
            scheduler_config,
            **kwargs,
        )

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The set the paper trains: UNet LoRA + conv_in, VAE-encoder LoRA, MLPs, block tables."""
        params = [p for n, p in self.unet.named_parameters() if "lora_" in n or n.startswith("conv_in.")]
        params += [p for n, p in self.vae.named_parameters() if "lora_" in n]
        params += list(self.vae_modulation.parameters()) + list(self.unet_modulation.parameters())
        return params

    def to_runtime(self, device: torch.device | str, dtype: torch.dtype, channels_last: bool = False) -> "S3DiffModel":
        """Weights in `dtype` on `device`; modulation heads, frequencies and prompts stay fp32 (tiny,
        and the modulation feeds the fp32 einsum). `channels_last`: the UNet's and VAE's conv
        weights in NHWC, so their convolutions run (and hand on) NHWC activations."""
        self.to(device)
        for module in (self.unet, self.vae, self.de_net):
            module.to(dtype)
        if channels_last:
            for module in (self.unet, self.vae):
                module.to(memory_format=torch.channels_last)
        return self

    def compile_calls(self, plan: CompilePlan) -> None:
        """Compile the three network calls (model/compiled.py); shapes compile under `warming_up`."""
        self.compiled = compiled.make_calls(
            {"encoder_call": self.encoder_call, "unet_call": self.unet_call, "decoder_call": self.decoder_call}, plan
        ) if plan.enabled else {}

    @contextlib.contextmanager
    def warming_up(self) -> Iterator[None]:
        """Shapes the network calls see inside compile (when compiled); outside, new shapes run eager."""
        with compiled.compiling(self.compiled.values()):
            yield

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Run the network calls eagerly even where compiled (the bench compares both)."""
        with compiled.eager(self.compiled.values()):
            yield

    def _run(self, name: str, *args: torch.Tensor) -> torch.Tensor:
        return (self.compiled.get(name) or getattr(self, name))(*args)

    def _runs_compiled(self, name: str, *args: torch.Tensor) -> bool:
        call = self.compiled.get(name)
        return call is not None and call.ready(*args)

    # --- the three network calls: what gets compiled ------------------------------------------
    # The modulation is an argument, put on the slot inside the call, so a compiled graph takes it
    # as an input: one graph serves every image and every noise/blur (model/compiled.py).
    def encoder_call(self, image: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """VAE encoder (modulated LoRA) -> posterior moments, mean and log-variance stacked."""
        self.vae_slot.modulation = modulation
        return self.vae.encode(image).latent_dist.parameters

    def unet_call(self, latent: torch.Tensor, states: torch.Tensor, modulation: torch.Tensor) -> torch.Tensor:
        """eps of one UNet call at t=999 (modulated LoRA)."""
        self.unet_slot.modulation = modulation
        return self.unet(latent, TIMESTEP, encoder_hidden_states=states).sample

    def decoder_call(self, latent: torch.Tensor) -> torch.Tensor:
        """VAE decoder (no LoRA): unscaled latent -> image."""
        return self.vae.decode(latent).sample

    # --- stages -----------------------------------------------------------------------------
    def estimate(self, lowres: torch.Tensor) -> torch.Tensor:
        """(B,3,h,w) in [0,1] -> (B,2) float32 [blur, noise]."""
        dtype = next(self.de_net.parameters()).dtype
        return self.de_net(lowres.to(dtype)).float()

    def degradation_modulation(self, blur: torch.Tensor, noise: torch.Tensor) -> Modulation:
        """Both networks' (B, blocks, r, r) modulation from per-sample scores; handed explicitly to
        `encode` and `predict_noise` (only the network calls put it on the LoRA slots)."""
        scores = torch.zeros(blur.shape[0], 2, device=blur.device)
        scores[:, BLUR_INDEX], scores[:, NOISE_INDEX] = blur, noise
        features = fourier_features(scores, self.fourier_frequencies)
        return Modulation(vae=self.vae_modulation(features).float(), unet=self.unet_modulation(features).float())

    def encode(self, image: torch.Tensor, modulation: torch.Tensor, generator: torch.Generator | None = None,
               sample: bool = False, fold: bool = False) -> torch.Tensor:
        """Image in [-1,1] -> scaled latent, the encoder's LoRA modulated by `modulation` (the
        VAE's); mean of the posterior unless `sample`. `fold`: every sample shares one modulation,
        so an eager call may fold the LoRA into the conv weights (ModulationSlot.folded); a
        compiled call keeps the LoRA branch in its graph instead."""
        image = image.to(self.vae.dtype)
        if fold and not self._runs_compiled("encoder_call", image, modulation):
            with self.vae_slot.folded(modulation):
                moments = self.encoder_call(image, modulation)
        else:
            moments = self._run("encoder_call", image, modulation)
        posterior = DiagonalGaussianDistribution(moments)
        latent = posterior.sample(generator) if sample else posterior.mean
        return (latent * self.scaling_factor).contiguous()

    def predict_noise(self, latent: torch.Tensor, modulation: torch.Tensor, guidance_scale: float,
                      states: torch.Tensor | None = None) -> torch.Tensor:
        """eps at t=999, the UNet's LoRA modulated by `modulation` (the UNet's). With classifier-free
        guidance (`guidance_scale` != 1) ONE UNet call on [positive; negative]; at 1 one call on
        the positive prompt, or on `states` when given (training's per-sample prompts)."""
        batch = latent.shape[0]
        dtype = self.unet.dtype
        positive = self.positive_embeds.expand(batch, -1, -1) if states is None else states
        if guidance_scale == 1.0:
            return self._run("unet_call", latent.to(dtype), positive.to(dtype), modulation).float().contiguous()
        if states is not None:
            raise ValueError("prompt states of one's own go with guidance 1 only")
        negative = self.negative_embeds.expand(batch, -1, -1)
        eps = self._run("unet_call", torch.cat([latent, latent]).to(dtype), torch.cat([positive, negative]).to(dtype),
                        torch.cat([modulation, modulation])).float()
        eps_pos, eps_neg = eps.chunk(2)
        return (eps_neg + guidance_scale * (eps_pos - eps_neg)).contiguous()

    def clean_sample(self, latent: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The DDPM step from t=999 to x0 in closed form, fp32 (no clipping, as SD-Turbo's config)."""
        a = self.alpha_bar
        return (latent.float() - (1 - a) ** 0.5 * eps.float()) / a**0.5

    def decode(self, latent: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Scaled latent -> image in [-1,1] (the decoder carries no LoRA). `clamp` False for
        training: a clamp would stop the gradient of every out-of-range pixel."""
        decoded = self._run("decoder_call", (latent / self.scaling_factor).to(self.vae.dtype)).float()
        return (decoded.clamp(-1, 1) if clamp else decoded).contiguous()

    def forward(self, lowres: torch.Tensor, blur: torch.Tensor, noise: torch.Tensor,
                states: torch.Tensor | None = None, *, pre_resize: str, color_fix: str) -> torch.Tensor:
        """Training's differentiable pass: the one-step recipe (model/one_step.py) on the whole
        image, one UNet call on `states` (default: the positive prompt), no clamp; low-res
        (B,3,h,w) in [0,1] -> x4 image in [0,1] (unclamped)."""
        return one_step(self, lowres, blur, noise, TrainingStages(self, states), pre_resize=pre_resize,
                        guidance=1.0, color_fix=color_fix)
