"""The photo corpus: fetching from a tiny fake .deb (no network) and the committed corpus itself."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from s3diff_serve.cli import data as data_cli
from s3diff_serve.evaluation import photos
from s3diff_serve.evaluation.photos import (PhotoFetchError, fetch_photos, images_to_evaluate, load_corpus,
                                           load_manifest)

PACKAGE = "fake-wallpapers"
MEMBERS = {  # member path -> (width, height)
    "usr/share/wallpapers/Lake/contents/images/2560x1600.jpg": (40, 24),
    "usr/share/backgrounds/Hill_by_Someone.JPG": (30, 50),
    "usr/share/backgrounds/NotListed.jpg": (8, 8),
}
LAKE, HILL, _ = MEMBERS


def _jpeg(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def fake_deb(tmp_path_factory):
    """(path of a .deb holding small JPEGs at wallpaper-like paths, {member: bytes})."""
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not available")
    root = tmp_path_factory.mktemp("pkgroot")
    contents = {}
    for seed, (member, size) in enumerate(MEMBERS.items()):
        contents[member] = _jpeg(size, seed)
        (root / member).parent.mkdir(parents=True, exist_ok=True)
        (root / member).write_bytes(contents[member])
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN" / "control").write_text(
        f"Package: {PACKAGE}\nVersion: 1:2.0-3\nArchitecture: all\nMaintainer: Test <t@example.org>\n"
        "Description: test wallpapers\n")
    deb = tmp_path_factory.mktemp("deb") / f"{PACKAGE}_2.0-3_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)], check=True, capture_output=True)
    return deb, contents


@pytest.fixture
def downloads(fake_deb, monkeypatch):
    """Replaces apt-get download with a copy of the fake .deb; the list records each package asked for."""
    asked: list[str] = []

    def fake_download(package: str, into: Path) -> Path:
        asked.append(package)
        if package != PACKAGE:
            raise PhotoFetchError(f"apt-get download {package} failed: E: Unable to locate package {package}")
        return Path(shutil.copy(fake_deb[0], into))

    monkeypatch.setattr(photos, "download_deb", fake_download)
    return asked


def _corpus(tmp_path: Path, entries: list[dict]) -> Path:
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps({"photos": entries}))
    return path


def _entry(id_: str, member: str, split: str, source: str = f"deb:{PACKAGE}", licence: str = "CC0-1.0") -> dict:
    return {"id": id_, "source": source, "member": member, "expected_version": "x", "licence": licence,
            "author": "A. Photographer", "split": split}


ENTRIES = [_entry("lake", LAKE, "train"), _entry("hill", HILL, "validation", licence="CC-BY-4.0")]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fetch_copies_listed_members_byte_for_byte_into_split_folders(tmp_path, fake_deb, downloads):
    _, contents = fake_deb
    dest = tmp_path / "photos"
    manifest = fetch_photos(dest, corpus=_corpus(tmp_path, ENTRIES))

    assert manifest == dest / "manifest.json"
    assert (dest / "train" / "lake.jpg").read_bytes() == contents[LAKE]
    assert (dest / "validation" / "hill.jpg").read_bytes() == contents[HILL]  # suffix lower-cased
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == [
        "manifest.json", "train/lake.jpg", "validation/hill.jpg"]  # the unlisted member is not copied
    assert downloads == [PACKAGE]

    records = {r["id"]: r for r in json.loads(manifest.read_text())["photos"]}
    assert records["hill"] == {
        "id": "hill", "split": "validation", "path": "validation/hill.jpg", "source": f"deb:{PACKAGE}",
        "package": PACKAGE, "version": "1:2.0-3", "member": HILL, "width": 30, "height": 50,
        "licence": "CC-BY-4.0", "author": "A. Photographer", "sha256": _sha(contents[HILL])}
    assert records["lake"]["sha256"] == _sha(contents[LAKE]) and (records["lake"]["width"], records["lake"]["height"]) == (40, 24)

    loaded = load_manifest(dest)
    assert [(p.id, p.split, p.path, p.width, p.height, p.licence) for p in loaded] == [
        ("lake", "train", dest / "train" / "lake.jpg", 40, 24, "CC0-1.0"),
        ("hill", "validation", dest / "validation" / "hill.jpg", 30, 50, "CC-BY-4.0")]
    assert all(p.sha256 == _sha(p.path.read_bytes()) for p in loaded)
    assert images_to_evaluate(dest, "train") == [("train/lake.jpg", dest / "train" / "lake.jpg")]
    assert images_to_evaluate(dest, "validation") == [("validation/hill.jpg", dest / "validation" / "hill.jpg")]
    with pytest.raises(ValueError, match="split"):
        images_to_evaluate(dest, "test")


def test_python_package_photos_are_lossless_png(tmp_path, downloads):
    skimage_data = pytest.importorskip("skimage.data")
    entries = [_entry("astronaut", "data/astronaut.png", "train", source="skimage"),
               _entry("rocket", "data/rocket.jpg", "validation", source="skimage")]
    dest = tmp_path / "photos"
    fetch_photos(dest, corpus=_corpus(tmp_path, entries))

    assert downloads == []
    with Image.open(dest / "train" / "astronaut.png") as image:
        assert image.format == "PNG"
        assert np.array_equal(np.asarray(image), skimage_data.astronaut())
    with Image.open(dest / "validation" / "rocket.png") as image:
        assert np.array_equal(np.asarray(image), skimage_data.rocket())
    record = json.loads((dest / "manifest.json").read_text())["photos"][1]
    assert (record["package"], record["width"], record["height"]) == ("scikit-image", 640, 427)
    assert record["version"] and record["sha256"] == _sha((dest / "validation" / "rocket.png").read_bytes())


def test_second_run_reuses_files_and_refetches_only_a_damaged_one(tmp_path, fake_deb, downloads):
    corpus = _corpus(tmp_path, ENTRIES)
    dest = tmp_path / "photos"
    manifest = fetch_photos(dest, corpus=corpus)
    first = manifest.read_text()

    fetch_photos(dest, corpus=corpus)
    assert downloads == [PACKAGE]  # nothing downloaded the second time
    assert manifest.read_text() == first

    (dest / "train" / "lake.jpg").write_bytes(b"not the photo")
    fetch_photos(dest, corpus=corpus)
    assert downloads == [PACKAGE, PACKAGE]
    assert (dest / "train" / "lake.jpg").read_bytes() == fake_deb[1][LAKE]
    assert manifest.read_text() == first


def test_moving_a_photo_to_another_split_moves_its_file(tmp_path, downloads):
    dest = tmp_path / "photos"
    fetch_photos(dest, corpus=_corpus(tmp_path, ENTRIES))
    fetch_photos(dest, corpus=_corpus(tmp_path, [_entry("lake", LAKE, "validation"), ENTRIES[1]]))

    assert not (dest / "train" / "lake.jpg").exists()
    assert [path for _, path in images_to_evaluate(dest, "validation")] == [
        dest / "validation" / "hill.jpg", dest / "validation" / "lake.jpg"]  # in id order
    assert images_to_evaluate(dest, "train") == []


def test_missing_member_error_names_package_and_member(tmp_path, downloads):
    missing = "usr/share/wallpapers/Gone/contents/images/2560x1600.jpg"
    corpus = _corpus(tmp_path, [ENTRIES[0], _entry("gone", missing, "train")])
    with pytest.raises(PhotoFetchError, match=rf"{PACKAGE} 1:2\.0-3 has no member {re.escape(missing)}"):
        fetch_photos(tmp_path / "photos", corpus=corpus)
    assert not (tmp_path / "photos" / "manifest.json").exists()


def test_download_failure_names_the_package(tmp_path, monkeypatch):
    def failing_apt(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package no-such-wallpapers\n")

    monkeypatch.setattr(photos.subprocess, "run", failing_apt)
    with pytest.raises(PhotoFetchError, match="apt-get download no-such-wallpapers failed: E: Unable to locate"):
        photos.download_deb("no-such-wallpapers", tmp_path)


def test_cli_fetch_photos_prints_per_split_summary(tmp_path, monkeypatch, capsys, downloads):
    monkeypatch.setattr(photos, "CORPUS_FILE", _corpus(tmp_path, ENTRIES))
    parser = argparse.ArgumentParser(prog="s3diff")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "fetch-photos", str(tmp_path / "photos")])

    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "train: 1 photos, 0.0 MP" in out and "validation: 1 photos, 0.0 MP" in out
    assert (tmp_path / "photos" / "validation" / "hill.jpg").is_file()


def test_cli_reports_fetch_errors(tmp_path, monkeypatch, capsys, downloads):
    monkeypatch.setattr(photos, "CORPUS_FILE", _corpus(tmp_path, [_entry("x", "a.jpg", "train", source="deb:absent")]))
    parser = argparse.ArgumentParser(prog="s3diff")
    data_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "fetch-photos", str(tmp_path / "photos")])

    assert args.handler(args) == 2
    assert "error: apt-get download absent failed" in capsys.readouterr().out


@pytest.mark.parametrize("bad, message", [
    ([_entry("a", "x.jpg", "train"), _entry("a", "y.jpg", "train")], "appears twice"),
    ([_entry("a", "x.jpg", "test")], "split"),
    ([_entry("a", "x.jpg", "train", source="pypi:foo")], "unknown source"),
])
def test_load_corpus_rejects_malformed_entries(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        load_corpus(_corpus(tmp_path, bad))


# The committed corpus.

def test_committed_corpus_is_well_formed():
    entries = load_corpus()  # unique ids, known splits and sources
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", e["id"]) for e in entries)
    sources = Counter((e["source"], e["member"]) for e in entries)
    assert max(sources.values()) == 1  # no photo listed twice (so none can sit in both splits)
    assert all(e["licence"] and e["author"] for e in entries)


def test_committed_validation_split_spans_every_debian_package():
    entries = load_corpus()
    packages = {e["source"] for e in entries if e["source"].startswith("deb:")}
    assert packages == {"deb:plasma-workspace-wallpapers", "deb:mate-backgrounds", "deb:lomiri-wallpapers-16.04"}
    for package in packages:
        splits = Counter(e["split"] for e in entries if e["source"] == package)
        assert splits["validation"] >= 2 and splits["train"] > splits["validation"], package
    validation = sum(e["split"] == "validation" for e in entries)
    assert 6 <= validation <= len(entries) // 4
