"""Small images and Prometheus parsing shared by the service tests."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encode(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_bytes(height: int = 24, width: int = 40, seed: int = 0) -> bytes:
    return encode(random_rgb(height, width, seed))


def decode(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from Prometheus exposition text."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def metric(text: str, name: str, **labels: str) -> float:
    return metric_samples(text).get((name, tuple(sorted(labels.items()))), 0.0)
