"""Local container images for the stack test, made without any registry: Debian root filesystems
from mmdebstrap imported as base images (tagged by a hash of everything that goes into them, so a
machine builds each once), and the project's images built from its own Dockerfiles on top.

Also a command line, so the images can be made ahead of a test run:
    python -m tests.deploy.images"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"  # python3 is 3.11 there, the Python of the CPU torch wheel and of the locks
TORCH_WHEEL_GLOB = "torch-2.13.0*-cp311-*.whl"
WHEELS_DIR = REPO_ROOT / "docker" / "wheels"
PROMETHEUS_UID = 65534  # nobody, as in the official image


def host_ca_bundle() -> Path:
    """The CA bundle this machine's pip trusts (PIP_CERT), so pip inside a build reaches PyPI too."""
    return Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True)
class DebianImage:
    """A minbase Debian rootfs with `packages`, the host's CA bundle, extra hooks and image settings."""

    name: str
    packages: tuple[str, ...]
    hooks: tuple[str, ...] = ()
    changes: tuple[str, ...] = ()

    def tag(self) -> str:
        digest = hashlib.sha256(json.dumps([SUITE, self.packages, self.hooks, self.changes]).encode())
        digest.update(host_ca_bundle().read_bytes())
        return f"s3diff-test/{self.name}:{digest.hexdigest()[:16]}"

    def ensure(self) -> str:
        tag = self.tag()
        if image_exists(tag):
            return tag
        bundle = host_ca_bundle()
        with tempfile.TemporaryDirectory(prefix="mmdebstrap-") as tmp:
            rootfs = Path(tmp) / "rootfs.tar"
            command = ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(self.packages)}",
                       f"--customize-hook=upload {bundle} /usr/local/share/ca-certificates/host-bundle.crt",
                       f"--customize-hook=upload {bundle} /etc/ssl/certs/ca-certificates.crt",
                       *(f"--customize-hook={hook}" for hook in self.hooks), SUITE, str(rootfs)]
            subprocess.run(["nice", "-n", "10", *command], check=True, capture_output=True, timeout=900)
            changes = [arg for change in self.changes for arg in ("--change", change)]
            subprocess.run(["docker", "import", *changes, str(rootfs), tag], check=True, capture_output=True,
                           timeout=300)
        return tag


SERVICE_BASE = DebianImage("debian-python", ("ca-certificates", "python3", "python3-venv"))
PROMETHEUS = DebianImage(
    "prometheus", ("ca-certificates", "prometheus"),
    hooks=(f'mkdir -p "$1/prometheus" && chown {PROMETHEUS_UID}:{PROMETHEUS_UID} "$1/prometheus"',),
    changes=(f"USER {PROMETHEUS_UID}", "WORKDIR /prometheus", 'ENTRYPOINT ["/usr/bin/prometheus"]',
             'CMD ["--config.file=/etc/prometheus/prometheus.yml"]', "EXPOSE 9090"))


def ensure_all(*images: DebianImage) -> list[str]:
    """Make the missing ones side by side: mmdebstrap mostly waits on downloads."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(DebianImage.ensure, images))


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def image_size_bytes(tag: str) -> int:
    out = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", tag], check=True,
                         capture_output=True, text=True).stdout
    return int(out)


def offer_local_torch_wheel() -> Path | None:
    """Copy the CPU torch wheel that this machine's pip finds (PIP_FIND_LINKS) into docker/wheels/,
    where the Dockerfiles look first; None when there is none (the build then uses the index)."""
    for folder in os.environ.get("PIP_FIND_LINKS", "").split():
        if folder.startswith("file://"):
            folder = folder.removeprefix("file://")
        for wheel in sorted(Path(folder).glob(TORCH_WHEEL_GLOB)):
            target = WHEELS_DIR / wheel.name
            if not target.is_file() or target.stat().st_size != wheel.stat().st_size:
                shutil.copyfile(wheel, target)
            return target
    return None


def build(dockerfile: str, tag: str, base: str) -> float:
    """docker build from the repository root; returns the seconds it took."""
    started = time.monotonic()
    result = subprocess.run(
        ["nice", "-n", "10", "docker", "build", "-f", f"docker/{dockerfile}", "--build-arg", f"BASE_IMAGE={base}",
         "-t", tag, "."], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"docker build -f docker/{dockerfile} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    return time.monotonic() - started


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="also build the training image")
    args = parser.parse_args()
    started = time.monotonic()
    base, prometheus = ensure_all(SERVICE_BASE, PROMETHEUS)
    print(f"base images in {time.monotonic() - started:.0f} s: {base}, {prometheus}")
    offer_local_torch_wheel()
    targets = [("service.Dockerfile", "s3diff-serve:test")] + ([("train.Dockerfile", "s3diff-train:test")] if args.train else [])
    for dockerfile, tag in targets:
        seconds = build(dockerfile, tag, base)
        print(f"{tag}: built in {seconds:.0f} s, {image_size_bytes(tag) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
