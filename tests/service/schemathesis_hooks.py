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



# Pixel sizes of the output are valid only relative to the uploaded image's own size (each axis'
# implied scale must lie in [1, 8]) and only one size mode may be given: rules across the body and
# the query that JSON Schema cannot state. Generated schema-valid cases drop these fields (keeping
# `scale`, whose range the schema does state); schema-invalid cases keep them, as they must be
# refused either way. test_endpoints.py covers the pixel-size modes and their 422s.
PIXEL_SIZE_FIELDS = ("width", "height", "longest_side")


def _parts(case) -> list[dict]:
    return [part for part in (case.query, case.body) if isinstance(part, dict)]


def _negative(case) -> bool:
    return case.meta is not None and case.meta.generation.mode == schemathesis.GenerationMode.NEGATIVE


@schemathesis.hook.apply_to(path_regex="^/v1/(upscale|jobs)$", method="POST")
def map_case(context, case):
    if not _negative(case):
        for part in _parts(case):
            for name in PIXEL_SIZE_FIELDS:
                part.pop(name, None)
    return case
