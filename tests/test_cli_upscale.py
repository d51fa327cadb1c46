"""`s3diff upscale` end to end on tiny merged weights: real photos and special-case files."""
from __future__ import annotations

import io

import numpy as np
import png
import pytest
import torch
from PIL import Image
from skimage import data as photos

from s3diff_serve.cli.main import main
from s3diff_serve.model import S3DiffPipeline
from s3diff_serve.model.image_io import decode_image


@pytest.fixture(autouse=True)
def _weights_loaded_once(load_weights_once):
    """Every CLI call here reuses the first load of its weights (tests/conftest.py)."""


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["upscale", *map(str, argv)])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Small real photos and generated special cases, one folder."""
    folder = tmp_path_factory.mktemp("inputs")
    Image.fromarray(photos.chelsea()[100:120, 150:174]).save(folder / "chelsea.png")
    Image.fromarray(photos.coffee()[200:216, 300:320]).save(folder / "coffee.jpg", quality=92)
    alpha = np.zeros((16, 16), np.uint8)
    alpha[4:12, 4:12] = 255
    Image.fromarray(np.dstack([photos.astronaut()[:16, :16], alpha])).save(folder / "sticker.png")
    Image.fromarray(photos.camera()[200:216, 200:216]).save(folder / "camera.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    Image.fromarray(photos.rocket()[:16, :24]).save(folder / "rotated.jpg", exif=exif.tobytes())
    deep = (np.random.default_rng(0).random((16, 16, 3)) * 65535).astype(np.uint16)
    with open(folder / "deep.png", "wb") as handle:
        png.Writer(16, 16, greyscale=False, bitdepth=16).write(handle, deep.reshape(16, -1))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "notes.txt").write_text("not an image, and not picked from a folder")
    return folder


def test_single_file_matches_the_python_api(capsys, tmp_path, inputs, tiny_merged_dir):
    target = tmp_path / "cat.png"
    code, _ = _run(capsys, inputs / "chelsea.png", "-o", target, "--weights", tiny_merged_dir,
                   "--noise", "0.3", "--blur", "0.2", "--dtype", "fp32")
    assert code == 0
    pipe = S3DiffPipeline.from_merged(tiny_merged_dir, dtype="fp32")
    expected = pipe.enhance(decode_image(inputs / "chelsea.png").rgb[None], noise=0.3, blur=0.2).images[0]
    expected_u8 = np.rint(expected.permute(1, 2, 0).numpy() * 255).astype(np.uint8)  # rounded, not truncated
    assert np.array_equal(np.asarray(Image.open(target)), expected_u8)


def test_folder_keeps_every_special_case_and_reports_the_broken_file(capsys, tmp_path, inputs, tiny_merged_dir):
    out = tmp_path / "out"
    code, err = _run(capsys, inputs, "-o", out, "--weights", tiny_merged_dir, "--noise", "0.1", "--blur", "0.1")
    assert code == 1  # one file failed, the others were written
    assert "broken.png" in err and "corrupt or truncated" in err
    assert sorted(p.name for p in out.iterdir()) == [
        "camera.jpg", "chelsea.png", "coffee.jpg", "deep.png", "rotated.jpg", "sticker.png"]

    assert Image.open(out / "chelsea.png").size == (96, 80)
    sticker = Image.open(out / "sticker.png")
    assert sticker.mode == "RGBA"
    sticker_alpha = np.asarray(sticker)[..., 3]
    assert sticker_alpha[28:36, 28:36].min() == 255 and sticker_alpha[:4].max() == 0  # opaque centre, clear border
    camera = Image.open(out / "camera.jpg")
    assert camera.format == "JPEG" and camera.mode == "L" and camera.size == (64, 64)
    assert Image.open(out / "rotated.jpg").size == (64, 96)  # EXIF orientation applied: 24x16 shown as 16x24
    width, height, _, info = png.Reader(filename=str(out / "deep.png")).read()
    assert (width, height, info["bitdepth"], info["greyscale"]) == (64, 64, 16, False)


@pytest.mark.parametrize("size_flags, expected_size", [
    (["--scale", "2"], (48, 40)),
    (["--scale", "5.5"], (132, 110)),
    (["--width", "50"], (50, 42)),           # 20 * 50 / 24 = 41.7
    (["--width", "30", "--height", "25"], (30, 25)),
    (["--longest-side", "100"], (100, 83)),
])
def test_output_size_flags_give_exact_dimensions(capsys, tmp_path, inputs, tiny_merged_dir, size_flags, expected_size):
    target = tmp_path / "cat.webp"
    code, _ = _run(capsys, inputs / "chelsea.png", "-o", target, "--weights", tiny_merged_dir,
                   "--noise", "0.5", "--blur", "0.5", "--quality", "80", *size_flags)
    assert code == 0
    written = Image.open(target)
    assert written.format == "WEBP" and written.size == expected_size


def test_quoted_glob_and_forced_format(capsys, tmp_path, inputs, tiny_merged_dir):
    out = tmp_path / "globbed"
    code, err = _run(capsys, f"{inputs}/c*.jpg", "-o", out, "--weights", tiny_merged_dir,
                     "--noise", "0", "--blur", "0", "--format", "png", "--color-fix", "adain")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["camera.png", "coffee.png"]
    assert Image.open(out / "camera.png").mode == "L"


def test_a_size_one_image_cannot_take_fails_that_file_only(capsys, tmp_path, inputs, tiny_merged_dir):
    code, err = _run(capsys, inputs / "chelsea.png", inputs / "sticker.png", "-o", tmp_path, "--weights",
                     tiny_merged_dir, "--noise", "0", "--blur", "0", "--width", "150")
    assert code == 1
    assert "sticker.png" in err and "implies a scale of 9.38" in err  # 16 px -> 150 px is past x8
    assert Image.open(tmp_path / "chelsea.png").size == (150, 125)  # 24 px -> 150 px is x6.25
    assert not (tmp_path / "sticker.png").exists()


def test_unusable_arguments_stop_before_any_work(capsys, tmp_path, inputs, tiny_merged_dir):
    code, err = _run(capsys, tmp_path / "missing.png", "-o", tmp_path / "x.png", "--weights", tiny_merged_dir)
    assert code == 2 and "no image file found" in err
    code, err = _run(capsys, inputs / "chelsea.png", "-o", tmp_path / "x.png", "--weights", tmp_path / "nowhere")
    assert code == 2 and "cannot load weights" in err
    code, err = _run(capsys, inputs / "chelsea.png", "-o", tmp_path, "--weights", tiny_merged_dir,
                     "--scale", "2", "--width", "40")
    assert code == 2 and "only one of" in err
    for flag, value, message in (("--scale", "9", "scale: Input should be less than or equal to 8"),
                                 ("--noise", "1.5", "noise: Input should be less than or equal to 1"),
                                 ("--quality", "0", "quality: Input should be greater than or equal to 1")):
        code, err = _run(capsys, inputs / "chelsea.png", "-o", tmp_path, "--weights", tiny_merged_dir, flag, value)
        assert code == 2 and message in err
    for bad_flags in (["--tile-size", "20"], ["--color-fix", "sepia"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["upscale", str(inputs / "chelsea.png"), "-o", str(tmp_path), "--weights", str(tiny_merged_dir),
                  *bad_flags])
        assert exit_info.value.code == 2
        assert bad_flags[0] in capsys.readouterr().err
