"""The upscale request contract: every knob a caller may set on one upscale, with its range.

One typed model (pydantic) serves the Python API, `s3diff upscale`, the HTTP routes and the job
API: the HTTP layer parses query/form fields into it and the CLI parses flags into it, so a range,
a name or a default is written here and nowhere else.
"""
from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from s3diff_serve.model.config import MAX_SCALE, MIN_SCALE, SCALE
from s3diff_serve.model.errors import InvalidInputError

ColorFix = Literal["wavelet", "adain", "none"]
OutputFormat = Literal["png", "jpeg", "webp"]
COLOR_FIXES: tuple[str, ...] = get_args(ColorFix)
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)
SCORE_RANGE = (0.0, 1.0)  # noise and blur scores, as the estimator outputs them
MAX_GUIDANCE = 20.0
DEFAULT_QUALITY = 95  # JPEG/WebP quality when the request names none


class UpscaleOptions(BaseModel):
    """One upscale's knobs. Output size: give at most one of `scale`, `width`/`height` (one alone
    keeps the aspect ratio) or `longest_side`; none means the model's own x4."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: float | None = Field(None, allow_inf_nan=False, ge=MIN_SCALE, le=MAX_SCALE,
                                description=f"output scale (default {SCALE}, the model's own; others resize its output)")
    width: int | None = Field(None, ge=1, description="output width in pixels (alone: keeps the aspect ratio)")
    height: int | None = Field(None, ge=1, description="output height in pixels (alone: keeps the aspect ratio)")
    longest_side: int | None = Field(None, ge=1, description="output longest side in pixels")
    noise: float | None = Field(None, allow_inf_nan=False, ge=SCORE_RANGE[0], le=SCORE_RANGE[1],
                                description="noise score override (default: estimated from the image)")
    blur: float | None = Field(None, allow_inf_nan=False, ge=SCORE_RANGE[0], le=SCORE_RANGE[1],
                               description="blur score override (default: estimated from the image)")
    guidance_scale: float | None = Field(None, allow_inf_nan=False, ge=0, le=MAX_GUIDANCE,
                                         description="classifier-free guidance (default: the weights' own, 1.07; "
                                                     "1 = no negative prompt)")
    color_fix: ColorFix = Field("wavelet", description="how the output's colours are tied to the input's")
    format: OutputFormat | None = Field(None, description="output format (default: JPEG for JPEG input, else PNG)")
    quality: int | None = Field(None, ge=1, le=100, description=f"JPEG/WebP quality (default {DEFAULT_QUALITY})")

    @model_validator(mode="after")
    def _one_size_mode(self) -> "UpscaleOptions":
        modes = [name for name, given in (("scale", self.scale is not None),
                                          ("width/height", self.width is not None or self.height is not None),
                                          ("longest_side", self.longest_side is not None)) if given]
        if len(modes) > 1:
            raise ValueError(f"give only one of scale, width/height, longest_side (got {', '.join(modes)})")
        return self

    @classmethod
    def parse(cls, **values) -> "UpscaleOptions":
        """Build from plain values, raising the package's InvalidInputError (one line per problem)
        instead of pydantic's ValidationError: what the CLI and the Python API show."""
        try:
            return cls(**values)
        except ValidationError as error:
            raise InvalidInputError(describe_validation_error(error)) from error

    @property
    def output_quality(self) -> int:
        """The JPEG/WebP quality to write: the requested one, else DEFAULT_QUALITY."""
        return DEFAULT_QUALITY if self.quality is None else self.quality

    def output_size(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) of the result for an input of (height, width)."""
        # Imported here: this module stays free of torch, so CLIs can build their flags from it.
        from s3diff_serve.model.output_size import resolve_output_size

        return resolve_output_size(input_size, scale=self.scale, width=self.width, height=self.height,
                                   longest_side=self.longest_side)


def describe_validation_error(error: ValidationError) -> str:
    """'field: problem; field: problem' from a pydantic error (the message clients see)."""
    return "; ".join(f"{'.'.join(map(str, item['loc'])) or 'options'}: {item['msg']}" for item in error.errors())
