"""schemathesis hooks for test_openapi_fuzz.py (loaded through SCHEMATHESIS_HOOKS): a body or
multipart part the schema sends as image/png, image/jpeg or image/webp is a real image of that
format. JSON Schema can only say `format: binary`; random bytes labelled image/png are
schema-valid yet no image, and the service rightly answers them 400 (corrupt) or 415 (not an
image format), which the positive_data_acceptance check would report."""
from __future__ import annotations

import schemathesis
from hypothesis import strategies as st

from tests.service.images import encode, random_rgb


def _images(fmt: str) -> st.SearchStrategy[bytes]:
    sizes = st.integers(1, 32)
    return st.builds(lambda height, width, seed: encode(random_rgb(height, width, seed), fmt),
                     sizes, sizes, st.integers(0, 1000))


for _media_type, _format in (("image/png", "PNG"), ("image/jpeg", "JPEG"), ("image/webp", "WEBP")):
    schemathesis.openapi.media_type(_media_type, _images(_format))
