"""Loading and saving S3Diff weights: the released files (`s3diff.pkl`, `de_net.pth`, an SD-Turbo
folder) and our merged format (a folder of safetensors + config.json).

Every released tensor must be consumed: an unknown or missing key is an error that names the file
and the key, not a silent partial load.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from .config import SCHEDULER_CONFIG, MergedConfig, POSITIVE_PROMPT, NEGATIVE_PROMPT
from .errors import CheckpointError
from .runtime import DTYPES
from .s3diff import S3DiffModel

RELEASE_KEYS = (
    "rank_unet", "rank_vae", "unet_lora_target_modules", "vae_lora_target_modules",
    "state_dict_unet", "state_dict_vae",
    "state_dict_vae_de_mlp", "state_dict_unet_de_mlp", "state_dict_vae_block_mlp",
    "state_dict_unet_block_mlp", "state_dict_vae_fuse_mlp", "state_dict_unet_fuse_mlp",
    "w", "state_embeddings",
)
MERGED_FILES = {
    "unet": "unet.safetensors",
    "vae": "vae.safetensors",
    "de_net": "degradation_estimator.safetensors",
    "modulation": "degradation_lora.safetensors",
    "prompts": "prompt_embeds.safetensors",
}


@dataclass
class ReleasedFiles:
    sd_turbo_dir: Path
    s3diff_pkl: Path
    de_net_pth: Path


# --- released format -----------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many unrelated types on damaged files; all mean "unreadable"
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None


def _load_exact(module: torch.nn.Module, entries: Mapping[str, torch.Tensor], source: str, *, complete: bool) -> None:
    """Copy `entries` into `module`: every key must exist with the same shape; with `complete`,
    every parameter of the module must be given."""
    own = module.state_dict()
    for key, value in entries.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: key {key!r} holds {type(value).__name__}, not a tensor")
        if key not in own:
            raise CheckpointError(f"{source}: unexpected key {key!r} (not in the model)")
        if own[key].shape != value.shape:
            raise CheckpointError(
                f"{source}: key {key!r} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    if complete:
        missing = sorted(set(own) - set(entries))
        if missing:
            raise CheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing)")
    module.load_state_dict(dict(entries), strict=complete)


def _as_layout(entries: Mapping[str, torch.Tensor], sequential: bool) -> dict[str, torch.Tensor]:
    """The reference saves de/block MLPs as `Sequential` (`0.weight`) and fuse MLPs as `Linear`
    (`weight`); accept either spelling for each."""
    out = {}
    for key, value in entries.items():
        bare = key[2:] if key.startswith("0.") else key
        out[f"0.{bare}" if sequential else bare] = value
    return out


def _unet_entries(entries: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """conv_in is stored whole; older saves spell it `conv_in.base_layer.*`."""
    return {k.replace("conv_in.base_layer.", "conv_in."): v for k, v in entries.items()}


def load_release_into(model: S3DiffModel, checkpoint: Mapping[str, Any], source: str) -> None:
    missing = [k for k in RELEASE_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{source}: missing key {missing[0]!r}; is this an S3Diff s3diff.pkl?")
    unexpected = sorted(set(checkpoint) - set(RELEASE_KEYS))
    if unexpected:
        raise CheckpointError(f"{source}: unexpected key {unexpected[0]!r}")
    unet_lora = {k for k in model.unet.state_dict() if "lora_" in k}
    vae_lora = {k for k in model.vae.state_dict() if "lora_" in k}
    unet_entries = _unet_entries(checkpoint["state_dict_unet"])
    for wanted, given, name in ((unet_lora, unet_entries, "state_dict_unet"), (vae_lora, checkpoint["state_dict_vae"], "state_dict_vae")):
        absent = sorted(wanted - set(given))
        if absent:
            raise CheckpointError(f"{source}: {name} lacks key {absent[0]!r} ({len(absent)} missing)")
    _load_exact(model.unet, unet_entries, f"{source}[state_dict_unet]", complete=False)
    _load_exact(model.vae, checkpoint["state_dict_vae"], f"{source}[state_dict_vae]", complete=False)
    for net in ("vae", "unet"):
        head = getattr(model, f"{net}_modulation")
        _load_exact(head.de_mlp, _as_layout(checkpoint[f"state_dict_{net}_de_mlp"], True), f"{source}[state_dict_{net}_de_mlp]", complete=True)
        _load_exact(head.block_mlp, _as_layout(checkpoint[f"state_dict_{net}_block_mlp"], True), f"{source}[state_dict_{net}_block_mlp]", complete=True)
        _load_exact(head.fuse_mlp, _as_layout(checkpoint[f"state_dict_{net}_fuse_mlp"], False), f"{source}[state_dict_{net}_fuse_mlp]", complete=True)
        tables = checkpoint["state_embeddings"]
        table_key = f"state_dict_{net}_block"
        if table_key not in tables:
            raise CheckpointError(f"{source}: state_embeddings lacks {table_key!r}")
        _load_exact(head.block_embeddings, tables[table_key], f"{source}[state_embeddings][{table_key}]", complete=True)
    extra_tables = sorted(set(checkpoint["state_embeddings"]) - {"state_dict_vae_block", "state_dict_unet_block"})
    if extra_tables:
        raise CheckpointError(f"{source}: unexpected key state_embeddings[{extra_tables[0]!r}]")
    frequencies = checkpoint["w"]
    if not isinstance(frequencies, torch.Tensor) or frequencies.shape != model.fourier_frequencies.shape:
        raise CheckpointError(f"{source}: key 'w' must be a tensor of shape {tuple(model.fourier_frequencies.shape)}")
    model.fourier_frequencies.copy_(frequencies)


def load_de_net_into(model: S3DiffModel, path: Path) -> None:
    state = _torch_load(path)
    if isinstance(state, dict) and set(state) & {"params", "params_ema"} and len(state) <= 2:
        state = state.get("params_ema", state.get("params"))  # BasicSR-style wrapper
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    _load_exact(model.de_net, state, str(path), complete=True)


def read_scheduler_config(sd_turbo_dir: Path) -> dict[str, Any]:
    path = sd_turbo_dir / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (is {sd_turbo_dir} an SD-Turbo folder?)")
    stored = json.loads(path.read_text())
    return {k: stored.get(k, v) for k, v in SCHEDULER_CONFIG.items()} | {"clip_sample": False}


@torch.no_grad()
def encode_prompts(sd_turbo_dir: Path, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings (77 tokens, last hidden state) as the reference computes them."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(sd_turbo_dir / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(sd_turbo_dir / "text_encoder").eval()
    ids = tokenizer(prompts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0].float()


@torch.no_grad()
def load_sd_turbo(sd_turbo_dir: str | Path) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """The UNet and VAE of an SD-Turbo diffusers folder (the base every released S3Diff builds on)."""
    try:
        unet = UNet2DConditionModel.from_pretrained(sd_turbo_dir, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(sd_turbo_dir, subfolder="vae")
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{sd_turbo_dir}: cannot load the SD-Turbo unet/vae ({exc}); download stabilityai/sd-turbo from Hugging Face"
        ) from None
    return unet, vae


def load_release(sd_turbo_dir: str | Path, s3diff_pkl: str | Path, de_net_pth: str | Path) -> S3DiffModel:
    """Build S3Diff from the three released inputs a user brings: an SD-Turbo folder, `s3diff.pkl`
    and `de_net.pth` (docs/model.md, "Released files")."""
    sd_turbo_dir, s3diff_pkl, de_net_pth = Path(sd_turbo_dir), Path(s3diff_pkl), Path(de_net_pth)
    checkpoint = _torch_load(s3diff_pkl)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{s3diff_pkl}: expected a dict, found {type(checkpoint).__name__}")
    for key in ("rank_unet", "rank_vae", "unet_lora_target_modules", "vae_lora_target_modules"):
        if key not in checkpoint:
            raise CheckpointError(f"{s3diff_pkl}: missing key {key!r}; is this an S3Diff s3diff.pkl?")
    unet, vae = load_sd_turbo(sd_turbo_dir)
    model = S3DiffModel(
        unet, vae, read_scheduler_config(sd_turbo_dir),
        rank_unet=int(checkpoint["rank_unet"]), rank_vae=int(checkpoint["rank_vae"]),
        unet_targets=list(checkpoint["unet_lora_target_modules"]),
        vae_targets=checkpoint["vae_lora_target_modules"],
    )
    load_release_into(model, checkpoint, str(s3diff_pkl))
    load_de_net_into(model, de_net_pth)
    embeds = encode_prompts(sd_turbo_dir, [POSITIVE_PROMPT, NEGATIVE_PROMPT])
    model.positive_embeds.copy_(embeds[:1])
    model.negative_embeds.copy_(embeds[1:])
    return model.eval()


def release_checkpoint(model: S3DiffModel) -> dict[str, Any]:
    """The `s3diff.pkl` dict exactly as the reference training code writes it."""
    def copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    return {
        "unet_lora_target_modules": list(model.unet_targets),
        "vae_lora_target_modules": model.vae_targets,
        "rank_unet": model.rank_unet,
        "rank_vae": model.rank_vae,
        "state_dict_unet": copy({k: v for k, v in model.unet.state_dict().items() if "lora" in k or "conv_in" in k}),
        "state_dict_vae": copy({k: v for k, v in model.vae.state_dict().items() if "lora" in k or "skip_conv" in k}),
        "state_dict_vae_de_mlp": copy(model.vae_modulation.de_mlp.state_dict()),
        "state_dict_unet_de_mlp": copy(model.unet_modulation.de_mlp.state_dict()),
        "state_dict_vae_block_mlp": copy(model.vae_modulation.block_mlp.state_dict()),
        "state_dict_unet_block_mlp": copy(model.unet_modulation.block_mlp.state_dict()),
        "state_dict_vae_fuse_mlp": copy(model.vae_modulation.fuse_mlp.state_dict()),
        "state_dict_unet_fuse_mlp": copy(model.unet_modulation.fuse_mlp.state_dict()),
        "w": model.fourier_frequencies.detach().cpu().clone(),
        "state_embeddings": {
            "state_dict_vae_block": copy(model.vae_modulation.block_embeddings.state_dict()),
            "state_dict_unet_block": copy(model.unet_modulation.block_embeddings.state_dict()),
        },
    }


def save_release(model: S3DiffModel, s3diff_pkl: str | Path, de_net_pth: str | Path | None = None) -> None:
    torch.save(release_checkpoint(model), s3diff_pkl)
    if de_net_pth is not None:
        torch.save({k: v.detach().cpu().clone() for k, v in model.de_net.state_dict().items()}, de_net_pth)


# --- merged format -------------------------------------------------------------------------
def _merged_tensors(model: S3DiffModel, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    def cast(state: Mapping[str, torch.Tensor], to: torch.dtype | None) -> dict[str, torch.Tensor]:
        return {k: (v.to(to) if to is not None and v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}

    modulation = {f"vae.{k}": v for k, v in model.vae_modulation.state_dict().items()}
    modulation |= {f"unet.{k}": v for k, v in model.unet_modulation.state_dict().items()}
    modulation["fourier_frequencies"] = model.fourier_frequencies
    return {
        "unet": cast(model.unet.state_dict(), dtype),
        "vae": cast(model.vae.state_dict(), dtype),
        "de_net": cast(model.de_net.state_dict(), dtype),
        "modulation": cast(modulation, torch.float32),
        "prompts": cast({"positive": model.positive_embeds, "negative": model.negative_embeds}, torch.float32),
    }


def weights_hash(merged_dir: Path) -> str:
    """sha256 over the tensor files (name and bytes, in a fixed order): the weights id."""
    digest = hashlib.sha256()
    for part in sorted(MERGED_FILES.values()):
        digest.update(part.encode())
        with open(merged_dir / part, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return digest.hexdigest()


def save_merged(model: S3DiffModel, merged_dir: str | Path, dtype: str = "fp16", **config_overrides: Any) -> MergedConfig:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    merged_dir = Path(merged_dir)
    merged_dir.mkdir(parents=True, exist_ok=True)
    for part, tensors in _merged_tensors(model, DTYPES[dtype]).items():
        save_file(tensors, merged_dir / MERGED_FILES[part])
    config = MergedConfig(
        unet={k: v for k, v in dict(model.unet.config).items() if not k.startswith("_")},
        vae={k: v for k, v in dict(model.vae.config).items() if not k.startswith("_")},
        scheduler=dict(model.scheduler_config),
        rank_unet=model.rank_unet,
        rank_vae=model.rank_vae,
        unet_lora_target_modules=list(model.unet_targets),
        vae_lora_target_modules=model.vae_targets,
        dtype=dtype,
        **config_overrides,
    )
    config.weights_id = weights_hash(merged_dir)
    (merged_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list))
    return config


def read_merged_config(merged_dir: str | Path) -> MergedConfig:
    path = Path(merged_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (run `s3diff convert` to create a merged folder)")
    try:
        return MergedConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a valid merged config ({exc})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(path)
    except Exception as exc:  # safetensors raises its own SafetensorError on corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


@torch.no_grad()
def load_merged(merged_dir: str | Path) -> tuple[S3DiffModel, MergedConfig]:
    """Rebuild the model from a merged folder; needs neither text encoder nor tokenizer."""
    merged_dir = Path(merged_dir)
    config = read_merged_config(merged_dir)
    tensors = {part: _read_tensors(merged_dir / name) for part, name in MERGED_FILES.items()}
    prompts = tensors["prompts"]
    # Build on the meta device: random init of 866M parameters would be thrown away anyway.
    with torch.device("meta"):
        model = S3DiffModel.from_configs(
            config.unet, config.vae, config.scheduler,
            rank_unet=config.rank_unet, rank_vae=config.rank_vae,
            unet_targets=config.unet_lora_target_modules, vae_targets=config.vae_lora_target_modules,
            text_embed_dim=prompts["positive"].shape[-1],
        )
    modulation = tensors["modulation"]
    parts = {
        "unet": (model.unet, tensors["unet"]),
        "vae": (model.vae, tensors["vae"]),
        "de_net": (model.de_net, tensors["de_net"]),
        "modulation": (model.vae_modulation, {k[4:]: v for k, v in modulation.items() if k.startswith("vae.")}),
    }
    for part, (module, state) in parts.items():
        _check_exact(module, state, merged_dir / MERGED_FILES[part])
        module.load_state_dict(state, strict=True, assign=True)
    unet_heads = {k[5:]: v for k, v in modulation.items() if k.startswith("unet.")}
    _check_exact(model.unet_modulation, unet_heads, merged_dir / MERGED_FILES["modulation"])
    model.unet_modulation.load_state_dict(unet_heads, strict=True, assign=True)
    model.fourier_frequencies = modulation["fourier_frequencies"]
    model.positive_embeds, model.negative_embeds = prompts["positive"], prompts["negative"]
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{merged_dir}: tensor {leftover[0]!r} was not in the merged files")
    return model.eval(), config


def _check_exact(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Path) -> None:
    own = module.state_dict()
    for key in sorted(set(own) ^ set(state)):
        kind = "missing" if key in own else "unexpected"
        raise CheckpointError(f"{source}: {kind} key {key!r}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
