"""Training checkpoints: `checkpoints/step-NNNNNNN/` holds
- `s3diff.pkl`: the released format (the model package's `save_release`), loadable with the run's
  SD-Turbo folder and `de_net.pth` (listed in `base.json`);
- `merged/`: the serving format (`save_merged`), what `s3diff serve` / `s3diff upscale` load;
- `training_state.pt`: step, optimizer states and discriminator heads, for `resume_from`.
Only the trained tensors are stored for resuming (the frozen base is rebuilt from its files), so a
checkpoint stays small. A model trained from scratch has no base files and no released form: its
checkpoint is `merged/` plus the whole state dict in `training_state.pt`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from s3diff_serve.model.checkpoints import load_release_into, save_merged, save_release
from s3diff_serve.model.s3diff import S3DiffModel

from .model_setup import BaseFiles

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:07d}"


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = [p for p in (output_dir / "checkpoints").glob("step-*") if STEP_DIR.match(p.name) and (p / "training_state.pt").is_file()]
    return max(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)), default=None)


def save_checkpoint(
    folder: Path, model: S3DiffModel, files: BaseFiles | None, training_state: dict[str, Any], merged_dtype: str,
    pre_resize: str,
) -> None:
    """`pre_resize`: what the run trains with, recorded in the merged config for serving."""
    folder.mkdir(parents=True, exist_ok=True)
    save_merged(model, folder / "merged", dtype=merged_dtype, pre_resize=pre_resize)
    if files is None:
        training_state = {**training_state, "model": model.state_dict()}
    else:
        save_release(model, folder / "s3diff.pkl")
        (folder / "base.json").write_text(json.dumps(
            {"sd_turbo_dir": str(files.sd_turbo_dir), "de_net_pth": str(files.de_net_pth)}, indent=2,
        ))
    # Write the resume state last: its presence marks the checkpoint complete (latest_checkpoint).
    torch.save(training_state, folder / "training_state.pt")


def load_checkpoint(folder: Path, model: S3DiffModel) -> dict[str, Any]:
    """Restore the trained tensors into `model` (through the model package's loader) and return
    the resume state (step, optimizer and discriminator states)."""
    state_path = folder / "training_state.pt"
    if not state_path.is_file():
        raise FileNotFoundError(f"{folder}: not a complete training checkpoint ({state_path.name} missing)")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        if "model" in state:
            model.load_state_dict(state.pop("model"))
        else:
            release = torch.load(folder / "s3diff.pkl", map_location="cpu", weights_only=True)
            load_release_into(model, release, str(folder / "s3diff.pkl"))
    return state
