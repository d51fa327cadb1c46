"""The photo corpus: real photographs for training and evaluating super-resolution.

Which photos, and which split each belongs to, is data in `photo_corpus.json`, so the
train/validation split never depends on a seed or on the order files happen to be listed in.
Most photos ship as wallpapers in Debian packages: `fetch_photos` downloads those packages with
`apt-get download` (never installs them) and copies the listed files byte for byte, so the
pixels are the photographer's JPEG and not a re-encoding of ours. A few small photos come from
scikit-image / scikit-learn sample data and are written as lossless PNG.

The written folder holds `<split>/<id>.<ext>` and `manifest.json` (versions, sizes, licences,
sha256s). A second run reuses every file whose sha256 still matches the manifest.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from s3diff_serve.evaluation.cache import sha256_file

CORPUS_FILE = Path(__file__).with_name("photo_corpus.json")
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "validation")
DEB_PREFIX = "deb:"
PYTHON_SOURCES = {"skimage": "scikit-image", "sklearn": "scikit-learn"}  # import name -> distribution


class PhotoFetchError(RuntimeError):
    """A package could not be fetched, or lacks a photo the corpus lists."""


@dataclass(frozen=True)
class Photo:
    id: str
    split: str
    path: Path
    width: int
    height: int
    source: str
    licence: str
    sha256: str


def load_corpus(corpus: Path | None = None) -> list[dict]:
    """The corpus entries, checked: unique ids and a known split and source for each."""
    corpus = corpus or CORPUS_FILE
    entries = json.loads(Path(corpus).read_text())["photos"]
    seen: set[str] = set()
    for entry in entries:
        if entry["id"] in seen:
            raise ValueError(f"{corpus}: photo id {entry['id']!r} appears twice")
        seen.add(entry["id"])
        if entry["split"] not in SPLITS:
            raise ValueError(f"{corpus}: {entry['id']} has split {entry['split']!r}, not one of {SPLITS}")
        if not (entry["source"].startswith(DEB_PREFIX) or entry["source"] in PYTHON_SOURCES):
            raise ValueError(f"{corpus}: {entry['id']} has unknown source {entry['source']!r}")
    return entries


def fetch_photos(dest: Path, *, corpus: Path | None = None) -> Path:
    """Write every corpus photo under `dest` and return the path of `dest/manifest.json`.

    Packages whose photos are all already present (sha256 as in the manifest) are not downloaded.
    """
    dest = Path(dest)
    entries = load_corpus(corpus or CORPUS_FILE)
    previous = _previous_records(dest)
    records = {e["id"]: previous[e["id"]] for e in entries if _still_valid(previous.get(e["id"]), e, dest)}

    missing = [e for e in entries if e["id"] not in records]
    packages = {e["source"].removeprefix(DEB_PREFIX) for e in missing if e["source"].startswith(DEB_PREFIX)}
    for package in sorted(packages):  # one download per package, however many of its photos are missing
        wanted = [e for e in missing if e["source"] == DEB_PREFIX + package]
        records.update(_fetch_from_deb(package, wanted, dest))
    for entry in missing:
        if not entry["source"].startswith(DEB_PREFIX):
            records[entry["id"]] = _fetch_from_python_package(entry, dest)

    for old in previous.values():  # a photo that moved split or left the corpus
        if records.get(old["id"], {}).get("path") != old["path"]:
            (dest / old["path"]).unlink(missing_ok=True)
    manifest = dest / MANIFEST_NAME
    _write_atomically(manifest, (json.dumps({"photos": [records[e["id"]] for e in entries]}, indent=2) + "\n").encode())
    return manifest


def load_manifest(dest: Path) -> list[Photo]:
    """The photos `fetch_photos` wrote under `dest`, in corpus order."""
    manifest = Path(dest) / MANIFEST_NAME
    if not manifest.is_file():
        raise FileNotFoundError(f"no {manifest}; write the corpus with `s3diff data fetch-photos {dest}`")
    return [Photo(id=r["id"], split=r["split"], path=Path(dest) / r["path"], width=r["width"], height=r["height"],
                  source=r["source"], licence=r["licence"], sha256=r["sha256"])
            for r in json.loads(manifest.read_text())["photos"]]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")  # what `images_to_evaluate` finds


def images_to_evaluate(folder: Path, split: str = "validation") -> list[tuple[str, Path]]:
    """(relative path, path) of each image to evaluate in `folder`: the corpus manifest's `split`
    (in id order) when the folder holds one, else every PNG/JPEG/WebP/TIFF file below it, searched
    recursively, in path order (DIV2K-val, RealSR, a folder of one's own photos)."""
    folder = Path(folder)
    if (folder / MANIFEST_NAME).is_file():
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        photos = sorted((p for p in load_manifest(folder) if p.split == split), key=lambda p: p.id)
        return [(p.path.relative_to(folder).as_posix(), p.path) for p in photos]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images")
    found = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    return [(path.relative_to(folder).as_posix(), path) for path in found]


def download_deb(package: str, into: Path) -> Path:
    """`apt-get download package` into `into` (nothing is installed); returns the .deb."""
    try:
        result = subprocess.run(["apt-get", "download", package], cwd=into, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise PhotoFetchError(f"apt-get is needed to download {package} (a Debian or Ubuntu system)") from exc
    debs = sorted(Path(into).glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no .deb written"]
        raise PhotoFetchError(f"apt-get download {package} failed: {detail[0]} "
                              "(is the package in your apt sources? try `apt-get update`)")
    return debs[0]


def _fetch_from_deb(package: str, entries: list[dict], dest: Path) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix="s3diff-photos-") as tmp:
        deb = download_deb(package, Path(tmp))
        version = _dpkg_deb(["-f", str(deb), "Version"], package).strip()
        root = Path(tmp) / "root"
        _dpkg_deb(["-x", str(deb), str(root)], package)
        records = {}
        for entry in entries:
            member = root / entry["member"]
            if not member.is_file():
                raise PhotoFetchError(f"package {package} {version} has no member {entry['member']} "
                                      f"(photo {entry['id']}); the corpus lists it")
            target = dest / entry["split"] / (entry["id"] + member.suffix.lower())
            _write_atomically(target, member.read_bytes())
            records[entry["id"]] = _record(entry, target, dest, package, version)
        return records


def _fetch_from_python_package(entry: dict, dest: Path) -> dict:
    """Sample photos bundled in a Python package, decoded and written as lossless PNG."""
    import io

    import numpy as np
    from PIL import Image

    source = entry["source"]
    spec = importlib.util.find_spec(source)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise PhotoFetchError(f"photo {entry['id']} needs the Python package {source} "
                              f"(pip install {PYTHON_SOURCES[source]})")
    member = Path(spec.submodule_search_locations[0]) / entry["member"]
    if not member.is_file():
        raise PhotoFetchError(f"package {source} has no member {entry['member']} (photo {entry['id']})")
    with Image.open(member) as image:
        pixels = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    target = dest / entry["split"] / f"{entry['id']}.png"
    _write_atomically(target, buffer.getvalue())
    distribution = PYTHON_SOURCES[source]
    return _record(entry, target, dest, distribution, importlib.metadata.version(distribution))


def _record(entry: dict, target: Path, dest: Path, package: str, version: str) -> dict:
    from PIL import Image

    with Image.open(target) as image:
        width, height = image.size
    return {"id": entry["id"], "split": entry["split"], "path": target.relative_to(dest).as_posix(),
            "source": entry["source"], "package": package, "version": version, "member": entry["member"],
            "width": width, "height": height, "licence": entry["licence"], "author": entry.get("author", ""),
            "sha256": sha256_file(target)}


def _previous_records(dest: Path) -> dict[str, dict]:
    manifest = dest / MANIFEST_NAME
    if not manifest.is_file():
        return {}
    return {r["id"]: r for r in json.loads(manifest.read_text())["photos"]}


def _still_valid(record: dict | None, entry: dict, dest: Path) -> bool:
    """The manifest's file is the photo this entry asks for and its bytes are unchanged."""
    if record is None:
        return False
    if any(record.get(k) != entry.get(k, "") for k in ("split", "source", "member", "licence", "author")):
        return False
    path = dest / record["path"]
    return path.is_file() and sha256_file(path) == record["sha256"]


def _dpkg_deb(args: list[str], package: str) -> str:
    try:
        result = subprocess.run(["dpkg-deb", *args], capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise PhotoFetchError(f"dpkg-deb is needed to unpack {package} (a Debian or Ubuntu system)") from exc
    if result.returncode != 0:
        raise PhotoFetchError(f"dpkg-deb {args[0]} failed on {package}: {result.stderr.strip()}")
    return result.stdout


def _write_atomically(path: Path, data: bytes) -> None:
    """Write via a temporary sibling so an interrupted run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
