"""`s3diff evaluate` on a two-photo corpus with tiny random weights: the record, the determinism of
the LR, the crops, the contact sheet, and PSNR checked against scikit-image on the saved files."""
from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio

from s3diff_serve.cli import evaluate as cli_evaluate
from s3diff_serve.evaluation import metrics
from s3diff_serve.evaluation.cache import MissingWeightsError
from s3diff_serve.evaluation.contact_sheet import GAP, LINE
from s3diff_serve.evaluation.evaluate import centre_crop, evaluate, mean_by_method
from s3diff_serve.training.degradations import realistic_lowres
from s3diff_serve.model import S3DiffPipeline

CROP = 64
class FakeSuite:
    """MetricSuite's interface without networks: real PSNR/SSIM, cheap stand-ins for the rest."""

    def __init__(self, cache=None, device="cpu"):
        pass

    def __call__(self, sr, hr, border=4):
        gap = float(np.abs(sr.astype(float) - hr.astype(float)).mean() / 255)
        return {"psnr": metrics.psnr(sr, hr, border=border),
                "psnr_y": metrics.psnr(sr, hr, y_channel=True, border=border),
                "ssim": metrics.ssim(sr, hr, y_channel=True, border=border), "lpips_alex": gap, "lpips_vgg": 2 * gap,
                "dists": gap / 2, "niqe": float(sr.std())}


@pytest.fixture(autouse=True)
def cheap(monkeypatch, load_weights_once):
    """Fake metrics (the real suite has its own tests) and one weights load per folder."""
    monkeypatch.setattr(metrics, "MetricSuite", FakeSuite)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A manifest as `s3diff data fetch-photos` writes it: two validation photos (listed out of id
    order, one grayscale) and one train photo."""
    root = tmp_path_factory.mktemp("photos")
    photos = [("b-chelsea", "validation", skdata.chelsea()), ("a-camera", "validation", skdata.camera()),
              ("c-coffee", "train", skdata.coffee())]
    records = []
    for photo_id, split, pixels in photos:
        path = root / split / f"{photo_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
        records.append({"id": photo_id, "split": split, "path": f"{split}/{photo_id}.png", "source": "skimage",
                        "package": "skimage", "version": "0", "member": "", "width": pixels.shape[1],
                        "height": pixels.shape[0], "licence": "CC0", "author": "",
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    (root / "manifest.json").write_text(json.dumps({"photos": records}))
    return root


@pytest.fixture(scope="module")
def run(corpus, tiny_merged_dir, tmp_path_factory):
    """One evaluation with bicubic and the tiny model (fake metrics patched for the module)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "MetricSuite", FakeSuite)
        out = tmp_path_factory.mktemp("eval")
        result = evaluate(corpus, out, methods=("bicubic", "s3diff"), weights=tiny_merged_dir, crop=CROP,
                          progress=False, device="cpu")
    return out, result


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_record_structure_and_means(run, tiny_merged_dir):
    out, result = run
    assert json.loads((out / "metrics.json").read_text()) == result
    conditions = result["conditions"]
    assert (conditions["degradation"], conditions["crop"], conditions["split"], conditions["seed"]) == \
        ("clean", CROP, "validation", 0)
    assert conditions["weights"]["source"] == str(tiny_merged_dir)
    assert conditions["weights"]["id"] == S3DiffPipeline.from_merged(tiny_merged_dir, "cpu", None).weights_id
    assert conditions["machine"]["cpu"] and conditions["machine"]["torch_threads"] >= 1
    # sorted by id, validation only, every method for every photo
    assert [(r["id"], r["method"]) for r in result["images"]] == [
        ("a-camera", "bicubic"), ("a-camera", "s3diff"), ("b-chelsea", "bicubic"), ("b-chelsea", "s3diff")]
    keys = {"psnr", "psnr_y", "ssim", "lpips_alex", "lpips_vgg", "dists", "niqe", "seconds"}
    for record in result["images"]:
        assert keys <= set(record) and record["seconds"] > 0
    assert set(result["mean"]) == {"bicubic", "s3diff"}
    for method, means in result["mean"].items():
        assert set(means) == keys
        for key in keys:
            values = [r[key] for r in result["images"] if r["method"] == method]
            assert means[key] == pytest.approx(sum(values) / 2)
    # the two methods really differ (the tiny model is random): means are not taken across methods
    assert result["mean"]["bicubic"]["psnr"] != result["mean"]["s3diff"]["psnr"]


def test_saved_crops_lowres_and_outputs(run, corpus):
    out, _ = run
    chelsea = skdata.chelsea()
    hr = _png(out / "images" / "validation" / "b-chelsea_hr.png")
    top, left = (chelsea.shape[0] - CROP) // 2, (chelsea.shape[1] - CROP) // 2
    np.testing.assert_array_equal(hr, chelsea[top:top + CROP, left:left + CROP])
    lr = _png(out / "images" / "validation" / "b-chelsea_lr.png")
    assert lr.shape == (CROP // 4, CROP // 4, 3)
    expected_lr = np.asarray(Image.fromarray(hr).resize((CROP // 4, CROP // 4), Image.BICUBIC))
    np.testing.assert_array_equal(lr, expected_lr)
    for method in ("bicubic", "s3diff"):
        assert _png(out / "images" / "validation" / f"b-chelsea_{method}.png").shape == (CROP, CROP, 3)
    assert _png(out / "images" / "validation" / "a-camera_hr.png").shape == (CROP, CROP, 3)  # grayscale photo -> RGB


def test_bicubic_psnr_matches_skimage_on_saved_images(run):
    out, result = run
    for record in (r for r in result["images"] if r["method"] == "bicubic"):
        stem = record["path"].removesuffix(".png")
        hr = _png(out / "images" / f"{stem}_hr.png")[4:-4, 4:-4]
        sr = _png(out / "images" / f"{stem}_bicubic.png")[4:-4, 4:-4]
        assert record["psnr"] == pytest.approx(peak_signal_noise_ratio(hr, sr, data_range=255), abs=1e-9)
        y_hr, y_sr = rgb2ycbcr(hr)[..., 0], rgb2ycbcr(sr)[..., 0]
        assert record["psnr_y"] == pytest.approx(peak_signal_noise_ratio(y_hr, y_sr, data_range=255), abs=1e-6)


def test_contact_sheet_size(run):
    out, _ = run
    with Image.open(out / "contact_sheet.png") as sheet:
        # LR | bicubic | ours | HR; two rows of a 256 px tile and a caption of label + two lines of numbers
        assert sheet.size == (GAP + 4 * (256 + GAP), GAP + 2 * (256 + 3 * LINE + 2 * GAP))
        pixels = np.asarray(sheet.convert("RGB"))
    tile = pixels[GAP:GAP + 256, GAP + 3 * (256 + GAP):GAP + 3 * (256 + GAP) + 256]  # first row's HR
    hr = np.asarray(Image.open(out / "images" / "validation" / "a-camera_hr.png").convert("RGB").resize((256, 256), Image.NEAREST))
    np.testing.assert_array_equal(tile, hr)


@pytest.mark.parametrize("degradation", ["clean", "realistic"])
def test_same_lowres_in_every_run(corpus, tmp_path, degradation):
    lowres = []
    for name in ("first", "second"):
        maker = {"make_lowres": realistic_lowres} if degradation == "realistic" else {}
        evaluate(corpus, tmp_path / name, methods=("bicubic",), degradation=degradation, crop=CROP, progress=False,
                 **maker)
        lowres.append([_png(tmp_path / name / "images" / "validation" / f"{i}_lr.png")
                        for i in ("a-camera", "b-chelsea")])
    for a, b in zip(*lowres):
        assert a.shape == (CROP // 4, CROP // 4, 3)
        np.testing.assert_array_equal(a, b)


def test_any_folder_of_images_is_evaluated_recursively(tmp_path):
    """No manifest: every PNG/JPEG/WebP/TIFF below the folder, in path order; a small photo is
    centre-cropped to its largest multiple-of-4 square; unreadable files are listed with a reason."""
    folder = tmp_path / "mine"
    (folder / "trip" / "day2").mkdir(parents=True)
    coffee, chelsea = skdata.coffee(), skdata.chelsea()
    Image.fromarray(coffee).save(folder / "b.webp", lossless=True)
    Image.fromarray(chelsea).save(folder / "trip" / "a.JPG", quality=95)
    Image.fromarray(coffee[:30, :41]).save(folder / "trip" / "day2" / "small.tif")
    (folder / "trip" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    result = evaluate(folder, tmp_path / "out", methods=("bicubic",), crop=CROP, progress=False)
    assert [r["path"] for r in result["images"]] == ["b.webp", "trip/a.JPG", "trip/day2/small.tif"]
    assert [s["path"] for s in result["skipped"]] == ["trip/broken.png"]
    assert "not a readable image" in result["skipped"][0]["reason"]
    assert result["conditions"]["photos"] == 3
    small = _png(tmp_path / "out" / "images" / "trip" / "day2" / "small_hr.png")
    np.testing.assert_array_equal(small, coffee[1:29, 6:34])  # 28x28: (30-28)/2, (41-28)//2
    webp = _png(tmp_path / "out" / "images" / "b_hr.png")
    top, left = (coffee.shape[0] - CROP) // 2, (coffee.shape[1] - CROP) // 2
    np.testing.assert_array_equal(webp, coffee[top:top + CROP, left:left + CROP])


def test_a_folder_without_a_single_readable_image_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images to evaluate"):
        evaluate(tmp_path / "empty", tmp_path / "out", methods=("bicubic",), crop=CROP, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(ValueError, match="none of the 1 images"):
        evaluate(tmp_path / "junk", tmp_path / "out", methods=("bicubic",), crop=CROP, progress=False)


def test_cli_evaluates_a_plain_folder(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    Image.fromarray(skdata.chelsea()).save(tmp_path / "photos" / "cat.png")
    assert _cli("--data", tmp_path / "photos", "--methods", "bicubic", "--crop", CROP, "--out", tmp_path / "out") == 0
    assert [r["path"] for r in json.loads((tmp_path / "out" / "metrics.json").read_text())["images"]] == ["cat.png"]


def test_realistic_lowres_depends_on_seed_and_photo():
    hr = centre_crop(skdata.astronaut(), CROP)
    first = realistic_lowres(hr, seed=0, index=0)
    np.testing.assert_array_equal(first, realistic_lowres(hr, seed=0, index=0))
    assert not np.array_equal(first, realistic_lowres(hr, seed=1, index=0))
    assert not np.array_equal(first, realistic_lowres(hr, seed=0, index=1))
    assert first.dtype == np.uint8 and first.shape == (CROP // 4, CROP // 4, 3)


def test_centre_crop_of_a_small_photo_is_the_largest_multiple_of_four_square():
    image = np.arange(30 * 43 * 3, dtype=np.uint8).reshape(30, 43, 3)
    crop = centre_crop(image, 512)
    assert crop.shape == (28, 28, 3)
    np.testing.assert_array_equal(crop, image[1:29, 7:35])
    assert centre_crop(image, 8).shape == (8, 8, 3)


def test_mean_by_method_keeps_methods_apart():
    records = [{"id": "a", "method": "x", "psnr": 10.0}, {"id": "b", "method": "x", "psnr": 20.0},
               {"id": "a", "method": "y", "psnr": 40.0}]
    assert mean_by_method(records) == {"x": {"psnr": 15.0}, "y": {"psnr": 40.0}}


def test_missing_realesrgan_weights_raise(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("S3DIFF_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(MissingWeightsError, match="fetch-realesrgan"):
        evaluate(corpus, tmp_path / "out", methods=("bicubic", "realesrgan"), crop=CROP, progress=False)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_bad_options_raise(corpus, tmp_path):
    with pytest.raises(ValueError, match="multiple of 4"):
        evaluate(corpus, tmp_path, methods=("bicubic",), crop=66, progress=False)
    with pytest.raises(ValueError, match="degradation"):
        evaluate(corpus, tmp_path, methods=("bicubic",), degradation="jpeg", progress=False)
    with pytest.raises(MissingWeightsError):
        evaluate(corpus, tmp_path, methods=("s3diff",), weights=tmp_path / "absent", progress=False)


@pytest.mark.network
def test_real_metric_suite(metric_weights, corpus, tmp_path, monkeypatch):
    monkeypatch.undo()
    result = evaluate(corpus, tmp_path, methods=("bicubic",), crop=192, limit=1, progress=False, device="cpu")
    (record,) = result["images"]
    assert record["id"] == "a-camera"
    assert 15 < record["psnr_y"] < 45 and 0 < record["lpips_alex"] < 1 and 0 < record["dists"] < 1
    assert np.isfinite(record["niqe"])


# --------------------------------------------------------------------------- the CLI


def _cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="s3diff")
    cli_evaluate.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["evaluate", *map(str, argv)])
    return args.handler(args)


def test_cli_prints_the_mean_table(corpus, tmp_path, tiny_merged_dir, capsys):
    code = _cli("--data", corpus, "--weights", tiny_merged_dir, "--methods", "bicubic", "--crop", CROP,
                "--limit", 1, "--out", tmp_path)
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:3] == ["method", "psnr", "psnr_y"]
    assert printed.splitlines()[1].split()[0] == "bicubic"
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["id"] for r in result["images"]] == ["a-camera"]
    assert f"{result['mean']['bicubic']['psnr']:.2f}" in printed


def test_cli_without_corpus_says_how_to_fetch_it(tmp_path, capsys):
    assert _cli("--data", tmp_path / "nothing", "--methods", "bicubic", "--out", tmp_path / "out") == 2
    assert "s3diff data fetch-photos" in capsys.readouterr().err


def test_cli_s3diff_weights_that_do_not_exist(corpus, tmp_path, capsys):
    assert _cli("--data", corpus, "--weights", tmp_path / "absent", "--out", tmp_path, "--methods", "s3diff") == 2
    assert "not found" in capsys.readouterr().err


def test_cli_missing_realesrgan_weights(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("S3DIFF_CACHE", str(tmp_path / "empty-cache"))
    assert _cli("--data", corpus, "--methods", "bicubic,realesrgan", "--crop", CROP, "--out", tmp_path) == 2
    assert "s3diff weights fetch-realesrgan" in capsys.readouterr().err


def test_cli_rejects_unknown_methods_and_bad_crops(capsys):
    for argv in (["--methods", "bicubic,magic"], ["--crop", "30"]):
        with pytest.raises(SystemExit) as exit_info:
            _cli("--data", "d", "--out", "o", *argv)
        assert exit_info.value.code == 2


def test_training_curve_moving_average_and_plot(tmp_path):
    from s3diff_serve.evaluation.training_curve import moving_average, plot_training_log

    assert moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2).tolist() == [1.0, 2.0, 4.0, 6.0]
    log = tmp_path / "train_log.csv"
    log.write_text("step,total,mse,l1,lpips,estimator\n" + "".join(f"{i},1,0,{1 / i},0.5,0.1\n" for i in range(1, 30)))
    out = plot_training_log(log, tmp_path / "curve.png")
    assert Image.open(out).size[0] > 300
