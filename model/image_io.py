"""Image files in and out, keeping what photo tools usually lose: EXIF orientation, alpha,
16-bit depth, grayscale and the ICC profile.

Pillow reads headers, metadata and every 8-bit image. Pillow has no 16-bit RGB(A) or 16-bit
gray+alpha mode (it silently truncates those to 8 bits), so 16-bit PNG/TIFF pixels are decoded
with OpenCV and 16-bit PNGs are written with pypng, which also frames the iCCP chunk.
"""
from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import png
import torch
from PIL import Image, ImageCms, TiffImagePlugin

from s3diff_serve.model.errors import CorruptImageError, ImageTooLargeError, InvalidInputError, UnsupportedImageError
from s3diff_serve.model.options import DEFAULT_QUALITY, OUTPUT_FORMATS
from s3diff_serve.model.output_size import resample

# Formats we accept, as Pillow names them (MPO: the multi-picture JPEG many phones write). A file
# of several frames (animated GIF/WebP/PNG, multi-page TIFF, MPO) gives its first frame.
INPUT_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "TIFF": "tiff", "BMP": "bmp",
                 "GIF": "gif"}
ACCEPTED = "PNG, JPEG, WebP, TIFF, BMP or GIF"
# Header-declared pixel limit checked before any pixel is decoded (the decompression-bomb guard).
DEFAULT_MAX_PIXELS = 8192 * 8192
# ITU-R BT.601 luma weights, the ones Pillow uses for RGB -> L.
_LUMA = (0.299, 0.587, 0.114)
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"BM": "BMP",
               b"GIF87a": "GIF", b"GIF89a": "GIF"}


@dataclass(frozen=True)
class DecodedImage:
    """An input image ready for the model, plus what is needed to write the output like it."""

    rgb: torch.Tensor  # (3, H, W) float32 in [0, 1], orientation applied; gray is replicated
    alpha: torch.Tensor | None  # (H, W) float32 in [0, 1], or None when the file has no alpha
    grayscale: bool
    bit_depth: int  # 8 or 16
    icc_profile: bytes | None
    source_format: str  # "png", "jpeg", "webp", "tiff", "bmp", "gif"
    frames: int = 1  # frames in the file (animation, pages, MPO pictures); only the first is decoded

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return tuple(self.rgb.shape[-2:])


def decode_image(source: bytes | str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode a file path or bytes. Raises UnsupportedImageError, CorruptImageError, ImageTooLargeError."""
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    sniffed = _sniff_format(data)
    if sniffed == "TIFF" and (tags := _float_tiff_tags(data)) is not None:
        return _decode_float_tiff(data, tags, max_pixels)
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        # Pillow's own guard fired first (at twice its global limit); quote the caller's limit.
        declared = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{declared.group(1)} pixels" if declared else "more pixels than Pillow allows"
        raise ImageTooLargeError(f"image declares {size}; the limit is {max_pixels}") from err
    except (OSError, SyntaxError, ValueError) as err:
        if sniffed:
            raise CorruptImageError(
                f"cannot read this {sniffed} file: it is corrupt or truncated (or a variant we cannot decode)") from err
        raise UnsupportedImageError(f"not a {ACCEPTED} image") from err
    if image.format not in INPUT_FORMATS:
        raise UnsupportedImageError(f"unsupported image format {image.format}; accepted: {ACCEPTED}")
    width, height = image.size
    _check_pixel_limit(width, height, max_pixels)

    try:
        orientation = image.getexif().get(0x0112, 1)
        icc_profile = image.info.get("icc_profile") or None
        if _is_16bit_color(image, data):
            pixels, grayscale, has_alpha = _decode_16bit(data, image)
        else:
            pixels, grayscale, has_alpha = _decode_with_pillow(image)
    except (OSError, SyntaxError, ValueError, cv2.error) as err:
        raise CorruptImageError(f"cannot decode this {image.format} file: {err}") from err
    if pixels.shape[:2] != (height, width):
        raise CorruptImageError(f"decoded {pixels.shape[1]}x{pixels.shape[0]} pixels, header says {width}x{height}")

    return _decoded(pixels, orientation, grayscale, has_alpha, icc_profile, INPUT_FORMATS[image.format],
                    getattr(image, "n_frames", 1))


def _check_pixel_limit(width: int, height: int, max_pixels: int) -> None:
    """The decompression-bomb guard, on header sizes, before any pixel is decoded."""
    if width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")


def _decoded(pixels: np.ndarray, orientation: int, grayscale: bool, has_alpha: bool, icc_profile: bytes | None,
             source_format: str, frames: int = 1) -> DecodedImage:
    """(H, W, C) uint8, uint16 or float32-in-[0, 1] pixels -> DecodedImage (8-bit sources write
    8-bit outputs; 16-bit and float ones write 16-bit)."""
    pixels = _apply_orientation(pixels, orientation)
    peak = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(pixels.dtype, 1.0)
    planes = torch.from_numpy(pixels.astype(np.float32) / peak).permute(2, 0, 1)
    color = planes[:1].expand(3, -1, -1).clone() if grayscale else planes[:3].clone()
    alpha = planes[-1].clone() if has_alpha else None
    if icc_profile is not None and not _profile_fits(icc_profile, grayscale):
        icc_profile = None
    return DecodedImage(color, alpha, grayscale, 8 if pixels.dtype == np.uint8 else 16, icc_profile, source_format,
                        frames)


# TIFF tags read for floating-point files (TIFF 6.0 numbering).
_TIFF_WIDTH, _TIFF_HEIGHT, _TIFF_ORIENTATION, _TIFF_SAMPLE_FORMAT, _TIFF_ICC = 256, 257, 274, 339, 34675
_IEEE_FLOAT = 3


def _float_tiff_tags(data: bytes) -> dict | None:
    """The first directory's tags of a TIFF whose samples are IEEE floats, else None. Read with
    Pillow's tag parser: Pillow opens 32-bit float gray but refuses float RGB, so the header is
    needed before choosing a decoder (and to check the pixel limit before decoding)."""
    try:
        tags = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
        stream = io.BytesIO(data)
        stream.seek(tags.next)
        tags.load(stream)
    except (OSError, SyntaxError, ValueError, struct.error):
        return None  # Pillow's own open reports the corrupt file
    return dict(tags) if _IEEE_FLOAT in tags.get(_TIFF_SAMPLE_FORMAT, ()) else None


def _decode_float_tiff(data: bytes, tags: dict, max_pixels: int) -> DecodedImage:
    """A 32-bit float TIFF (gray, gray+alpha, RGB or RGBA), samples taken as [0, 1] (the usual
    convention of float images; values outside are clipped, NaN becomes 0), via OpenCV."""
    width, height = int(tags.get(_TIFF_WIDTH, 0)), int(tags.get(_TIFF_HEIGHT, 0))
    _check_pixel_limit(width, height, max_pixels)
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.shape[:2] != (height, width):
        raise UnsupportedImageError("this floating-point TIFF variant cannot be decoded; save it as 8- or 16-bit")
    if pixels.dtype != np.float32:
        raise UnsupportedImageError(f"{pixels.dtype} TIFF samples are not supported; save the image as 8- or 16-bit")
    pixels = np.nan_to_num(pixels, nan=0.0).clip(0.0, 1.0)
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    channels = pixels.shape[2]
    if channels >= 3:  # OpenCV returns BGR(A)
        pixels = pixels[..., [2, 1, 0, 3][:channels]]
    icc_profile = tags.get(_TIFF_ICC) or None
    return _decoded(np.ascontiguousarray(pixels), int(tags.get(_TIFF_ORIENTATION, 1)), channels <= 2,
                    channels in (2, 4), bytes(icc_profile) if icc_profile else None, "tiff")


def upscale_alpha(alpha: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Alpha (H, W) resized to `size` with a Lanczos filter; a constant alpha is just refilled."""
    low, high = alpha.min(), alpha.max()
    if low == high:
        return torch.full(size, float(low), dtype=torch.float32)
    return resample(alpha, size)


def output_format_for(source_format: str, requested: str | None = None) -> str:
    """The output format, resolved once per request: the requested one, else JPEG for JPEG input
    and PNG otherwise."""
    if requested is not None:
        fmt = requested.lower().replace("jpg", "jpeg")
        if fmt not in OUTPUT_FORMATS:
            raise InvalidInputError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {requested!r}")
        return fmt
    return "jpeg" if source_format == "jpeg" else "png"


def encode_like(rgb: torch.Tensor, source: DecodedImage, format: str, quality: int = DEFAULT_QUALITY) -> bytes:
    """Encode a model output (3, H, W) the way `source` was: its alpha (upscaled to H x W), gray or
    colour, bit depth and ICC profile, in the already resolved `format` (`output_format_for`)."""
    alpha = None if source.alpha is None else upscale_alpha(source.alpha, tuple(rgb.shape[-2:]))
    return encode_image(rgb, alpha=alpha, grayscale=source.grayscale, bit_depth=source.bit_depth,
                        icc_profile=source.icc_profile, format=format, quality=quality)


def encode_image(rgb: torch.Tensor, *, alpha: torch.Tensor | None = None, grayscale: bool = False,
                 bit_depth: int = 8, icc_profile: bytes | None = None, format: str = "png",
                 quality: int = DEFAULT_QUALITY) -> bytes:
    """Encode float RGB (3, H, W) in [0, 1] (values are rounded, not truncated) as `format`, one of
    OUTPUT_FORMATS; `quality` (JPEG/WebP) as the request contract checked it.

    16-bit output is PNG only (JPEG and WebP hold 8 bits). JPEG has no alpha: an alpha channel is
    composited over white, as most viewers show a transparent image.
    """
    fmt = format
    if fmt not in OUTPUT_FORMATS:
        raise InvalidInputError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {format!r}")
    if bit_depth not in (8, 16):
        raise InvalidInputError(f"bit depth must be 8 or 16, got {bit_depth}")
    planes = rgb.detach().to(torch.float32).cpu().clamp(0.0, 1.0)
    if alpha is not None and fmt == "jpeg":
        coverage = alpha.to(torch.float32).clamp(0.0, 1.0)
        planes, alpha = planes * coverage + (1.0 - coverage), None
    if grayscale:
        planes = sum(weight * plane for weight, plane in zip(_LUMA, planes)).unsqueeze(0)
    if alpha is not None:
        planes = torch.cat([planes, alpha.to(torch.float32).clamp(0.0, 1.0).unsqueeze(0)])
    pixels = planes.permute(1, 2, 0).numpy()

    if bit_depth == 16 and fmt == "png":
        return _encode_png16(np.rint(pixels * 65535.0).astype(np.uint16), icc_profile)
    channels = np.rint(pixels * 255.0).astype(np.uint8)
    image = Image.fromarray(channels[..., 0] if channels.shape[2] == 1 else channels)
    options = {"icc_profile": icc_profile} if icc_profile else {}
    if fmt in ("jpeg", "webp"):
        options["quality"] = quality
    buffer = io.BytesIO()
    image.save(buffer, format=fmt.upper(), **options)
    return buffer.getvalue()


def _sniff_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), None)


def _is_16bit_color(image: Image.Image, data: bytes) -> bool:
    """True for 16-bit files that Pillow would truncate (RGB, RGBA, gray+alpha)."""
    if image.format == "PNG":
        bit_depth, color_type = data[24], data[25]  # IHDR follows the 8-byte signature at fixed offsets
        return bit_depth == 16 and color_type in (2, 4, 6)
    if image.format == "TIFF":
        bits = image.tag_v2.get(258, (8,))
        return max(bits) == 16 and len(bits) > 1
    return False


def _decode_16bit(data: bytes, image: Image.Image) -> tuple[np.ndarray, bool, bool]:
    """16-bit colour or gray+alpha pixels via OpenCV (which ignores EXIF orientation here, as we
    apply it ourselves). OpenCV returns BGR(A); gray+alpha comes back as BGRA."""
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.dtype != np.uint16:
        raise ValueError("16-bit pixel data could not be decoded")
    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
    if image.format == "PNG":
        grayscale = data[25] == 4
    else:  # TIFF: two samples per pixel are gray + alpha
        grayscale = len(image.tag_v2.get(258, ())) == 2
    has_alpha = pixels.shape[2] == 4
    if grayscale:
        return pixels[..., [0, 3]], True, True
    order = [2, 1, 0, 3] if has_alpha else [2, 1, 0]
    return pixels[..., order], False, has_alpha


def _decode_with_pillow(image: Image.Image) -> tuple[np.ndarray, bool, bool]:
    """Pixels (H, W, C) uint8 or uint16 with C in {1, 2, 3, 4}, and (grayscale, has_alpha)."""
    image.seek(0)
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        return np.clip(np.asarray(image, dtype=np.int64), 0, 65535).astype(np.uint16)[..., None], True, False
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"))[..., None], True, False
    if mode in ("LA", "La"):
        return np.asarray(image.convert("LA")), True, True
    has_alpha = mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in image.info)
    return np.asarray(image.convert("RGBA" if has_alpha else "RGB")), False, has_alpha


def _apply_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation (1..8) applied to an (H, W, C) array. Pillow's ImageOps.exif_transpose
    does this only for Pillow images, and 16-bit RGB has no Pillow mode."""
    operations = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
        8: lambda a: np.rot90(a, k=1),
    }
    operation = operations.get(orientation)
    return pixels if operation is None else np.ascontiguousarray(operation(pixels))


def _profile_fits(icc_profile: bytes, grayscale: bool) -> bool:
    """Carry the ICC profile only when its colour space matches the output (a CMYK JPEG's profile
    would mislabel the RGB we write); unreadable profiles are dropped."""
    try:
        space = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile)).profile.xcolor_space.strip()
    except (OSError, ImageCms.PyCMSError):
        return False
    return space == ("GRAY" if grayscale else "RGB")


def _encode_png16(pixels: np.ndarray, icc_profile: bytes | None) -> bytes:
    height, width, channels = pixels.shape
    writer = png.Writer(width, height, greyscale=channels <= 2, alpha=channels in (2, 4), bitdepth=16)
    buffer = io.BytesIO()
    writer.write(buffer, pixels.reshape(height, width * channels))
    if not icc_profile:
        return buffer.getvalue()
    chunks = list(png.Reader(bytes=buffer.getvalue()).chunks())
    # iCCP: profile name, NUL, compression method 0 (zlib), compressed profile; right after IHDR.
    chunks.insert(1, (b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile)))
    out = io.BytesIO()
    png.write_chunks(out, chunks)
    return out.getvalue()
