"""The project's one cache folder (torch-free): converted metric weights and compiled graphs both
live under it, so the model package owns the rule and evaluation reuses it."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "S3DIFF_CACHE"


def cache_dir() -> Path:
    """`$S3DIFF_CACHE`, or `~/.cache/s3diff-serve` (XDG_CACHE_HOME respected)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "s3diff-serve"
