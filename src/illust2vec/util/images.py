"""Images for every stage: decoding under one pixel limit, fast shrinking, and the one pad-then-resize recipe."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# One limit for crawl, build, tag and serve: about 16k x 16k. Bigger files are refused, not decoded.
MAX_PIXELS = 268_435_456
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# Draft decoding stops at this multiple of the model's input size. At 2x, 8 of 77 real pictures moved a probability
# by more than 1e-2 against a full decode (up to 0.025, with a 96 px model); at 3x none did (largest 0.009).
DRAFT_MARGIN = 3
# Where `load_for_input` notes that a JPEG was decoded at 1/k scale: (full width, full height, k, decoded size).
DRAFT_INFO = "illust2vec.draft"
EXIF_ORIENTATION = 0x0112
# A square at least 2 * REDUCING_GAP times the input is first averaged over whole k x k blocks (Pillow's
# `reducing_gap`), down to no less than REDUCING_GAP times the input, then resized bicubically. The bicubic resize
# of a whole 1 to 2 Mpx picture cost as much as decoding a PNG of it; on the board's pictures at 64 px this made
# the square 2.9x faster (1.52 against 4.37 ms) and `i2v tag` end to end 1.4x faster, for a mean difference of
# 0.22 grey levels (largest 15) from one bicubic resize: less than the JPEG draft's (0.20, largest 61).
REDUCING_GAP = DRAFT_MARGIN

EXT_BY_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "AVIF": "avif"}


class BadImage(ValueError):
    """Bytes that are not an image we can decode, or one over the pixel limit; `reason` is a short code."""

    def __init__(self, message: str, reason: str = "corrupt"):
        super().__init__(message)
        self.reason = reason  # empty, not_image, too_large or corrupt: what build and tag count skips by


def open_image(data: bytes) -> Image.Image:
    """Open image bytes lazily (header only), refusing non-images and decompression bombs with BadImage."""
    if not data:
        raise BadImage("empty file", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"over the pixel limit ({MAX_PIXELS} pixels)", "too_large") from e
    except Image.UnidentifiedImageError as e:  # its message names a BytesIO object, of no use to anyone
        raise BadImage("not a decodable image (a format Pillow does not know, or not an image)", "not_image") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"not a decodable image ({e})", "not_image") from e
    if image.width * image.height > MAX_PIXELS:
        raise BadImage(f"over the pixel limit ({image.width}x{image.height})", "too_large")
    return image


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


@dataclass(frozen=True)
class Stored:
    """Bytes ready for a shard, with what is known of the picture."""

    data: bytes
    ext: str
    width: int  # of the original
    height: int
    stored_width: int
    stored_height: int


def shrink(data: bytes, size: int | None, quality: int = 95) -> Stored:
    """Keep the bytes as they are, or, when the longer side exceeds `size`, resize to it.

    Resized pictures become JPEG (quality 95, as img2dataset writes), or PNG when they have transparency, which
    a JPEG would lose. JPEGs are decoded with DCT scaling (`draft`), which skips most of the work when shrinking.
    """
    image = open_image(data)
    w, h = image.size
    ext = EXT_BY_FORMAT.get(image.format or "", (image.format or "").lower())
    if size is None or max(w, h) <= size:
        # Kept as is: the header was read and the md5 matched the board's, so the bytes are the board's own; the
        # pixels are decoded (and a broken file reported) by the build stage, not twice.
        return Stored(data, ext, w, h, w, h)
    try:
        image.draft("RGB", (size, size))  # JPEG only; a no-op elsewhere
        if has_alpha(image):
            image = image.convert("RGBA")
        elif image.mode != "RGB":
            image = image.convert("RGB")
        # Area averaging (BOX), as img2dataset does with OpenCV's INTER_AREA: a proper anti-aliased shrink at a
        # third of BICUBIC's cost; the build stage resizes these again, with BICUBIC, to the training size.
        image.thumbnail((size, size), Image.Resampling.BOX)
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"not a decodable image ({e})") from e
    buf = io.BytesIO()
    if image.mode == "RGBA":
        image.save(buf, "PNG", compress_level=4)
        ext = "png"
    else:
        image.save(buf, "JPEG", quality=quality)
        ext = "jpg"
    return Stored(buf.getvalue(), ext, w, h, image.width, image.height)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to RGB: transparency composited onto white, 16-bit scaled down, CMYK and palettes converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's own conversion clips 16-bit values at 255 (a white picture); scale to 8 bits instead.
        arr = np.asarray(image, dtype=np.uint32 if image.mode == "I" else np.uint16).astype(np.float32)
        top = 65535.0 if image.mode != "I" or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_rgb(data: bytes, shrink_to: int | None = None) -> Image.Image:
    """Decode to upright RGB: first frame of an animation, EXIF orientation applied, transparency on white.

    With `shrink_to`, a JPEG is decoded at the smallest DCT scale that keeps its longer side at least that big,
    which skips most of the decoding work when the picture will be shrunk anyway.
    """
    image = open_image(data)
    try:
        if shrink_to and image.format == "JPEG":
            w, h = image.size
            scale = max(w, h) / shrink_to
            if scale >= 2:
                image.draft(image.mode, (math.ceil(w / scale), math.ceil(h / scale)))
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"over the pixel limit ({e})", "too_large") from e
    except Exception as e:  # Pillow raises many kinds on broken files; each is one bad item, not a crash
        raise BadImage(f"corrupt ({type(e).__name__}: {e})") from e


def load_for_input(data: bytes, size: int) -> Image.Image:
    """Decode for a model input of `size` pixels (as `load_rgb`), cheaply when the picture is much bigger than that.

    A JPEG whose longer side is at least 2 * DRAFT_MARGIN * `size` is decoded with DCT scaling (draft mode) at 1/2,
    1/4 or 1/8, never below DRAFT_MARGIN * `size`. The scale is noted in `image.info[DRAFT_INFO]`, so that
    `pad_resize` maps the picture onto the same square, to the sub-pixel, as a full decode does. A rotated or
    mirrored JPEG is decoded in full: the partial DCT block would move to another edge.
    """
    header = open_image(data)  # the header only: the full size, the format and the EXIF orientation
    full = header.size
    if header.format != "JPEG" or header.getexif().get(EXIF_ORIENTATION, 1) != 1:
        return load_rgb(data)
    image = load_rgb(data, shrink_to=DRAFT_MARGIN * size)
    if image.size != full:
        scale = math.ceil(full[0] / image.width)
        if (math.ceil(full[0] / scale), math.ceil(full[1] / scale)) == image.size:
            image.info[DRAFT_INFO] = (full[0], full[1], scale, image.width, image.height)
    return image


def pad_resize(image: Image.Image, size: int) -> Image.Image:
    """An RGB picture -> the `size` x `size` model input, as the WD taggers' published code makes it: pasted centred
    onto a white square as big as its longer side, then one bicubic resize to `size` (none when already that size).

    The one definition for training (`i2v build`) and inference, so that a model sees its pictures prepared alike.
    White, not black: black bars teach a tagger a false "letterboxed" feature, and boards' art is mostly on white.
    A square at least 2 * REDUCING_GAP times `size` is averaged over whole blocks first (see REDUCING_GAP).
    A picture that `load_for_input` decoded at a DCT scale gives the square a full decode would, within rounding.
    """
    draft = image.info.get(DRAFT_INFO)
    if draft is not None and tuple(draft[3:]) == image.size:
        return _drafted_square(image, size, *draft[:3])
    w, h = image.size
    side = max(w, h)
    square = image
    if (w, h) != (side, side):
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - w) // 2, (side - h) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP)
    return square


def _drafted_square(image: Image.Image, size: int, width: int, height: int, scale: int) -> Image.Image:
    """The WD square of a JPEG decoded at 1/scale: the same region of the picture as a full decode's.

    A decoded pixel i covers full pixels [scale*i, scale*(i+1)), and the last one may be a partial DCT block, so
    padding and resizing the small picture as if it were the whole one would shift its far edge by up to a pixel.
    Instead the full decode's square (offsets as WD computes them, in full pixels) is located in the small
    picture's coordinates, fractions included, and resized from there with Pillow's `box`.
    """
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    ox, oy = math.ceil(left / scale), math.ceil(top / scale)  # where the picture goes on a white canvas
    x0, y0, s = ox - left / scale, oy - top / scale, side / scale  # the square on that canvas
    canvas = Image.new(
        "RGB", (max(math.ceil(x0 + s), ox + image.width), max(math.ceil(y0 + s), oy + image.height)), (255, 255, 255)
    )
    canvas.paste(image, (ox, oy))
    box = (x0, y0, x0 + s, y0 + s)
    return canvas.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=REDUCING_GAP)
