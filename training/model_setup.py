"""Build the S3Diff model to train, through the model package's own loaders, and mark exactly the
paper's trainable set (MODEL.md, "Training"): UNet LoRA + conv_in, VAE-encoder LoRA, the six MLPs
and the two block-embedding tables; the estimator and the base weights stay frozen.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from s3diff_serve.model.checkpoints import encode_prompts, load_de_net_into, load_release, read_scheduler_config
from s3diff_serve.model.config import NEGATIVE_PROMPT, POSITIVE_PROMPT
from s3diff_serve.model.errors import CheckpointError
from s3diff_serve.model.s3diff import S3DiffModel

from .config import ModelSource


@dataclass
class BaseFiles:
    """The released-format files the run starts from; a saved `s3diff.pkl` loads with these."""

    sd_turbo_dir: Path
    de_net_pth: Path
    init_s3diff_pkl: Path | None


def resolve_base_files(source: ModelSource, output_dir: Path, seed: int) -> BaseFiles:
    """Real files as configured, or, for a `preset`, seeded random ones written once to
    `<output_dir>/base` (so checkpoints of a smoke run load through the real loaders too)."""
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
    try:
        unet = UNet2DConditionModel.from_pretrained(sd_turbo, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(sd_turbo, subfolder="vae")
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{sd_turbo}: cannot load the SD-Turbo unet/vae ({exc}); download stabilityai/sd-turbo from Hugging Face"
        ) from None
    model = S3DiffModel(unet, vae, read_scheduler_config(sd_turbo), rank_unet=source.rank_unet, rank_vae=source.rank_vae)
    load_de_net_into(model, Path(files.de_net_pth))
    with torch.no_grad():
        embeds = encode_prompts(sd_turbo, [POSITIVE_PROMPT, NEGATIVE_PROMPT])
        model.positive_embeds.copy_(embeds[:1])
        model.negative_embeds.copy_(embeds[1:])
    return model


def build_trainable_model(files: BaseFiles, source: ModelSource) -> S3DiffModel:
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


def set_train_mode(model: S3DiffModel) -> None:
    """Train mode for the networks being adapted; the frozen estimator stays in eval."""
    model.train()
    model.de_net.eval()


def trainable_names(model: S3DiffModel) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]
