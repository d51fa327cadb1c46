"""Error mapping to HTTP and the predict step's fp32 retry, with fake pipelines (no weights)."""
from __future__ import annotations

import pytest
import torch

from s3diff_serve.model import EnhanceResult, InvalidInputError, NonFiniteOutputError
from s3diff_serve.model.errors import CorruptImageError, ImageTooLargeError, UnsupportedImageError
from s3diff_serve.model.image_io import decode_image
from s3diff_serve.service.errors import from_model_error
from s3diff_serve.service.stages import Predictor, UpscaleOptions, UpscaleTask, batch_key
from tests.service.images import png_bytes


@pytest.mark.parametrize("error, status, code", [
    (CorruptImageError("x"), 400, "corrupt_image"),
    (UnsupportedImageError("x"), 415, "unsupported_image"),
    (ImageTooLargeError("x"), 413, "image_too_large"),
    (InvalidInputError("x"), 422, "invalid_parameter"),
    (NonFiniteOutputError("x"), 500, "numerical_error"),
    (torch.OutOfMemoryError("x"), 503, "out_of_memory"),
    (RuntimeError("x"), 500, "internal_error"),
])
def test_model_errors_map_to_statuses(error, status, code):
    mapped = from_model_error(error)
    assert (mapped.status, mapped.code) == (status, code)


class FakePipeline:
    def __init__(self, dtype, fail: bool):
        self.dtype, self.fail, self.calls = dtype, fail, []

    def enhance(self, images, **options):
        self.calls.append((images.shape, options))
        if self.fail:
            raise NonFiniteOutputError("NaN")
        batch = images.shape[0]
        return EnhanceResult(images.repeat_interleave(4, -1).repeat_interleave(4, -2), torch.full((batch,), 0.25),
                             torch.full((batch,), 0.75), {"unet": 0.1})


def make_task(noise=None, **options) -> UpscaleTask:
    image = decode_image(png_bytes(8, 8))
    return UpscaleTask(image, UpscaleOptions(noise=noise, **options), (32, 32))


def test_non_finite_output_is_retried_once_in_fp32_with_a_lazily_loaded_copy():
    loads = []
    fallback = FakePipeline(torch.float32, fail=False)
    predictor = Predictor(FakePipeline(torch.bfloat16, fail=True), lambda: loads.append(1) or fallback)
    for _ in range(2):
        predictions = predictor([make_task(noise=0.1), make_task(noise=0.9)])
        assert [p.noise for p in predictions] == [0.25, 0.25] and predictions[0].image.shape == (3, 32, 32)
    assert loads == [1]  # loaded on first need, then reused
    assert fallback.calls[0][1]["noise"] == [0.1, 0.9]  # per-sample overrides reach the pipeline


def test_non_finite_output_of_fp32_weights_is_not_retried():
    predictor = Predictor(FakePipeline(torch.float32, fail=True), lambda: pytest.fail("no fp32 copy needed"))
    with pytest.raises(NonFiniteOutputError):
        predictor([make_task()])


def test_batch_key_groups_by_size_guidance_and_color_fix_but_not_scores():
    assert batch_key(make_task(noise=0.1), 96) == batch_key(make_task(noise=0.9), 96)
    assert batch_key(make_task(), 96) != batch_key(make_task(color_fix="adain"), 96)
    assert batch_key(make_task(), 96) != batch_key(make_task(guidance_scale=1.0), 96)
    assert batch_key(make_task(), 1) is None  # latent larger than one tile: tiled alone
    job = make_task()
    job.progress = lambda done, total: None
    assert batch_key(job, 96) is None  # jobs report progress, so they run alone


def test_out_of_memory_after_retries_is_a_logged_503_with_retry_after(caplog):
    from s3diff_serve.model.errors import TilingOutOfMemoryError
    from s3diff_serve.service.errors import from_model_error

    with caplog.at_level("WARNING", logger="s3diff.service"):
        error = from_model_error(TilingOutOfMemoryError("out of device memory even with 32-pixel latent tiles"), "req-7")
    assert (error.status, error.code, error.headers["Retry-After"]) == (503, "out_of_memory", "5")
    assert "req-7" in caplog.text


def test_an_unexpected_error_is_logged_with_its_traceback_and_request_id(caplog):
    from s3diff_serve.service.errors import from_model_error

    try:
        raise KeyError("bug")
    except KeyError as bug:
        with caplog.at_level("ERROR", logger="s3diff.service"):
            error = from_model_error(bug, "req-9")
    assert (error.status, error.code) == (500, "internal_error")
    assert "req-9" in caplog.text and "KeyError" in caplog.text
