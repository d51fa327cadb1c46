"""Typed errors of the model package, so callers (CLI, service) can map them to clear messages."""


class S3DiffError(Exception):
    """Base class of every error the model package raises on purpose."""


class CheckpointError(S3DiffError):
    """A weights file is missing, unreadable, or does not fit the architecture (names file and key)."""


class NonFiniteOutputError(S3DiffError):
    """The model produced NaN/Inf values (typically fp16 overflow); retry in fp32."""


class InvalidInputError(S3DiffError, ValueError):
    """An argument or image the caller passed is out of range or of the wrong shape."""
