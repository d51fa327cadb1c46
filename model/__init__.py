"""S3Diff one-step super-resolution: the model package shared by the service and training.

The public names load on first use (PEP 562), so importing a torch-free module of the package
(`s3diff_serve.model.options`, `.config`, `.errors`) does not import torch and the pipeline.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "MergedConfig": "config",
    "CheckpointError": "errors", "InvalidInputError": "errors", "NonFiniteOutputError": "errors",
    "S3DiffError": "errors",
    "UpscaleOptions": "options",
    "DegradationScores": "pipeline", "EnhanceResult": "pipeline", "S3DiffPipeline": "pipeline",
    "UpscalePlan": "pipeline",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what static tools and IDEs see; at run time __getattr__ imports on demand
    from .config import MergedConfig
    from .errors import CheckpointError, InvalidInputError, NonFiniteOutputError, S3DiffError
    from .options import UpscaleOptions
    from .pipeline import DegradationScores, EnhanceResult, S3DiffPipeline, UpscalePlan


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
