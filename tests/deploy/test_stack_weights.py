"""`weights-init` for real, offline: tiny release-format files (the project's own writer) mounted
where docker-compose.yml takes them (RELEASE_DIR) are converted into the weights volume, the `cpu`
profile's service serves them, and a second start finds them and skips the conversion.
Container engine required, as in test_stack.py."""
from __future__ import annotations

import httpx
import pytest
import torch

from s3diff_serve.model.checkpoints import load_release, save_merged
from s3diff_serve.model.presets import write_release

from .stack import ComposeStack

SERVICE = "s3diff-cpu"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(folder of tiny release files, the weights id `s3diff convert --dtype fp16` gives them)."""
    folder = tmp_path_factory.mktemp("release")
    torch.manual_seed(0)
    files, _ = write_release(folder, preset="tiny", seed=0)
    expected = save_merged(load_release(files.sd_turbo_dir, files.s3diff_pkl, files.de_net_pth),
                           tmp_path_factory.mktemp("merged"), dtype="fp16").weights_id
    for path in [folder, *folder.rglob("*")]:  # readable by the image's non-root user
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder, expected


@pytest.fixture(scope="module")
def stack(images, release):
    # Compiling the tiny model at warm-up would only add minutes here; S3DIFF_COMPILE is the
    # compose file's own knob.
    running = ComposeStack("s3diff-weightstest", "cpu", *images,
                           env={"RELEASE_DIR": str(release[0]), "S3DIFF_COMPILE": "off"})
    running.down()
    try:
        yield running
    finally:
        running.down()


def test_weights_init_converts_mounted_release_files_and_the_cpu_profile_serves_them(stack, release):
    stack.compose("up", "-d", "--no-build", SERVICE)
    stack.wait_healthy(SERVICE)
    assert stack.inspect("weights-init", "{{.State.ExitCode}}") == "0"
    assert "wrote /weights/merged" in stack.logs("weights-init")
    model = httpx.get(f"{stack.url}/v1/model", timeout=10).json()
    assert (model["weights"], model["weights_id"]) == ("/weights/merged", release[1])


def test_second_start_skips_the_conversion(stack, release):
    stack.compose("down")  # containers go, the weights volume stays
    stack.compose("up", "-d", "--no-build", SERVICE)
    stack.wait_healthy(SERVICE)
    log = stack.logs("weights-init")
    assert "merged weights present" in log and "wrote" not in log
    assert httpx.get(f"{stack.url}/v1/model", timeout=10).json()["weights_id"] == release[1]
