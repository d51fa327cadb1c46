"""Build the S3Diff model to train, through the model package's own loaders, and mark exactly the
paper's trainable set: UNet LoRA + conv_in, VAE-encoder LoRA, the six MLPs and the two
block-embedding tables; the estimator and the base weights stay frozen. With `train_all` (the
built-in demo model) the preset's architecture is built from scratch and every weight trains.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from s3diff_serve.model.checkpoints import (
    encode_prompts, load_de_net_into, load_merged, load_release, load_sd_turbo, read_merged_config, read_scheduler_config,
)
from s3diff_serve.model.config import NEGATIVE_PROMPT, POSITIVE_PROMPT, PRESETS, SCHEDULER_CONFIG
from s3diff_serve.model.s3diff import S3DiffModel

from .config import ModelSource

logger = logging.getLogger(__name__)
DEFAULT_TRAINING_PRE_RESIZE = "bicubic"  # the paper's training code
DECODER_UP_BLOCK = re.compile(r"^vae\.decoder\.up_blocks\.(\d+)\.")


def resolve_pre_resize(source: ModelSource) -> str:
    """The x4 pre-resize this run trains with (and records in its merged configs): the
    configured one, else that of the init_merged weights, else bicubic."""
    if source.pre_resize is not None:
        return source.pre_resize
    if source.init_merged is not None:
        return read_merged_config(source.init_merged).pre_resize
    return DEFAULT_TRAINING_PRE_RESIZE


@dataclass
class BaseFiles:
    """The released-format files the run starts from; a saved `s3diff.pkl` loads with these."""

    sd_turbo_dir: Path
    de_net_pth: Path
    init_s3diff_pkl: Path | None


def resolve_base_files(source: ModelSource, output_dir: Path, seed: int) -> BaseFiles | None:
    """Real files as configured, or, for a `preset`, seeded random ones written once to
    `<output_dir>/base` (so checkpoints of a smoke run load through the real loaders too); None
    when training from scratch (nothing is read)."""
    if source.train_all:
        return None
    if source.preset is None:
        return BaseFiles(source.sd_turbo_dir, source.de_net_pth, source.init_s3diff_pkl)
    from s3diff_serve.model.presets import write_release

    base = output_dir / "base"
    if not (base / "s3diff.pkl").is_file():
        write_release(base, preset=source.preset, seed=seed)
    return BaseFiles(base / "sd-turbo", base / "de_net.pth", base / "s3diff.pkl")


def fresh_model(files: BaseFiles, source: ModelSource) -> S3DiffModel:
    """SD-Turbo + new LoRA/MLPs (peft init: B = 0, so training starts from SD-Turbo's output)."""
    sd_turbo = Path(files.sd_turbo_dir)
    unet, vae = load_sd_turbo(sd_turbo)
    model = S3DiffModel(unet, vae, read_scheduler_config(sd_turbo), rank_unet=source.rank_unet, rank_vae=source.rank_vae)
    load_de_net_into(model, Path(files.de_net_pth))
    with torch.no_grad():
        embeds = encode_prompts(sd_turbo, [POSITIVE_PROMPT, NEGATIVE_PROMPT])
        model.positive_embeds.copy_(embeds[:1])
        model.negative_embeds.copy_(embeds[1:])
    return model


def scratch_model(source: ModelSource, seed: int) -> S3DiffModel:
    """The preset's architecture with fresh weights. The UNet's output conv starts at zero, so the
    one-step path starts as a plain autoencoder (eps = 0: x0 is the encoder's latent, rescaled,
    which the decoder's normalisation absorbs) and the UNet learns the correction. The prompt
    embeddings are fixed seeded noise: with no text encoder they are just two learned-to-be-told-
    apart conditions, positive and negative."""
    unet_config, vae_config = PRESETS[source.preset]
    torch.manual_seed(seed)
    model = S3DiffModel(UNet2DConditionModel(**unet_config()), AutoencoderKL(**vae_config()), dict(SCHEDULER_CONFIG),
                        rank_unet=source.rank_unet, rank_vae=source.rank_vae)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.unet.conv_out.weight.zero_()
        model.unet.conv_out.bias.zero_()
        model.positive_embeds.copy_(torch.randn(model.positive_embeds.shape, generator=generator))
        model.negative_embeds.copy_(torch.randn(model.negative_embeds.shape, generator=generator))
    return model


def build_trainable_model(files: BaseFiles | None, source: ModelSource, seed: int = 0) -> S3DiffModel:
    if files is None:
        model = scratch_model(source, seed)
        if source.init_merged is not None:
            start, _ = load_merged(source.init_merged)
            init_from_merged(model, start)
        # peft's add_adapter froze the base weights; from scratch, they train too.
        return model.requires_grad_(True).train()
    if files.init_s3diff_pkl is not None:
        model = load_release(files.sd_turbo_dir, files.init_s3diff_pkl, files.de_net_pth)
    else:
        model = fresh_model(files, source)
    model.requires_grad_(False)
    for param in model.trainable_parameters():
        param.requires_grad_(True)
    if source.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    return model.train()


@torch.no_grad()
def init_from_merged(model: S3DiffModel, start: S3DiffModel) -> list[str]:
    """Copy `start`'s tensors into `model` wherever they fit; returns the names left at their
    fresh init. Same architecture: every tensor. A VAE with fewer levels (a smaller latent
    factor) is `start` with its lowest-resolution level removed: encoder blocks keep their
    index (the last one loses nothing but a downsampler), and decoder up-block i is `start`'s
    up-block i + (levels removed), the ones that work at the same image resolutions."""
    shift = len(start.vae.config.block_out_channels) - len(model.vae.config.block_out_channels)
    source = start.state_dict()
    target = model.state_dict()

    def source_name(name: str) -> str:
        match = DECODER_UP_BLOCK.match(name)
        if shift <= 0 or match is None:
            return name
        return f"vae.decoder.up_blocks.{int(match.group(1)) + shift}.{name[match.end():]}"

    fresh = []
    for name, tensor in target.items():
        value = source.get(source_name(name))
        if value is None or value.shape != tensor.shape:
            fresh.append(name)
        else:
            tensor.copy_(value.float())
    if fresh:
        logger.warning("init_merged: %d of %d tensors do not fit and keep their fresh init (first: %s)",
                       len(fresh), len(target), fresh[0])
    return fresh


def optimized_parameters(model: S3DiffModel, source: ModelSource) -> list[torch.nn.Parameter]:
    return list(model.parameters()) if source.train_all else model.trainable_parameters()


def set_train_mode(model: S3DiffModel, source: ModelSource) -> None:
    """Train mode for the networks being trained; a frozen estimator stays in eval."""
    model.train()
    if not source.train_all:
        model.de_net.eval()

