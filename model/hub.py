"""Fetching the released files in a user's environment. Only called behind `--download`; tests
never reach the network (HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

SD_TURBO_PATTERNS = ["unet/*", "vae/*", "text_encoder/*", "tokenizer/*", "scheduler/*", "model_index.json"]


def fetch_sd_turbo(repo_or_dir: str) -> Path:
    """A local folder is used as is; anything else is a Hugging Face repo id (e.g. stabilityai/sd-turbo)."""
    if Path(repo_or_dir).is_dir():
        return Path(repo_or_dir)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_or_dir, allow_patterns=SD_TURBO_PATTERNS))


def fetch_file(spec: str, default_filename: str, cache_dir: Path) -> Path:
    """A local file, an https URL, or `owner/repo[:filename]` on the Hugging Face Hub."""
    if Path(spec).is_file():
        return Path(spec)
    if spec.startswith("https://"):
        target = cache_dir / default_filename
        cache_dir.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(spec) as response, open(target, "wb") as handle:  # noqa: S310 (https only)
            shutil.copyfileobj(response, handle)
        return target
    from huggingface_hub import hf_hub_download

    repo_id, _, filename = spec.partition(":")
    return Path(hf_hub_download(repo_id, filename or default_filename))
