"""The two images: hadolint-clean, built from the same package and torch pin as pyproject.toml,
and the service image runs `s3diff serve` as a non-root user with a /readyz health check."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from dockerfile_parse import DockerfileParser

from .deploy_helpers import DOCKER_DIR, DOCKERFILES, REPO_ROOT, pip_tool, run_tool, settings_env_names

SERVICE_DOCKERFILE = DOCKER_DIR / "service.Dockerfile"
TRAIN_DOCKERFILE = DOCKER_DIR / "train.Dockerfile"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def instructions(dockerfile) -> list[dict]:
    return [i for i in DockerfileParser(path=str(dockerfile)).structure if i["instruction"] != "COMMENT"]


def final_stage(dockerfile) -> list[dict]:
    """Instructions of the stage that becomes the image (after the last FROM)."""
    steps = instructions(dockerfile)
    last_from = max(index for index, step in enumerate(steps) if step["instruction"] == "FROM")
    return steps[last_from + 1:]


def values(steps: list[dict], instruction: str) -> list[str]:
    return [step["value"] for step in steps if step["instruction"] == instruction]


def test_both_dockerfiles_exist():
    assert DOCKERFILES == [SERVICE_DOCKERFILE, TRAIN_DOCKERFILE]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_hadolint_is_clean(dockerfile):
    result = run_tool([pip_tool("hadolint"), "--config", str(DOCKER_DIR / "hadolint.yaml"), str(dockerfile)])
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_image_runs_as_non_root_numeric_user(dockerfile):
    # Numeric so that Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
    (user,) = values(final_stage(dockerfile), "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_torch_pin_matches_pyproject(dockerfile):
    (project_pin,) = [dep for dep in PYPROJECT["project"]["dependencies"] if dep.startswith("torch")]
    image_pins = re.findall(r"torch==[\w.+]+", " ".join(values(instructions(dockerfile), "RUN")))
    assert image_pins == [project_pin]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_every_package_of_the_project_is_copied(dockerfile):
    packages = {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {value.split()[0] for value in values(instructions(dockerfile), "COPY") if not value.startswith("--from")}
    assert packages <= copied
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", "weights"} <= ignored  # never send VCS history or local weights as build context
    for source in copied:
        for name in source.split():
            assert (REPO_ROOT / name).exists() and name not in ignored, name


def test_service_image_serves_from_the_weights_volume():
    steps = final_stage(SERVICE_DOCKERFILE)
    assert json.loads(values(steps, "VOLUME")[0]) == ["/weights"]
    env = " ".join(values(steps, "ENV"))
    assert re.search(r"S3DIFF_WEIGHTS=/weights/\S+", env)
    assert "S3DIFF_HOST=0.0.0.0" in env  # the settings default (127.0.0.1) is unreachable from outside
    command = json.loads(values(steps, "ENTRYPOINT")[0]) + json.loads(values(steps, "CMD")[0])
    assert command[:2] == ["s3diff", "serve"]


def test_service_healthcheck_probes_readyz():
    (healthcheck,) = values(final_stage(SERVICE_DOCKERFILE), "HEALTHCHECK")
    assert "/readyz" in healthcheck and "--start-period=" in healthcheck


def test_train_image_installs_the_training_extra():
    assert "train" in PYPROJECT["project"]["optional-dependencies"]
    assert any(re.search(r"pip install \S*\[train\]", run) for run in values(instructions(TRAIN_DOCKERFILE), "RUN"))


def test_service_image_environment_names_are_settings():
    env = " ".join(values(final_stage(SERVICE_DOCKERFILE), "ENV"))
    names = set(re.findall(r"\b(S3DIFF_\w+)=", env))
    assert names and names <= settings_env_names()


def test_package_builds_from_exactly_what_the_image_copies(tmp_path):
    """The builder stage's COPY set, built into a wheel offline: it holds every package, the static
    page and the `s3diff` entry point the image runs."""
    context = tmp_path / "src"
    context.mkdir()
    copies = [copy.split()[:-1] for copy in values(instructions(SERVICE_DOCKERFILE), "COPY")
              if not copy.startswith("--from")]
    for sources in copies:
        for source in sources:
            if (REPO_ROOT / source).is_dir():
                shutil.copytree(REPO_ROOT / source, context / source, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(REPO_ROOT / source, context / source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(context)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == packages
    assert "service/static/index.html" in names
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    assert "s3diff = cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
