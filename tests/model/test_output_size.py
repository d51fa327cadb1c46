"""Output size: exact dimensions for every way of asking, clear errors otherwise."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from s3diff_serve.model.errors import InvalidInputError
from s3diff_serve.model.output_size import resample, resolve_output_size


@pytest.mark.parametrize("request_kwargs, expected", [
    ({}, (1200, 1804)),                       # default: the model's native x4
    ({"scale": 1}, (300, 451)),
    ({"scale": 2.5}, (750, 1128)),            # 451 * 2.5 = 1127.5 -> 1128
    ({"scale": 8}, (2400, 3608)),
    ({"width": 902}, (600, 902)),             # aspect kept
    ({"height": 900}, (900, 1353)),
    ({"width": 1000, "height": 500}, (500, 1000)),  # both: exactly that, aspect may change
    ({"longest_side": 1000}, (665, 1000)),    # 300 * 1000 / 451 = 665.19
])
def test_resolve_output_size_landscape(request_kwargs, expected):
    assert resolve_output_size((300, 451), **request_kwargs) == expected


def test_longest_side_on_portrait_sets_height():
    assert resolve_output_size((640, 427), longest_side=2000) == (2000, 1334)  # 427 * 2000 / 640 = 1334.4


@pytest.mark.parametrize("request_kwargs, message", [
    ({"scale": 0.5}, "scale must be in"),
    ({"scale": 8.5}, "scale must be in"),
    ({"scale": 2, "width": 900}, "give only one"),
    ({"longest_side": 900, "height": 900}, "give only one"),
    ({"width": 100}, "implies a scale of 0.22"),   # shrinking is not super-resolution
    ({"height": 3000}, "implies a scale of 10"),
    ({"width": 900.5}, "positive integer"),
    ({"longest_side": 0}, "positive integer"),
])
def test_bad_requests_name_the_problem(request_kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        resolve_output_size((300, 451), **request_kwargs)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 3000), w=st.integers(1, 3000), scale=st.floats(1, 8))
def test_scale_gives_rounded_dimensions(h, w, scale):
    assert resolve_output_size((h, w), scale=scale) == (max(1, round(h * scale)), max(1, round(w * scale)))


@settings(max_examples=60, deadline=None)
@given(h=st.integers(8, 3000), w=st.integers(8, 3000), factor=st.floats(1, 8))
def test_longest_side_is_exact_and_keeps_aspect(h, w, factor):
    longest = round(max(h, w) * factor)
    out_h, out_w = resolve_output_size((h, w), longest_side=longest)
    assert max(out_h, out_w) == longest
    short_in, short_out = (w, out_w) if h >= w else (h, out_h)
    assert abs(short_out - short_in * longest / max(h, w)) <= 0.5


@pytest.mark.parametrize("size", [(1, 1), (7, 13), (64, 64), (121, 47), (400, 600)])
def test_resample_gives_exact_size_and_keeps_range(size):
    images = torch.rand(2, 3, 50, 70)
    result = resample(images, size)
    assert result.shape == (2, 3, *size)
    assert result.dtype == torch.float32
    assert 0.0 <= result.min() and result.max() <= 1.0


def test_resample_same_size_is_identity():
    images = torch.rand(1, 3, 32, 48)
    assert resample(images, (32, 48)) is images


def test_resample_matches_pillow_lanczos_on_8bit_photo_within_quantisation():
    """Independent check: Pillow's own 8-bit Lanczos on the same photo agrees to within 8-bit rounding."""
    from skimage import data
    photo = data.chelsea()[:120, :160]
    ours = resample(torch.from_numpy(photo).permute(2, 0, 1).float() / 255.0, (300, 400))
    theirs = np.asarray(Image.fromarray(photo).resize((400, 300), Image.Resampling.LANCZOS)).astype(np.float32) / 255
    difference = (ours.permute(1, 2, 0).numpy() - theirs)
    assert np.abs(difference).max() <= 1.5 / 255


def test_resample_downscale_antialiases():
    """A 1-pixel checkerboard shrunk 4x must average to grey, not alias into stripes."""
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2).float()[None]
    small = resample(checker, (16, 16))
    assert torch.allclose(small, torch.full_like(small, 0.5), atol=0.02)
