"""Every endpoint of docs/service.md against a real server, with outputs checked against the model
package run in-process (an independent path: no HTTP, no batcher, no codec pool)."""
from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import png
import pytest
import tifffile
import torch
from PIL import Image

from tests.service.conftest import API_KEY
from tests.service.images import decode, encode, metric, png_bytes, random_rgb


def expected_output(pipeline, pixels: np.ndarray, **overrides) -> np.ndarray:
    """The model's x4 output for uint8 pixels, rounded to uint8 as the PNG encoder does."""
    rgb = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)[None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see conftest.start_server: one thread avoids oversubscribing shared cores
    try:
        result = pipeline.enhance(rgb, **overrides)
    finally:
        torch.set_num_threads(threads)
    return np.rint(result.images[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    return body


def test_probes_are_open_and_report_the_loaded_weights(server, tiny_merged_dir):
    weights_id = json.loads((tiny_merged_dir / "config.json").read_text())["weights_id"]
    with server.client() as client:
        client.headers.clear()  # no API key: probes and metrics stay open
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready", "weights_id": weights_id}
        metrics_text = client.get("/metrics").text
    assert metric(metrics_text, "s3diff_model_info", weights_id=weights_id, dtype="float32", device="cpu") == 1


def test_model_endpoint_reports_weights_device_and_limits(client, tiny_merged_dir):
    body = client.get("/v1/model").json()
    assert body["weights_id"] == json.loads((tiny_merged_dir / "config.json").read_text())["weights_id"]
    assert body["weights"] == str(tiny_merged_dir)  # configured weights, not the built-in demo
    assert (body["dtype"], body["devices"], body["scale"]) == ("float32", ["cpu"], 4)
    assert body["limits"]["max_body_bytes"] == 1_000_000 and body["limits"]["max_batch"] == 4
    assert body["tiling"]["latent_tile"] == 96


def test_api_keys_are_required_on_v1_routes(server):
    with server.client() as client:
        client.headers.clear()
        assert_error(client.get("/v1/model"), 401, "missing_api_key")
        assert_error(client.get("/v1/model", headers={"X-API-Key": "wrong"}), 401, "invalid_api_key")
        assert_error(client.get("/v1/model", headers={"Authorization": f"Bearer {API_KEY}x"}), 401, "invalid_api_key")
        assert client.get("/v1/model", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
        assert client.get("/v1/model", headers={"X-API-Key": "other-key"}).status_code == 200


def test_upscale_multipart_matches_the_pipeline_and_sets_headers(client, tiny_pipeline):
    pixels = random_rgb(12, 16, seed=1)
    response = client.post("/v1/upscale", params={"noise": 0.3, "blur": 0.6},
                           files={"image": ("in.png", encode(pixels), "image/png")},
                           headers={"X-Request-ID": "my-request-42"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-request-id"] == "my-request-42"
    assert float(response.headers["x-s3diff-noise"]) == pytest.approx(0.3)
    assert float(response.headers["x-s3diff-blur"]) == pytest.approx(0.6)
    stages = {part.split(";")[0].strip() for part in response.headers["server-timing"].split(",")}
    assert {"queue", "estimate", "encode", "unet", "decode"} <= stages
    served = decode(response.content)
    assert served.shape == (48, 64, 3)
    reference = expected_output(tiny_pipeline, pixels, noise=0.3, blur=0.6)
    assert np.abs(served.astype(int) - reference.astype(int)).max() <= 1


def test_upscale_raw_jpeg_body_estimates_scores_and_resizes(client, tiny_pipeline):
    pixels = random_rgb(16, 16, seed=2)
    jpeg = encode(pixels, "JPEG", quality=90)
    response = client.post("/v1/upscale", params={"scale": 2}, content=jpeg, headers={"content-type": "image/jpeg"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"  # JPEG in, JPEG out by default
    assert decode(response.content).shape == (32, 32, 3)
    decoded_input = torch.from_numpy(decode(jpeg)).permute(2, 0, 1).float().div(255)[None]
    scores = tiny_pipeline.estimate(decoded_input)
    assert float(response.headers["x-s3diff-noise"]) == pytest.approx(float(scores.noise[0]), abs=1e-5)
    assert float(response.headers["x-s3diff-blur"]) == pytest.approx(float(scores.blur[0]), abs=1e-5)
    generated_id = response.headers["x-request-id"]
    assert len(generated_id) == 32 and generated_id != client.post("/v1/upscale", content=jpeg).headers["x-request-id"]


def test_output_format_and_form_fields(client):
    response = client.post("/v1/upscale", files={"image": ("in.png", png_bytes(16, 16), "image/png")},
                           data={"format": "webp", "quality": "80", "scale": "1"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/webp"
    assert decode(response.content).shape == (16, 16, 3)


@pytest.mark.parametrize("size_fields, expected", [
    ({"longest_side": 100}, (60, 100)),  # 24x40 input: the longest side 40 -> 100, height 24 -> 60
    ({"width": 80}, (48, 80)),
    ({"width": 50, "height": 30}, (30, 50)),
])
def test_pixel_size_modes_give_exact_dimensions(client, size_fields, expected):
    response = client.post("/v1/upscale", params=size_fields, content=png_bytes(24, 40))
    assert response.status_code == 200, response.text
    assert decode(response.content).shape[:2] == expected


def test_a_32bit_float_tiff_is_upscaled_to_a_16bit_png(client):
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.random.default_rng(4).random((12, 16, 3), dtype=np.float32), photometric="rgb")
    response = client.post("/v1/upscale", content=buffer.getvalue(), headers={"content-type": "image/tiff"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert np.array(Image.open(io.BytesIO(response.content))).shape[:2] == (48, 64)
    assert png.Reader(bytes=response.content).read()[3]["bitdepth"] == 16


def test_degradation_matches_the_estimator(client, tiny_pipeline):
    pixels = random_rgb(20, 28, seed=3)
    response = client.post("/v1/degradation", files={"image": ("in.png", encode(pixels), "image/png")})
    assert response.status_code == 200, response.text
    scores = tiny_pipeline.estimate(torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)[None])
    assert response.json() == pytest.approx({"noise": float(scores.noise[0]), "blur": float(scores.blur[0])}, abs=1e-5)


@pytest.mark.parametrize("request_kwargs, status, code", [
    ({"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty_body"),
    ({"files": {"other": ("a.png", b"x", "image/png")}}, 400, "missing_image"),
    ({"content": b'{"url": "http://x"}', "headers": {"content-type": "application/json"}}, 415, "unsupported_media_type"),
    ({"files": {"image": ("notes.png", b"just some text, not a picture", "image/png")}}, 415, "unsupported_image"),
    ({"content": png_bytes(), "params": {"scale": 9}}, 422, "invalid_parameter"),
    ({"content": png_bytes(), "params": {"noise": 1.5}}, 422, "invalid_parameter"),
    ({"content": png_bytes(), "params": {"blur": "nan"}}, 422, "invalid_parameter"),
    ({"content": png_bytes(), "params": {"color_fix": "sepia"}}, 422, "invalid_parameter"),
    ({"content": png_bytes(), "params": {"format": "gif"}}, 422, "invalid_parameter"),
    ({"content": png_bytes(), "params": {"quality": 0}}, 422, "invalid_parameter"),
    ({"content": png_bytes(), "params": {"scale": 2, "width": 50}}, 422, "invalid_parameter"),
    ({"content": png_bytes(), "params": {"height": 1000}}, 422, "invalid_parameter"),  # x41.7 of 24 px
    ({"files": {"image": ("a.png", png_bytes(), "image/png")}, "data": {"guidance_scale": "-1"}}, 422,
     "invalid_parameter"),
    ({"content": b"\0" * 1_000_001, "headers": {"content-type": "image/png"}}, 413, "body_too_large"),
    ({"content": encode(np.zeros((2100, 2100, 3), np.uint8))}, 413, "output_too_large"),
])
def test_bad_requests_get_json_4xx(client, request_kwargs, status, code):
    body = assert_error(client.post("/v1/upscale", **request_kwargs), status, code)
    if code == "invalid_parameter" and "params" in request_kwargs:
        assert next(iter(request_kwargs["params"])) in body["error"]["message"]  # names the parameter


def test_unknown_routes_and_methods_get_json_errors(client):
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(client.get("/v1/upscale"), 405, "method_not_allowed")
    assert client.post("/v1/upscale", content=png_bytes(8, 8)).status_code == 200  # still serving


def test_concurrent_requests_are_batched_and_match_solo_results(server, client, tiny_pipeline):
    before = client.get("/metrics").text
    images = [random_rgb(16, 16, seed=10 + i) for i in range(4)]
    noises = [0.1, 0.4, 0.7, 0.9]  # different modulations share one batch

    def send(index: int):
        with server.client() as own_client:
            return own_client.post("/v1/upscale", params={"noise": noises[index], "blur": 0.5},
                                   content=encode(images[index]), headers={"content-type": "image/png"})

    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(send, range(4)))
    after = client.get("/metrics").text
    assert all(r.status_code == 200 for r in responses)
    batched_images = metric(after, "s3diff_batch_size_sum") - metric(before, "s3diff_batch_size_sum")
    batches = metric(after, "s3diff_batch_size_count") - metric(before, "s3diff_batch_size_count")
    assert batched_images == 4 and batches < 4
    assert max(int(r.headers["x-s3diff-batch-size"]) for r in responses) > 1
    for index, response in enumerate(responses):
        assert float(response.headers["x-s3diff-noise"]) == pytest.approx(noises[index])
        reference = expected_output(tiny_pipeline, images[index], noise=noises[index], blur=0.5)
        assert np.abs(decode(response.content).astype(int) - reference.astype(int)).max() <= 1


def test_request_metrics_use_route_templates(client):
    client.get("/v1/jobs/does-not-exist")
    text = client.get("/metrics").text
    assert metric(text, "s3diff_requests_total", endpoint="/v1/jobs/{job_id}", status="404") >= 1
    assert "does-not-exist" not in text
    assert metric(text, "s3diff_output_pixels_total") > 0
    assert metric(text, "s3diff_queue_depth") == 0


def test_job_lifecycle(client, tiny_pipeline):
    pixels = random_rgb(12, 16, seed=5)
    created = client.post("/v1/jobs", params={"noise": 0.2, "blur": 0.2}, content=encode(pixels),
                          headers={"content-type": "image/png"})
    assert created.status_code == 202, created.text
    location = created.headers["location"]
    assert location == f"/v1/jobs/{created.json()['id']}"
    deadline = time.monotonic() + 60
    while (status := client.get(location).json())["status"] in ("queued", "running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status["status"] == "succeeded", status
    assert status["progress"]["done"] == status["progress"]["total"] >= 1
    result = client.get(status["result"])
    assert result.status_code == 200 and result.headers["content-type"] == "image/png"
    reference = expected_output(tiny_pipeline, pixels, noise=0.2, blur=0.2)
    assert np.abs(decode(result.content).astype(int) - reference.astype(int)).max() <= 1
    assert client.delete(location).json()["id"] == created.json()["id"]
    assert_error(client.get(location), 404, "job_not_found")
    assert_error(client.get(f"{location}/result"), 404, "job_not_found")


def test_job_with_a_bad_image_is_refused_up_front(client):
    assert_error(client.post("/v1/jobs", content=b"GIF89a not really", headers={"content-type": "image/gif"}),
                 400, "corrupt_image")
    assert_error(client.post("/v1/jobs", content=b"neither an image", headers={"content-type": "image/x-unknown"}),
                 415, "unsupported_image")


def test_request_log_is_one_json_line_per_request(server, client):
    client.post("/v1/upscale", params={"noise": 0.5, "blur": 0.5}, content=png_bytes(8, 8),
                headers={"X-Request-ID": "log-check-7"})
    time.sleep(0.2)
    lines = [json.loads(line) for line in server.log().splitlines() if "log-check-7" in line]
    assert len(lines) == 1
    record = lines[0]
    assert (record["route"], record["status"], record["batch_size"]) == ("/v1/upscale", 200, 1)
    assert record["input_size"] == [8, 8] and record["noise"] == 0.5 and "unet" in record["times"]


def test_client_that_disconnects_while_queued_is_dropped(server, client):
    before = metric(client.get("/metrics").text, "s3diff_rejected_total", reason="client_disconnected")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(client.post, "/v1/upscale", content=png_bytes(96, 96))  # keeps the model busy ~1 s
        time.sleep(0.1)
        with server.client(timeout=0.3) as impatient, pytest.raises(httpx.TimeoutException):
            impatient.post("/v1/upscale", content=png_bytes(12, 12), headers={"X-Request-ID": "gave-up-1"})
        assert slow.result(timeout=120).status_code == 200
    after = metric(client.get("/metrics").text, "s3diff_rejected_total", reason="client_disconnected")
    assert after - before == 1
    time.sleep(0.2)
    record = next(json.loads(line) for line in server.log().splitlines() if "gave-up-1" in line)
    assert record["status"] == 499 and "batch_size" not in record  # never reached the model


def test_alpha_and_16_bit_gray_survive_the_round_trip(client):
    rgba = np.dstack([random_rgb(12, 16, seed=6), np.full((12, 16), 128, np.uint8)])
    response = client.post("/v1/upscale", params={"noise": 0.5, "blur": 0.5}, content=encode(rgba))
    assert response.status_code == 200, response.text
    served = decode(response.content)
    assert served.shape == (48, 64, 4) and (served[..., 3] == 128).all()  # constant alpha re-attached exactly

    gray16 = (np.random.default_rng(7).integers(0, 65536, (12, 16))).astype(np.uint16)
    response = client.post("/v1/upscale", params={"noise": 0.5, "blur": 0.5}, content=encode(gray16))
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(response.content))
    assert image.mode in ("I;16", "I") and image.size == (64, 48)  # still one 16-bit gray channel
    assert np.asarray(image).max() > 255
