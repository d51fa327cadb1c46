"""Numbers of the released S3Diff model (docs/model.md, "Numbers at a glance") and the
architecture presets we build from."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

POSITIVE_PROMPT = (
    "A high-resolution, 8K, ultra-realistic image with sharp focus, vibrant colors, and natural lighting."
)
NEGATIVE_PROMPT = (
    "oil painting, cartoon, blur, dirty, messy, low quality, deformation, low resolution, oversmooth"
)
DEFAULT_GUIDANCE = 1.07  # reference code (the paper says 1.1)
TIMESTEP = 999
SCALE = 4  # the model always works at x4; other output sizes resample its output
MIN_SCALE = 1.0  # SR never shrinks
MAX_SCALE = 8.0  # past x8 the x4 output would be stretched more than 2x by a plain filter
PAD_MULTIPLE = 64
DEFAULT_TILE = 96  # latent tile side (768 image pixels), as the reference
MIN_TILE = 32


# How the low-res input is brought to x4 before the VAE sees it. A property of a set of weights
# (MergedConfig.pre_resize): serving must resize as training did. The released weights need
# bilinear (the reference inference code's resize); the paper's training code feeds bicubic.
PRE_RESIZE_MODES = ("bilinear", "bicubic")


def latent_factor(vae_config: dict[str, Any]) -> int:
    """The VAE's spatial factor (image pixels per latent pixel): each encoder level after the
    first halves the resolution, so 2 ** (levels - 1) (SD's four levels: 8)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def validate_tile_size(tile: int, latent_factor: int | None = None) -> int:
    """A latent tile side must be at least MIN_TILE and a multiple of the weights' latent factor
    (None: the weights are not known yet, e.g. when a flag is parsed; only the lower bound)."""
    if tile < MIN_TILE or (latent_factor is not None and tile % latent_factor):
        multiple = f"a multiple of {latent_factor} and " if latent_factor is not None else ""
        raise ValueError(f"tile size must be {multiple}at least {MIN_TILE}, got {tile}")
    return tile

UNET_LORA_TARGETS = [
    "to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut",
    "conv_out", "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj",
]
VAE_LORA_TARGETS = r"^encoder\..*(conv1|conv2|conv_in|conv_shortcut|conv|conv_out|to_k|to_q|to_v|to_out\.0)$"
UNET_ADAPTER = "default"
VAE_ADAPTER = "vae_skip"
FOURIER_SIZE = 64
UNET_BLOCKS = 10
VAE_BLOCKS = 6

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}


@dataclass
class TilingConfig:
    """Tiling defaults (docs/model.md, "Tiling"): one latent tile side drives all three stages
    (the VAE works on the same tiles, x latent factor in pixels); the overlap follows from it (a
    third, `tiling.overlap_for`)."""

    latent_tile: int = DEFAULT_TILE


@dataclass
class MergedConfig:
    """Everything needed to rebuild the model from a merged folder, saved as its config.json."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    rank_unet: int = 32
    rank_vae: int = 16
    unet_lora_target_modules: list[str] = field(default_factory=lambda: list(UNET_LORA_TARGETS))
    vae_lora_target_modules: str = VAE_LORA_TARGETS
    positive_prompt: str = POSITIVE_PROMPT
    negative_prompt: str = NEGATIVE_PROMPT
    guidance_scale: float = DEFAULT_GUIDANCE
    color_fix: str = "wavelet"
    pre_resize: str = "bilinear"  # PRE_RESIZE_MODES: what the weights were trained with
    tiling: TilingConfig = field(default_factory=TilingConfig)
    dtype: str = "fp32"
    model_name: str = "s3diff"
    weights_id: str = ""

    def __post_init__(self) -> None:
        if self.pre_resize not in PRE_RESIZE_MODES:
            raise ValueError(f"pre_resize must be one of {', '.join(PRE_RESIZE_MODES)}, got {self.pre_resize!r}")

    @property
    def latent_factor(self) -> int:
        """Derived from the VAE config; written to config.json for readers, never read back."""
        return latent_factor(self.vae)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"latent_factor": self.latent_factor}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MergedConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        tiling_fields = {f.name for f in dataclasses.fields(TilingConfig)}
        values["tiling"] = TilingConfig(**{k: v for k, v in values.get("tiling", {}).items() if k in tiling_fields})
        config = cls(**values)
        if "latent_factor" in data and data["latent_factor"] != config.latent_factor:
            raise ValueError(f"latent_factor {data['latent_factor']} does not match the VAE config "
                             f"({len(config.vae['block_out_channels'])} levels: {config.latent_factor})")
        return config


def sd_turbo_unet_config() -> dict[str, Any]:
    """SD 2.1 UNet (what SD-Turbo ships)."""
    return {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
        "norm_num_groups": 32,
    }


def sd_turbo_vae_config() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 768,
        "scaling_factor": 0.18215,
    }


def sd_turbo_text_config() -> dict[str, Any]:
    """OpenCLIP-H text tower as SD 2.x uses it."""
    return {
        "vocab_size": 49408,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 1024,
    }


def tiny_unet_config() -> dict[str, Any]:
    """Same block classes and block count as SD 2.1 (so block ids 0..9 all occur), small channels."""
    cfg = sd_turbo_unet_config()
    cfg.update(
        sample_size=8,
        block_out_channels=[32, 64, 64, 64],
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=[1, 2, 2, 2],
    )
    return cfg


def tiny_vae_config() -> dict[str, Any]:
    cfg = sd_turbo_vae_config()
    cfg.update(block_out_channels=[32, 32, 64, 64], layers_per_block=1, sample_size=64)
    return cfg


def tiny_f4_vae_config() -> dict[str, Any]:
    """The tiny VAE one level shallower (latent factor 4), for tests of other latent factors."""
    cfg = tiny_vae_config()
    cfg.update(block_out_channels=[32, 32, 64], down_block_types=["DownEncoderBlock2D"] * 3,
               up_block_types=["UpDecoderBlock2D"] * 3)
    return cfg


def tiny_text_config(vocab_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 32,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


DEMO_LATENT_CHANNELS = 16  # factor-8 latent of a x4-upscaled input: 16 channels hold the LR's detail


def demo_unet_config() -> dict[str, Any]:
    """The built-in demo model's UNet: the tiny preset's blocks over the demo's 16-channel latent,
    trained from scratch on a CPU (training/configs/demo.yaml)."""
    cfg = tiny_unet_config()
    cfg.update(sample_size=16, in_channels=DEMO_LATENT_CHANNELS, out_channels=DEMO_LATENT_CHANNELS)
    return cfg


def demo_vae_config() -> dict[str, Any]:
    cfg = sd_turbo_vae_config()
    cfg.update(block_out_channels=[32, 64, 96, 96], layers_per_block=1, latent_channels=DEMO_LATENT_CHANNELS,
               norm_num_groups=16, sample_size=128)
    return cfg


def demo_f4_vae_config() -> dict[str, Any]:
    """The demo VAE one level shallower: latent factor 4, so on a x4-upscaled input the latent
    sits at the low-res image's own resolution instead of half of it."""
    cfg = demo_vae_config()
    cfg.update(block_out_channels=[32, 64, 96], down_block_types=["DownEncoderBlock2D"] * 3,
               up_block_types=["UpDecoderBlock2D"] * 3)
    return cfg


PRESETS = {
    "tiny": (tiny_unet_config, tiny_vae_config),
    "demo": (demo_unet_config, demo_vae_config),
    "demo-f4": (demo_unet_config, demo_f4_vae_config),
    "tiny-f4": (tiny_unet_config, tiny_f4_vae_config),
    "sd-turbo": (sd_turbo_unet_config, sd_turbo_vae_config),
}
