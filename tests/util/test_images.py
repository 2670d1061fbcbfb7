"""The one model-input recipe (pad to a white square, then resize) and the cheap decode of big JPEGs that feeds it."""

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from illust2vec.util import images
from illust2vec.util.images import DRAFT_INFO, DRAFT_MARGIN, load_for_input, load_rgb, pad_resize

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def jpeg(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def test_a_wide_picture_is_padded_white_and_centred():
    picture = Image.new("RGB", (4, 2), RED)
    square = np.asarray(pad_resize(picture, 4))  # already as wide as the square: padding only, no resize
    assert square.shape == (4, 4, 3)
    assert (square[[0, 3]] == WHITE).all() and (square[1:3] == RED).all()
    tall = np.asarray(pad_resize(Image.new("RGB", (2, 4), BLUE), 4))
    assert (tall[:, [0, 3]] == WHITE).all() and (tall[:, 1:3] == BLUE).all()


def test_padding_comes_before_resizing():
    # 2x1: padded to 2x2 with the picture in the top row (offset (2 - 1) // 2 = 0), then enlarged to 4x4: red above,
    # white below. Resizing first would give a 4x2 red band centred on rows 1 and 2.
    square = np.asarray(pad_resize(Image.new("RGB", (2, 1), RED), 4)).astype(int)
    assert square.shape == (4, 4, 3)
    assert (square[0, :, 1] < 40).all() and (square[3, :, 1] > 215).all()  # green: 0 in red, 255 in white


def test_a_square_of_the_right_size_is_left_alone_and_others_are_resized():
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    picture = Image.fromarray(pixels)
    assert np.array_equal(np.asarray(pad_resize(picture, 8)), pixels)
    assert pad_resize(picture, 5).size == (5, 5) and pad_resize(Image.new("RGB", (300, 17), RED), 64).size == (64, 64)


def big_picture(width: int, height: int) -> Image.Image:
    """A smooth picture (blocks of colour, a gradient): draft decoding changes it little."""
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    pixels = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1))], axis=2)
    pixels = np.concatenate([pixels, np.full((height, width, 1), 128.0)], axis=2)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize("width, height", [(1003, 611), (611, 1003), (997, 997)])
def test_a_drafted_jpeg_gives_the_square_of_a_full_decode(width, height):
    size = 64
    data = jpeg(big_picture(width, height))
    drafted = load_for_input(data, size)
    assert drafted.info[DRAFT_INFO][:3] == (width, height, drafted.info[DRAFT_INFO][2])
    scale = drafted.info[DRAFT_INFO][2]
    assert scale in (2, 4, 8) and max(drafted.size) >= DRAFT_MARGIN * size
    full = np.asarray(pad_resize(load_rgb(data), size)).astype(int)
    fast = np.asarray(pad_resize(drafted, size)).astype(int)
    # The same region of the picture; only the edge where a partial DCT block meets the white padding differs.
    assert np.abs(full - fast).mean() < 0.5 and np.abs(full - fast).max() <= 24
    plain = drafted.copy()
    del plain.info[DRAFT_INFO]  # without the note, the small picture is padded as if it were the whole one
    assert not np.array_equal(np.asarray(pad_resize(plain, size)), fast)


def test_only_big_upright_jpegs_are_drafted():
    size = 64
    big = big_picture(1003, 611)
    assert DRAFT_INFO not in load_for_input(jpeg(big), 200).info  # 1003 < 6 x 200: decoded in full
    assert load_for_input(jpeg(big), 200).size == (1003, 611)
    png = io.BytesIO()
    big.save(png, "PNG")
    assert DRAFT_INFO not in load_for_input(png.getvalue(), size).info
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: decoded in full, and turned upright
    rotated = load_for_input(jpeg(big, exif=exif), size)
    assert DRAFT_INFO not in rotated.info and rotated.size == (611, 1003)


def drawn_picture(width: int, height: int) -> Image.Image:
    """The smooth picture with hard edges on it, as line art has: black-outlined discs and thin lines."""
    picture = big_picture(width, height)
    draw = ImageDraw.Draw(picture)
    for i in range(6):
        x, y, r = width * (i + 1) // 7, height * (6 - i) // 7, min(width, height) // 9
        draw.ellipse((x - r, y - r, x + r, y + r), fill=(250, 200, 210), outline=(0, 0, 0), width=3)
        draw.line((0, height * i // 6, width, height * (i + 1) // 6), fill=(20, 20, 30), width=2)
    return picture


@pytest.mark.parametrize("width, height", [(1003, 611), (611, 1003), (997, 997)])
def test_a_square_six_times_the_input_is_averaged_down_first_and_stays_close(width, height, monkeypatch):
    picture = drawn_picture(width, height)
    fast = np.asarray(pad_resize(picture, 64)).astype(int)  # 5 x 5 blocks averaged first, then bicubic from 200 px
    under = np.asarray(pad_resize(picture, 200))  # 997 < 6 x 200: nothing averaged first
    monkeypatch.setattr(images, "REDUCING_GAP", None)
    exact = np.asarray(pad_resize(picture, 64)).astype(int)  # one bicubic resize from the full picture
    assert not np.array_equal(fast, exact)  # the short cut was taken
    assert np.abs(fast - exact).mean() < 0.5 and np.abs(fast - exact).max() <= 24
    assert np.array_equal(under, np.asarray(pad_resize(picture, 200)))


def test_a_jpeg_too_big_for_the_smallest_dct_scale_is_averaged_down_after_it(monkeypatch):
    data = jpeg(drawn_picture(4000, 2500))
    drafted = load_for_input(data, 32)
    assert drafted.info[DRAFT_INFO] == (4000, 2500, 8, 500, 313)  # 1/8, the smallest DCT scale: still 16 x 32 px
    fast = np.asarray(pad_resize(drafted, 32)).astype(int)
    monkeypatch.setattr(images, "REDUCING_GAP", None)
    assert not np.array_equal(fast, np.asarray(pad_resize(drafted, 32)))  # 500 px: averaged over 5 x 5 first
    exact = np.asarray(pad_resize(load_rgb(data), 32)).astype(int)  # the full decode, one bicubic resize
    assert np.abs(fast - exact).mean() < 0.5 and np.abs(fast - exact).max() <= 24
