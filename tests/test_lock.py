"""requirements/lock.txt and pyproject.toml agree: every dependency pyproject names (all extras) is
pinned in the lock at a version its range admits, the lock pins nothing twice, and torch, which
the lock leaves out, is pinned to one release everywhere it is installed."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCK = (REPO / "requirements" / "lock.txt").read_text()
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])


def locked_versions() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", LOCK, flags=re.MULTILINE)
    names = [canonicalize_name(name) for name, _ in pins]
    assert len(names) == len(set(names)), "a package is pinned twice"
    return {canonicalize_name(name): version for name, version in pins}


def declared_requirements() -> list[Requirement]:
    texts = list(PYPROJECT["project"]["dependencies"])
    for extra in PYPROJECT["project"]["optional-dependencies"].values():
        texts += extra
    return [req for req in map(Requirement, texts) if canonicalize_name(req.name) != PROJECT]


def test_every_declared_dependency_is_locked_within_its_range():
    locked = locked_versions()
    for req in declared_requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            continue
        assert name in locked, f"{req.name} is in pyproject.toml but not in the lock: run scripts/lock.sh"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"lock pins {req.name}=={locked[name]}, outside pyproject's {req.specifier}: run scripts/lock.sh")


def test_every_lock_pin_has_hashes():
    blocks = re.split(r"\n(?=[A-Za-z0-9_.\-]+==)", LOCK)
    for block in blocks[1:]:
        assert "--hash=sha256:" in block, block.splitlines()[0]


def test_torch_is_left_out_of_the_lock_and_pinned_to_one_release():
    assert "torch" not in locked_versions()
    (torch,) = [req for req in declared_requirements() if canonicalize_name(req.name) == "torch"]
    (pin,) = torch.specifier
    assert pin.operator == "=="
    install_script = (REPO / "scripts" / "install-dev.sh").read_text()
    assert f'"torch=={pin.version}"' in install_script  # the images' pins: tests/deploy/test_dockerfiles.py
