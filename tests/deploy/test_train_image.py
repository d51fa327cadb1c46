"""The training image for real: built from docker/train.Dockerfile on the local Debian base, it
runs `s3diff train` on the tiny config (mounted into the image's config folder) to the end, and the
checkpoint lands in the runs folder mounted from the host. Container engine required."""
from __future__ import annotations

import subprocess

import yaml

from s3diff_serve.training.checkpointing import checkpoint_dir

from .images import REPO_ROOT, SERVICE_BASE, build

TRAIN_IMAGE = "s3diff-train:stack-test"
STEPS = 2


def test_train_image_trains_the_tiny_config_into_a_host_folder(images, tmp_path):
    build("train.Dockerfile", TRAIN_IMAGE, SERVICE_BASE.tag())  # the `images` fixture made the base
    config = yaml.safe_load((REPO_ROOT / "training" / "configs" / "tiny.yaml").read_text())
    config.update(max_steps=STEPS, checkpoint_every=STEPS)
    config_file = tmp_path / "ci.yaml"
    config_file.write_text(yaml.safe_dump(config))
    config_file.chmod(0o644)
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)  # the image's user (uid 10001) writes there
    result = subprocess.run(
        ["docker", "run", "--rm", "-e", "HF_HUB_OFFLINE=1",
         # The config goes beside the image's own, so its relative data paths resolve the same way.
         "-v", f"{config_file}:/workspace/training/configs/ci.yaml:ro", "-v", f"{runs}:/workspace/runs",
         TRAIN_IMAGE, "train", "--config", "training/configs/ci.yaml"],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = runs / "tiny"  # tiny.yaml's output_dir, ../../runs/tiny from the config folder
    checkpoint = checkpoint_dir(output, STEPS)
    assert (checkpoint / "merged" / "config.json").is_file() and (checkpoint / "s3diff.pkl").is_file()
    rows = (output / "train_log.csv").read_text().strip().splitlines()
    assert [int(row.split(",")[0]) for row in rows[1:]] == list(range(1, STEPS + 1))
