"""S3Diff one-step super-resolution: the model package shared by the service and training."""
from .config import MergedConfig
from .errors import CheckpointError, InvalidInputError, NonFiniteOutputError, S3DiffError
from .options import UpscaleOptions
from .pipeline import DegradationScores, EnhanceResult, S3DiffPipeline, UpscalePlan

__all__ = [
    "CheckpointError", "DegradationScores", "EnhanceResult", "InvalidInputError", "MergedConfig",
    "NonFiniteOutputError", "S3DiffError", "S3DiffPipeline", "UpscaleOptions", "UpscalePlan",
]
