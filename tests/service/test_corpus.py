"""Malformed and unusual files: each gets its documented answer, never a 5xx, and the server
keeps serving. Two entries are valid if odd images (1x1, CMYK JPEG) and are served."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.service.images import decode, encode, png_bytes, random_rgb


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height over a few bytes of pixel data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def decompression_bomb() -> bytes:
    """25 megapixels of zeros in ~25 KB: over the 16.7 Mpx input limit."""
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def frames_file(fmt: str, count: int) -> bytes:
    """`count` different 16x16 frames (an animation, or pages for TIFF) in one file."""
    frames = [Image.fromarray(random_rgb(16, 16, seed)) for seed in range(count)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def cmyk_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(random_rgb(16, 16, 4)).convert("CMYK").save(buffer, format="JPEG")
    return buffer.getvalue()


CORPUS = {
    "truncated.png": (png_bytes(32, 32)[:300], 400, "corrupt_image"),
    "truncated.jpg": (encode(random_rgb(64, 64), "JPEG")[:600], 400, "corrupt_image"),
    "zero-bytes.png": (b"", 400, "empty_body"),
    "text-renamed.png": (b"hello, I am a text file\n" * 4, 415, "unsupported_image"),
    "bomb.png": (decompression_bomb(), 413, "image_too_large"),
    "huge-header.png": (png_with_header(100_000, 100_000), 413, "image_too_large"),
    "animated.gif": (frames_file("GIF", 3), 200, None),
    "one-pixel.png": (encode(np.full((1, 1, 3), 200, np.uint8)), 200, None),
    "cmyk.jpg": (cmyk_jpeg(), 200, None),
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_file_gets_its_documented_answer(client, name):
    data, status, code = CORPUS[name]
    for route in ("/v1/upscale", "/v1/degradation"):
        response = client.post(route, params={"noise": 0.5, "blur": 0.5} if route == "/v1/upscale" else None,
                               files={"image": (name, data, "application/octet-stream")})
        assert response.status_code == status, (route, response.text)
        if code is not None:
            assert response.json()["error"]["code"] == code
        elif route == "/v1/upscale":
            side = 4 if name == "one-pixel.png" else 64
            assert decode(response.content).shape == (side, side, 3)  # CMYK comes back as RGB


def test_server_still_serves_after_the_corpus(client):
    response = client.post("/v1/upscale", content=png_bytes(8, 8))
    assert response.status_code == 200 and decode(response.content).shape == (32, 32, 3)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])
@pytest.mark.parametrize("count", [1, 3])
def test_every_format_with_several_frames_is_served_from_its_first_frame_and_says_so(client, fmt, count):
    data = frames_file(fmt, count)
    first = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    upscaled = client.post("/v1/upscale", params={"noise": 0.5, "blur": 0.5, "format": "png"}, content=data)
    assert upscaled.status_code == 200, upscaled.text
    assert upscaled.headers.get("x-s3diff-input-frames") == (str(count) if count > 1 else None)
    single = client.post("/v1/upscale", params={"noise": 0.5, "blur": 0.5, "format": "png"},
                         content=encode(first, "PNG"))
    assert upscaled.content == single.content  # exactly the first frame's upscale
    scores = client.post("/v1/degradation", content=data)
    assert scores.status_code == 200 and scores.headers.get("x-s3diff-input-frames") == (
        str(count) if count > 1 else None)


@pytest.mark.parametrize("data", [decompression_bomb(), png_with_header(100_000, 100_000)])
def test_pixel_limits_quote_the_services_own_setting(client, data):
    """Pillow's own guard fires first on the huge header; the answer still quotes ours."""
    from s3diff_serve.service.settings import ServiceSettings

    response = client.post("/v1/upscale", content=data)
    assert response.status_code == 413, response.text
    message = response.json()["error"]["message"]
    assert f"the limit is {ServiceSettings().max_input_pixels} (setting max_input_pixels)" in message
    assert str(Image.MAX_IMAGE_PIXELS) not in message and str(2 * Image.MAX_IMAGE_PIXELS) not in message


def test_two_image_parts_are_refused(client):
    response = client.post("/v1/upscale", files=[("image", ("a.png", png_bytes(8, 8), "image/png")),
                                                 ("image", ("b.png", png_bytes(8, 8, seed=1), "image/png"))])
    assert response.status_code == 400, response.text
    assert response.json()["error"] == {"code": "multiple_images",
                                        "message": "the multipart body has 2 'image' parts; send one"}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
@pytest.mark.parametrize("name", ["noise", "blur", "guidance_scale", "scale"])
def test_non_finite_numbers_are_named_as_such(client, name, value):
    for where in ("params", "data"):
        response = client.post("/v1/upscale", **{where: {name: value}},
                               files={"image": ("a.png", png_bytes(8, 8), "image/png")})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["message"] == f"{name}: Input should be a finite number"


def test_the_estimate_route_refuses_parameters_like_the_upscale_route(client):
    for route in ("/v1/upscale", "/v1/degradation"):
        response = client.post(route, data={"colour": "red"}, files={"image": ("a.png", png_bytes(8, 8), "image/png")})
        assert response.status_code == 422, (route, response.text)
        assert response.json()["error"]["code"] == "invalid_parameter" and "colour" in response.json()["error"]["message"]
