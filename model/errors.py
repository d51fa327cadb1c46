"""Every typed error of the model package, in one place, so callers (CLI, service) can map each one
to a clear message or status."""


class S3DiffError(Exception):
    """Base class of every error the model package raises on purpose."""


class CheckpointError(S3DiffError):
    """A weights file is missing, unreadable, or does not fit the architecture (names file and key)."""


class NonFiniteOutputError(S3DiffError):
    """The model produced NaN/Inf values (typically fp16 overflow); retry in fp32."""


class InvalidInputError(S3DiffError, ValueError):
    """An argument or image the caller passed is out of range or of the wrong shape."""


class UnsupportedImageError(InvalidInputError):
    """The bytes are not an image in a format we accept (PNG, JPEG, WebP, TIFF, BMP, GIF)."""


class CorruptImageError(InvalidInputError):
    """The bytes start like an accepted image format but cannot be decoded (corrupt or truncated)."""


class ImageTooLargeError(InvalidInputError):
    """The header declares more pixels than allowed. Raised before any pixel is decoded, which is
    what refuses decompression bombs (a small file declaring a huge image)."""


class TilingOutOfMemoryError(S3DiffError):
    """The device ran out of memory even with the smallest tile size."""
