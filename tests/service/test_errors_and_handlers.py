"""Error mapping to HTTP, the upscale handler's resolve step and its fp32 retry, with fake pipelines
(no weights) and the tiny model."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from s3diff_serve.model import EnhanceResult, InvalidInputError, NonFiniteOutputError, S3DiffPipeline
from s3diff_serve.model.config import MergedConfig, TilingConfig
from s3diff_serve.model.errors import CorruptImageError, ImageTooLargeError, UnsupportedImageError
from s3diff_serve.model.presets import build_model
from s3diff_serve.service.errors import ServiceError, from_model_error
from s3diff_serve.service.handlers import UpscaleHandler, UpscaleRequest, Upload
from tests.service.images import png_bytes

# The tiny model with 32-pixel latent tiles: inputs up to 64 px per side run untiled.
TILE = 32


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
    device = torch.device("cpu")

    def __init__(self, dtype, fail: bool):
        self.dtype, self.fail, self.calls = dtype, fail, []

    def execute(self, images, plan, **overrides):
        self.calls.append((images.shape, overrides))
        if self.fail:
            raise NonFiniteOutputError("NaN")
        batch = images.shape[0]
        return EnhanceResult(images.repeat_interleave(4, -1).repeat_interleave(4, -2), torch.full((batch,), 0.25),
                             torch.full((batch,), 0.75), {"unet": 0.1})


@pytest.fixture(scope="module")
def tiny_pipe():
    config = MergedConfig(unet={}, vae={}, scheduler={}, tiling=TilingConfig(latent_tile=TILE))
    return S3DiffPipeline(build_model("tiny", seed=1), config, "cpu", "fp32")


def handler_for(pipeline, max_output_pixels: int = 10**8, load_fp32=None) -> UpscaleHandler:
    return UpscaleHandler(pipeline, max_input_pixels=10**6, max_output_pixels=max_output_pixels, load_fp32=load_fp32)


@pytest.fixture(scope="module")
def make_task(tiny_pipe):
    def make(noise=None, size=(8, 8), **options) -> UpscaleRequest:
        fields = {name: str(value) for name, value in {"noise": noise, **options}.items() if value is not None}
        return handler_for(tiny_pipe).decode(Upload(png_bytes(*size), fields))
    return make


def batch_key(request: UpscaleRequest):
    return handler_for(None).batch_key(request)  # the key depends on the request only


def test_non_finite_output_is_retried_once_in_fp32_with_a_lazily_loaded_copy(make_task):
    loads = []
    fallback = FakePipeline(torch.float32, fail=False)
    predictor = handler_for(FakePipeline(torch.bfloat16, fail=True), load_fp32=lambda: loads.append(1) or fallback).predict
    for _ in range(2):
        predictions = predictor([make_task(noise=0.1), make_task(noise=0.9)])
        assert [p.noise for p in predictions] == [0.25, 0.25] and predictions[0].image.shape == (3, 32, 32)
    assert loads == [1]  # loaded on first need, then reused
    assert fallback.calls[0][1]["noise"] == [0.1, 0.9]  # per-sample overrides reach the pipeline


def test_non_finite_output_of_fp32_weights_is_not_retried(make_task):
    predictor = handler_for(FakePipeline(torch.float32, fail=True), load_fp32=lambda: pytest.fail("no fp32 copy")).predict
    with pytest.raises(NonFiniteOutputError):
        predictor([make_task()])


def test_batch_key_groups_by_size_guidance_color_fix_and_output_size_but_not_scores(make_task):
    assert batch_key(make_task(noise=0.1)) == batch_key(make_task(noise=0.9)) is not None
    assert batch_key(make_task()) != batch_key(make_task(color_fix="adain"))
    assert batch_key(make_task()) != batch_key(make_task(guidance_scale=1.0))
    assert batch_key(make_task()) != batch_key(make_task(scale=2))
    assert batch_key(make_task()) != batch_key(make_task(size=(8, 9)))
    job = dataclasses.replace(make_task(), progress=lambda done, total: None)
    assert batch_key(job) is None  # jobs report progress, so they run alone


# (height, width) -> tiled? With 32-pixel latent tiles a side tiles past 64 input pixels,
# whatever the area: 24x80 (the old area rule's blind spot) and 1x100 tile, 64x64 does not.
SIZES = [((16, 16), False), ((64, 64), False), ((1, 60), False), ((24, 80), True), ((65, 16), True), ((1, 100), True)]


@pytest.mark.parametrize("size, tiled", SIZES)
def test_every_batched_input_runs_untiled_in_one_pipeline_call(tiny_pipe, make_task, monkeypatch, size, tiled):
    tasks = [make_task(size=size, noise=0.2), make_task(size=size, noise=0.7)]
    assert tasks[0].plan.tiled is tiled and (batch_key(tasks[0]) is None) is tiled
    decoded_shapes = []
    decode_latent = tiny_pipe.model.decode
    monkeypatch.setattr(tiny_pipe.model, "decode", lambda latent: decoded_shapes.append(latent.shape) or decode_latent(latent))
    batch = tasks if batch_key(tasks[0]) == batch_key(tasks[1]) is not None else tasks[:1]
    predictions = handler_for(tiny_pipe).predict(batch)
    assert [p.image.shape[-2:] for p in predictions] == [(4 * size[0], 4 * size[1])] * len(batch)
    if tiled:
        assert len(batch) == 1 and len(decoded_shapes) == tasks[0].plan.tiles > 1
    else:  # one decoder call over the whole batch: untiled, one pipeline call
        assert len(batch) == 2 and decoded_shapes == [(2, 4, *tasks[0].plan.latent_size)]


def test_a_tall_thin_image_is_limited_by_its_padded_cost(tiny_pipe):
    """1x200 makes only 3,200 output pixels, but the VAE pads it to 64x800 and tiles it (4 tiles of
    8x32 latent pixels): its plan counts 65,536 pixels of work, over a 50,000 limit. A square of
    twice the pixels passes."""
    thin = png_bytes(1, 200)
    handler = handler_for(tiny_pipe, max_output_pixels=50_000)
    with pytest.raises(ServiceError) as refused:
        handler.decode(Upload(thin, {}))
    assert (refused.value.status, refused.value.code) == (413, "output_too_large")
    assert "3200 output pixels and 65536 padded model pixels; the limit is 50000 (setting max_output_pixels)" \
        in refused.value.message
    square = handler.decode(Upload(png_bytes(20, 20), {}))
    assert square.plan.work_pixels == 128 * 128 and square.plan.output_size == (80, 80)


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
