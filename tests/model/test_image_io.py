"""Image I/O: real photos (scikit-image's wheel) and generated special cases, checked exactly."""
import io
import struct
import zlib

import numpy as np
import png
import pytest
import tifffile
import torch
from PIL import Image, ImageCms, ImageOps
from skimage import data as photos

from s3diff_serve.model.image_io import (
    CorruptImageError, ImageTooLargeError, UnsupportedImageError, decode_image, encode_image, encode_like,
    output_format_for, upscale_alpha,
)
from s3diff_serve.model.output_size import resample

SRGB_PROFILE = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _save(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _as_uint(tensor: torch.Tensor, peak: int) -> np.ndarray:
    """(C, H, W) float -> (H, W, C) integers, the inverse of decode's division."""
    return np.rint(tensor.permute(1, 2, 0).numpy() * peak).astype(np.int64)


def _png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG written by pypng (independent of the decoder under test)."""
    height, width, channels = array.shape
    buffer = io.BytesIO()
    png.Writer(width, height, greyscale=channels <= 2, alpha=channels in (2, 4), bitdepth=16).write(
        buffer, array.reshape(height, -1))
    return buffer.getvalue()


def _read_png16(encoded: bytes) -> tuple[np.ndarray, dict]:
    width, height, rows, info = png.Reader(bytes=encoded).read()
    return np.vstack([np.asarray(row, dtype=np.int64) for row in rows]).reshape(height, width, -1), info


@pytest.fixture(scope="module")
def real_photos():
    return {"astronaut": photos.astronaut()[::2, ::2], "coffee": photos.coffee()[::2, ::2],
            "chelsea": photos.chelsea(), "rocket": photos.rocket()[::2, ::2]}


@pytest.mark.parametrize("fmt, options", [("PNG", {}), ("TIFF", {}), ("BMP", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_decode_real_photos_exactly(real_photos, fmt, options):
    for name, photo in real_photos.items():
        decoded = decode_image(_save(photo, fmt, **options))
        assert decoded.bit_depth == 8 and not decoded.grayscale and decoded.alpha is None, name
        assert np.array_equal(_as_uint(decoded.rgb, 255), photo), name
        assert decoded.source_format == fmt.lower()


def test_jpeg_decodes_like_pillow_and_round_trips_to_png(real_photos, tmp_path):
    path = tmp_path / "coffee.jpg"
    path.write_bytes(_save(real_photos["coffee"], "JPEG", quality=90))
    decoded = decode_image(path)
    assert np.array_equal(_as_uint(decoded.rgb, 255), np.asarray(Image.open(path)))
    assert output_format_for(decoded.source_format) == "jpeg"
    as_png = encode_like(decoded.rgb, decoded, format="png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(as_png))), np.asarray(Image.open(path)))


def test_grayscale_photo_stays_grayscale():
    camera = photos.camera()[::2, ::2]
    decoded = decode_image(_save(camera, "PNG"))
    assert decoded.grayscale and torch.equal(decoded.rgb[0], decoded.rgb[2])
    written = Image.open(io.BytesIO(encode_like(decoded.rgb, decoded, output_format_for(decoded.source_format))))
    assert written.mode == "L" and np.array_equal(np.asarray(written), camera)


def test_gray_with_alpha_stays_gray_with_alpha():
    gray_alpha = np.dstack([photos.camera()[:20, :30], np.tile(np.arange(30, dtype=np.uint8) * 8, (20, 1))])
    decoded = decode_image(_save(gray_alpha, "PNG"))
    assert decoded.grayscale and decoded.alpha is not None
    written = Image.open(io.BytesIO(encode_like(decoded.rgb, decoded, output_format_for(decoded.source_format))))
    assert written.mode == "LA" and np.array_equal(np.asarray(written), gray_alpha)


def test_color_output_for_gray_input_is_written_as_luma():
    decoded = decode_image(_save(np.zeros((4, 4), np.uint8), "PNG"))
    rgb = torch.tensor([0.2, 0.6, 0.9])[:, None, None].expand(3, 4, 4)
    written = np.asarray(Image.open(io.BytesIO(encode_like(rgb, decoded, output_format_for(decoded.source_format)))))
    assert (written == round((0.299 * 0.2 + 0.587 * 0.6 + 0.114 * 0.9) * 255)).all()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_matches_pillow_exif_transpose(orientation, fmt):
    rng = np.random.default_rng(orientation)
    pixels = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    encoded = _save(pixels, fmt, exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(encoded))))
    decoded = decode_image(encoded)
    assert np.array_equal(_as_uint(decoded.rgb, 255), expected)
    assert decoded.size == ((40, 24) if orientation >= 5 else (24, 40))


def _soft_blob(size: int, factor: int) -> np.ndarray:
    """A smooth alpha blob (Gaussian, sigma 5 low-res px) sampled at the pixel centres of a grid
    `factor` times finer than a 32 px image: the continuous truth that any upscaler approximates."""
    coords = (np.arange(size) + 0.5) / factor - 0.5
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    return np.exp(-((yy - 15.5) ** 2 + (xx - 15.5) ** 2) / (2 * 5.0 ** 2))


def test_alpha_is_decoded_exactly_and_upscaled_smoothly():
    rng = np.random.default_rng(0)
    alpha = np.rint(_soft_blob(32, 1) * 255).astype(np.uint8)
    rgba = np.dstack([rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), alpha])
    decoded = decode_image(_save(rgba, "PNG"))
    assert np.array_equal(_as_uint(decoded.alpha[None], 255)[..., 0], alpha)

    rgb_x4 = resample(decoded.rgb, (128, 128))
    written = np.asarray(Image.open(io.BytesIO(encode_like(rgb_x4, decoded, output_format_for(decoded.source_format)))))
    assert written.shape == (128, 128, 4)
    truth = _soft_blob(128, 4) * 255
    lanczos_error = np.abs(written[..., 3] - truth).mean()
    nearest_error = np.abs(np.kron(alpha, np.ones((4, 4))) - truth).mean()
    assert lanczos_error < 0.5 * nearest_error


def test_constant_alpha_is_kept_exactly_without_filtering():
    rgba = np.dstack([np.full((10, 12, 3), 90, np.uint8), np.full((10, 12), 200, np.uint8)])
    decoded = decode_image(_save(rgba, "PNG"))
    assert torch.equal(upscale_alpha(decoded.alpha, (37, 41)), torch.full((37, 41), 200 / 255))
    written = np.asarray(Image.open(io.BytesIO(encode_like(resample(decoded.rgb, (40, 48)), decoded, "png"))))
    assert (written[..., 3] == 200).all()


def test_jpeg_output_of_transparent_input_is_composited_over_white():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4, ..., 3] = 255  # top half opaque black, bottom half fully transparent
    decoded = decode_image(_save(rgba, "PNG"))
    written = np.asarray(Image.open(io.BytesIO(encode_like(decoded.rgb, decoded, format="jpeg", quality=100))))
    assert written.ndim == 3 and written[:3].max() <= 3 and written[5:].min() >= 252


@pytest.mark.parametrize("channels, grayscale", [(3, False), (4, False), (1, True), (2, True)])
def test_16bit_png_stays_16bit_without_8bit_round_trip(channels, grayscale):
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 65536, (20, 28, channels), dtype=np.uint16)
    pixels[0, 0] = 257 * 100 + 1  # a value an 8-bit round trip cannot represent
    decoded = decode_image(_png16(pixels))
    assert decoded.bit_depth == 16 and decoded.grayscale == grayscale
    assert (decoded.alpha is not None) == (channels in (2, 4))
    written, info = _read_png16(encode_like(decoded.rgb, decoded, output_format_for(decoded.source_format)))
    assert info["bitdepth"] == 16 and info["greyscale"] == grayscale
    assert np.array_equal(written, pixels)


def test_16bit_rgb_tiff_gives_16bit_png():
    pixels = np.random.default_rng(3).integers(0, 65536, (16, 24, 3), dtype=np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, photometric="rgb", compression="zlib")
    decoded = decode_image(buffer.getvalue())
    assert decoded.bit_depth == 16 and decoded.source_format == "tiff"
    written, info = _read_png16(encode_like(decoded.rgb, decoded, output_format_for(decoded.source_format)))
    assert info["bitdepth"] == 16 and np.array_equal(written, pixels)


@pytest.mark.parametrize("shape, photometric", [((16, 24, 3), "rgb"), ((16, 24, 4), "rgb"), ((16, 24), "minisblack")])
def test_32bit_float_tiff_decodes_its_unit_range_values(shape, photometric):
    """Float TIFFs (written by tifffile, an independent writer) hold [0, 1] samples: they decode
    to exactly those values (outside values clipped) and write 16-bit PNGs."""
    pixels = np.random.default_rng(5).uniform(-0.2, 1.2, shape).astype(np.float32)
    buffer = io.BytesIO()
    extra = {"extrasamples": ["unassalpha"]} if shape[-1] == 4 else {}
    tifffile.imwrite(buffer, pixels, photometric=photometric, **extra)
    decoded = decode_image(buffer.getvalue())
    expected = torch.from_numpy(pixels.clip(0, 1))
    assert decoded.bit_depth == 16 and decoded.source_format == "tiff" and decoded.grayscale == (len(shape) == 2)
    if len(shape) == 2:
        assert torch.equal(decoded.rgb, expected.expand(3, -1, -1))
    else:
        assert torch.equal(decoded.rgb, expected[..., :3].permute(2, 0, 1))
        assert (decoded.alpha is None) == (shape[-1] == 3)
        if decoded.alpha is not None:
            assert torch.equal(decoded.alpha, expected[..., 3])
    written, info = _read_png16(encode_like(decoded.rgb, decoded, output_format_for(decoded.source_format)))
    assert info["bitdepth"] == 16


def test_a_float_tiff_larger_than_the_limit_is_refused_from_its_header():
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((64, 64, 3), np.float32), photometric="rgb")
    with pytest.raises(ImageTooLargeError, match="64x64 = 4096 pixels"):
        decode_image(buffer.getvalue(), max_pixels=4000)


@pytest.mark.parametrize("fmt, bit_depth", [("png", 8), ("png", 16), ("jpeg", 8), ("webp", 8)])
def test_icc_profile_is_carried_to_every_output_format(fmt, bit_depth):
    source = _save(photos.astronaut()[:64, :64], "JPEG", icc_profile=SRGB_PROFILE)
    decoded = decode_image(source)
    assert decoded.icc_profile == SRGB_PROFILE
    encoded = encode_image(decoded.rgb, icc_profile=decoded.icc_profile, bit_depth=bit_depth, format=fmt)
    assert Image.open(io.BytesIO(encoded)).info["icc_profile"] == SRGB_PROFILE


def test_icc_profile_that_does_not_fit_the_output_is_dropped():
    rgb_profile_on_gray = _save(np.zeros((8, 8), np.uint8), "PNG", icc_profile=SRGB_PROFILE)
    assert decode_image(rgb_profile_on_gray).icc_profile is None  # an RGB profile cannot describe gray


def test_rounding_not_truncation():
    rgb = torch.full((3, 2, 2), 0.7 / 255)
    assert (np.asarray(Image.open(io.BytesIO(encode_image(rgb)))) == 1).all()


def _png_with_header(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    png.write_chunks(buffer, [(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)),
                              (b"IDAT", zlib.compress(b"\x00" * 64)), (b"IEND", b"")])
    return buffer.getvalue()


@pytest.mark.parametrize("width, height, max_pixels", [(60000, 60000, 8192 * 8192), (4097, 4096, 4096 * 4096)])
def test_decompression_bomb_is_refused_from_the_header(width, height, max_pixels):
    bomb = _png_with_header(width, height)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError):
        decode_image(bomb, max_pixels=max_pixels)


def test_truncated_files_are_corrupt(real_photos):
    for fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
        whole = _save(real_photos["chelsea"], fmt)
        with pytest.raises(CorruptImageError):
            decode_image(whole[: len(whole) // 2])


def test_garbage_after_a_png_signature_is_corrupt():
    with pytest.raises(CorruptImageError, match="PNG"):
        decode_image(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))


@pytest.mark.parametrize("payload", [b"hello, not an image", b"", _save(np.zeros((4, 4, 3), np.uint8), "ICO")])
def test_unsupported_inputs(payload):
    with pytest.raises(UnsupportedImageError):
        decode_image(payload)


def test_output_format_choice():
    assert output_format_for("jpeg") == "jpeg"
    assert output_format_for("tiff") == "png"
    assert output_format_for("png", "JPG") == "jpeg"
    with pytest.raises(ValueError, match="output format"):
        output_format_for("png", "gif")


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])
def test_a_file_of_several_frames_gives_its_first_frame_and_their_count(fmt):
    frames = [np.full((6, 5, 3), value, np.uint8) for value in (10, 120, 240)]
    buffer = io.BytesIO()
    Image.fromarray(frames[0]).save(buffer, format=fmt, save_all=True,
                                    append_images=[Image.fromarray(f) for f in frames[1:]], duration=50)
    decoded = decode_image(buffer.getvalue())
    assert decoded.frames == 3 and decoded.size == (6, 5)
    assert torch.equal(decoded.rgb, torch.full((3, 6, 5), 10 / 255))


def test_a_pillow_decompression_bomb_quotes_the_callers_limit():
    with pytest.raises(ImageTooLargeError, match=r"declares 10000000000 pixels; the limit is 1000$"):
        decode_image(_png_with_header(100_000, 100_000), max_pixels=1000)
