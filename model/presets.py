"""Seeded random-weight models and released-format files, for tests (`tiny`) and CPU
benchmarks at real layer sizes (`sd-turbo`). No weights can be downloaded here, so these are how
the real loading and inference code gets exercised."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from .checkpoints import ReleasedFiles, save_release
from .config import PRESETS, SCHEDULER_CONFIG, sd_turbo_text_config, tiny_text_config
from .s3diff import S3DiffModel

LORA_B_STD = 0.02  # peft zero-inits lora_B; a trained-looking non-zero B makes the LoRA path matter


def _randomize_trained_parts(model: S3DiffModel, generator: torch.Generator) -> None:
    """Give every trained tensor non-trivial values (peft's B=0 would hide LoRA bugs)."""
    with torch.no_grad():
        for name, param in list(model.unet.named_parameters()) + list(model.vae.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * LORA_B_STD)
        model.unet.conv_in.weight.add_(torch.randn(model.unet.conv_in.weight.shape, generator=generator) * 0.01)
        model.fourier_frequencies.copy_(torch.randn(model.fourier_frequencies.shape, generator=generator))
        for head in (model.vae_modulation, model.unet_modulation):
            for param in head.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def build_base(preset: str, seed: int = 0) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    unet_config, vae_config = PRESETS[preset]
    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config()), AutoencoderKL(**vae_config())


def build_model(preset: str, seed: int = 0, unet: UNet2DConditionModel | None = None, vae: AutoencoderKL | None = None) -> S3DiffModel:
    """A seeded random S3Diff of the preset's layer sizes, with random prompt embeddings."""
    if unet is None or vae is None:
        unet, vae = build_base(preset, seed)
    torch.manual_seed(seed + 1)
    model = S3DiffModel(unet, vae, dict(SCHEDULER_CONFIG))
    generator = torch.Generator().manual_seed(seed + 2)
    _randomize_trained_parts(model, generator)
    with torch.no_grad():
        model.positive_embeds.copy_(torch.randn(model.positive_embeds.shape, generator=generator))
        model.negative_embeds.copy_(torch.randn(model.negative_embeds.shape, generator=generator))
    return model.eval()


def _write_tokenizer(folder: Path) -> int:
    """A byte-level CLIP tokenizer with no merges: every byte is a token. Enough for CLIPTokenizer."""
    # The GPT-2/CLIP byte-to-unicode table: printable bytes map to themselves, the rest to 256+.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    symbols = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "<|endoftext|>"}))
    return len(vocab)


def write_release(folder: str | Path, preset: str = "tiny", seed: int = 0) -> tuple[ReleasedFiles, S3DiffModel]:
    """Write an SD-Turbo-layout folder plus `s3diff.pkl` and `de_net.pth` in the released formats.

    Returns the paths and the model they were written from (prompt embeddings computed from the
    written text encoder), so tests can compare every loaded tensor with what was written.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    from .checkpoints import encode_prompts
    from .config import NEGATIVE_PROMPT, POSITIVE_PROMPT

    folder = Path(folder)
    sd_turbo = folder / "sd-turbo"
    unet, vae = build_base(preset, seed)
    unet.save_pretrained(sd_turbo / "unet")
    vae.save_pretrained(sd_turbo / "vae")
    (sd_turbo / "scheduler").mkdir(parents=True, exist_ok=True)
    (sd_turbo / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "EulerDiscreteScheduler", **SCHEDULER_CONFIG})
    )
    vocab_size = _write_tokenizer(sd_turbo / "tokenizer")
    text_config = tiny_text_config(vocab_size) if preset == "tiny" else sd_turbo_text_config()
    torch.manual_seed(seed + 3)
    CLIPTextModel(CLIPTextConfig(**text_config)).save_pretrained(sd_turbo / "text_encoder")
    model = build_model(preset, seed, unet, vae)
    embeds = encode_prompts(sd_turbo, [POSITIVE_PROMPT, NEGATIVE_PROMPT])
    with torch.no_grad():
        model.positive_embeds.copy_(embeds[:1])
        model.negative_embeds.copy_(embeds[1:])
    files = ReleasedFiles(sd_turbo, folder / "s3diff.pkl", folder / "de_net.pth")
    save_release(model, files.s3diff_pkl, files.de_net_pth)
    return files, model
