"""Training settings: one pydantic-settings class read from a YAML file (env overrides with prefix
`S3DIFF_TRAIN_`, nested with `__`, e.g. `S3DIFF_TRAIN_OPTIM__LR=1e-5`).

Defaults are the recipe of the S3Diff paper and reference code; `training/configs/paper.yaml` spells them
out and `training/configs/tiny.yaml` shrinks everything for a CPU smoke run. Relative paths in a
YAML file are resolved against the file's folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from s3diff_serve.model.config import PRE_RESIZE_MODES, PRESETS
from s3diff_serve.model.builtin import BUILTIN_DIR, BUILTIN_NAME

Range = tuple[float, float]
KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BlurStage(Section):
    """Random blur kernel of one Real-ESRGAN stage: sizes are odd, 7..kernel_size_max."""

    probability: float = Field(1.0, ge=0, le=1)
    kernel_size_max: int = 21
    kernel_probs: list[float] = [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]  # in KERNEL_TYPES order
    sigma: Range = (0.2, 3.0)
    betag: Range = (0.5, 4.0)
    betap: Range = (1.0, 2.0)
    sinc_probability: float = Field(0.1, ge=0, le=1)

    @field_validator("kernel_size_max")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value < 7 or value % 2 == 0:
            raise ValueError(f"kernel_size_max must be odd and >= 7, got {value}")
        return value

    @field_validator("kernel_probs")
    @classmethod
    def _six(cls, value: list[float]) -> list[float]:
        if len(value) != len(KERNEL_TYPES) or min(value) < 0 or sum(value) <= 0:
            raise ValueError(f"kernel_probs needs {len(KERNEL_TYPES)} non-negative weights ({', '.join(KERNEL_TYPES)})")
        return value


class NoiseStage(Section):
    gaussian_probability: float = Field(0.5, ge=0, le=1)
    gaussian_sigma: Range = (1.0, 15.0)  # on the 0..255 scale
    poisson_scale: Range = (0.05, 2.0)
    gray_probability: float = Field(0.4, ge=0, le=1)


class ResizeStage(Section):
    probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    range: Range = (0.3, 1.5)


class DegradationConfig(Section):
    """Real-ESRGAN two-stage degradation with the numbers of S3Diff's reference training code."""

    scale: int = 4
    blur1: BlurStage = BlurStage()
    resize1: ResizeStage = ResizeStage()
    noise1: NoiseStage = NoiseStage()
    jpeg1: Range = (60.0, 95.0)
    blur2: BlurStage = BlurStage(probability=0.5, kernel_size_max=11, sigma=(0.2, 1.5))
    resize2: ResizeStage = ResizeStage(probs=(0.3, 0.4, 0.3), range=(0.6, 1.2))
    noise2: NoiseStage = NoiseStage(gaussian_sigma=(1.0, 12.0), poisson_scale=(0.05, 1.0))
    jpeg2: Range = (60.0, 100.0)
    final_sinc_probability: float = Field(0.8, ge=0, le=1)
    final_sinc_kernel_size_max: int = 21
    # Share of samples that get only the bicubic x1/scale downscale (scores 0, 0): the clean case
    # the model must handle too. The paper trains on the full pipeline only (0).
    clean_probability: float = Field(0.0, ge=0, le=1)


class ModelSource(Section):
    """Either real SD-Turbo weights (+ de_net.pth, optionally an s3diff.pkl to start from) or a
    seeded random `preset` written to `<output_dir>/base` (tiny: CPU smoke runs and tests)."""

    preset: Literal[tuple(PRESETS)] | None = None
    sd_turbo_dir: Path | None = None
    de_net_pth: Path | None = None
    init_s3diff_pkl: Path | None = None
    rank_unet: int = 32
    rank_vae: int = 16
    gradient_checkpointing: bool = False
    # From scratch (the built-in demo model): every weight trains, the estimator included, starting
    # from the preset's seeded random weights; no released files are read or written.
    train_all: bool = False
    # train_all only: start from these merged weights instead of random ones; the name
    # `builtin-demo` means the built-in model shipped in the package (found the same way in a
    # checkout and in the training image). Weights of another VAE depth start what fits
    # (model_setup.init_from_merged).
    init_merged: Path | None = None
    # The x4 resize of the low-res input (bilinear | bicubic), recorded in every saved merged
    # config so serving resizes as training did. None: init_merged's own, else bicubic (the
    # paper's training code).
    pre_resize: Literal[PRE_RESIZE_MODES] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "ModelSource":
        if self.train_all and self.preset is None:
            raise ValueError("model: train_all builds the model from scratch and needs a `preset` (its layer sizes)")
        if self.preset is None and (self.sd_turbo_dir is None or self.de_net_pth is None):
            raise ValueError(
                "model: give `sd_turbo_dir` (Hugging Face stabilityai/sd-turbo) and `de_net_pth` "
                "(the MM-RealSR estimator shipped with S3Diff), or a random `preset` for smoke runs"
            )
        return self


class DataConfig(Section):
    hr_dirs: list[Path]
    face_dirs: list[Path] = []
    face_share: float = Field(0.0, ge=0, lt=1)  # fraction of samples drawn from face_dirs
    crop_size: int = 512
    flip: bool = True
    num_workers: int = 4
    resident: bool = False  # keep decoded photos in memory (small corpora, small crops)
    prescale: float = Field(1.0, gt=0, le=1)  # Lanczos-shrink photos first: more structure per crop

    @model_validator(mode="after")
    def _faces(self) -> "DataConfig":
        if self.face_share > 0 and not self.face_dirs:
            raise ValueError("data: face_share > 0 needs face_dirs")
        if self.crop_size % 64:
            raise ValueError(f"data: crop_size must be a multiple of 64 (the model pads to 64), got {self.crop_size}")
        return self


class LossConfig(Section):
    mse_weight: float = 2.0
    l1_weight: float = 0.0
    lpips_weight: float = 5.0
    gan_weight: float = 0.5
    # Supervise the estimator with the scores of the degradation actually applied (train_all only).
    estimator_weight: float = 0.0
    # Compare through the inference path's colour fix (the output's low frequencies come from the
    # input there, so training them is wasted capacity); the paper compares raw outputs ("none").
    color_fix: Literal["none", "wavelet"] = "none"
    # LPIPS-VGG16 with the real ImageNet backbone and v0.1 heads, from the metric weights cache
    # (`s3diff weights fetch-metrics`). random_weights: tests/smoke runs only.
    random_weights: bool = False


class DiscriminatorConfig(Section):
    """Vision-aided discriminator: frozen DINO ViT + trainable heads on three feature levels."""

    dino_path: Path | None = None  # a transformers ViT folder, e.g. facebook/dino-vitb16
    random_vit: dict[str, Any] | None = None  # tests/smoke runs: a ViTConfig for a random backbone
    feature_layers: tuple[int, int, int] = (5, 9, 12)  # hidden_states indices: blocks 4, 8, 11 of ViT-B
    head_channels: int = 128
    real_label: float = 0.8  # "multilevel_sigmoid_s": one-sided label smoothing
    diffaug: bool = True
    lr: float = 2e-5

    @model_validator(mode="after")
    def _backbone(self) -> "DiscriminatorConfig":
        if self.dino_path is None and self.random_vit is None:
            raise ValueError(
                "discriminator: set `dino_path` to a local transformers ViT folder of DINO ViT-B/16 "
                "(`huggingface-cli download facebook/dino-vitb16 --local-dir ...`), or `random_vit` for smoke runs"
            )
        return self


class OptimConfig(Section):
    lr: float = 2e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    # From scratch, the UNet's eps is amplified ~15x by the t=999 step: it waits (lr 0) until the
    # VAE has learned to reconstruct, then trains at lr * unet_lr_scale.
    unet_start_step: int = 0
    unet_lr_scale: float = Field(1.0, gt=0)
    # Optional linear decay of every group's lr from `decay_start_step` down to
    # lr * final_lr_fraction at max_steps (a finishing stage settles instead of jittering).
    decay_start_step: int | None = None
    final_lr_fraction: float = Field(0.1, ge=0, le=1)

    def lr_factor(self, step: int, max_steps: int) -> float:
        """The multiplier on the base lr at `step`: 1 until the decay starts, then linear."""
        if self.decay_start_step is None or step <= self.decay_start_step:
            return 1.0
        progress = min(1.0, (step - self.decay_start_step) / max(1, max_steps - self.decay_start_step))
        return 1.0 - progress * (1.0 - self.final_lr_fraction)


class TrainConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="S3DIFF_TRAIN_", env_nested_delimiter="__", extra="forbid")

    output_dir: Path
    seed: int = 0
    model: ModelSource
    data: DataConfig
    degradation: DegradationConfig = DegradationConfig()
    losses: LossConfig
    discriminator: DiscriminatorConfig | None = None  # needed when losses.gan_weight > 0
    optim: OptimConfig = OptimConfig()
    negative_prompt_probability: float = Field(0.05, ge=0, le=1)
    batch_size: int = 4
    grad_accum_steps: int = 4
    max_steps: int = 30000
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    checkpoint_every: int = 1000
    merged_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    log_every: int = 10
    resume_from: Path | None = None  # a checkpoint folder, or "latest" under output_dir
    # What conditions the modulation while training: the estimator's scores (the paper) or the
    # scores of the degradation actually applied, which gives the noise/blur knobs their meaning.
    scores_from: Literal["estimator", "applied"] = "estimator"

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.losses.gan_weight > 0 and self.discriminator is None:
            raise ValueError("discriminator: required when losses.gan_weight > 0 (set gan_weight: 0 to train without)")
        if self.losses.estimator_weight > 0 and not self.model.train_all:
            raise ValueError("losses.estimator_weight needs model.train_all (the released estimator stays frozen)")
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_settings, init_settings  # the environment overrides the YAML file

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config file not found")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls(**_resolve_paths(values, path.parent))


PATH_KEYS = {"output_dir", "sd_turbo_dir", "de_net_pth", "init_s3diff_pkl", "init_merged", "hr_dirs", "face_dirs",
             "dino_path", "resume_from"}


def _resolve_paths(values: Any, base: Path, key: str = "") -> Any:
    if isinstance(values, dict):
        return {k: _resolve_paths(v, base, k) for k, v in values.items()}
    if key in PATH_KEYS and isinstance(values, list):
        return [_resolve_paths(v, base, key) for v in values]
    if key == "init_merged" and values == BUILTIN_NAME:
        return str(BUILTIN_DIR)
    if key in PATH_KEYS and isinstance(values, str) and values != "latest":
        path = Path(values).expanduser()
        return os.path.normpath(path if path.is_absolute() else base / path)
    return values
