"""Image decoding shared by every stage: one pixel limit against decompression bombs, fast shrinking."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

# One limit for crawl, build, tag and serve: about 16k x 16k. Bigger files are refused, not decoded.
MAX_PIXELS = 268_435_456
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

EXT_BY_FORMAT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "AVIF": "avif"}


class BadImage(ValueError):
    """Bytes that are not an image we can decode, or one over the pixel limit."""


def open_image(data: bytes) -> Image.Image:
    """Open image bytes lazily (header only), refusing non-images and decompression bombs with BadImage."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"over the pixel limit ({MAX_PIXELS} pixels)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"not a decodable image ({e})") from e
    if image.width * image.height > MAX_PIXELS:
        raise BadImage(f"over the pixel limit ({image.width}x{image.height})")
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
        try:
            image.verify()  # a cheap structural check; the pixels are decoded later, by the build stage
        except Exception as e:  # Pillow's verify raises many types for broken files
            raise BadImage(f"not a decodable image ({e})") from e
        return Stored(data, ext, w, h, w, h)
    try:
        image.draft("RGB", (size, size))  # JPEG only; a no-op elsewhere
        if has_alpha(image):
            image = image.convert("RGBA")
        elif image.mode != "RGB":
            image = image.convert("RGB")
        image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
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
