"""Images to model input, the WD taggers' way: onto white, padded to a white square, bicubic resize, BGR, NHWC.

numpy and Pillow only: the ONNX path never imports torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..util.images import BadImage, load_rgb, open_image, to_rgb

ImageLike = str | os.PathLike | bytes | Image.Image | np.ndarray

# Where `read_image` notes that a JPEG was decoded at 1/k scale: (full width, full height, k, decoded size).
DRAFT_INFO = "illust2vec.draft"
EXIF_ORIENTATION = 0x0112
# Draft decoding stops at this multiple of the model's input size. At 2x, 8 of 77 real pictures moved a probability
# by more than 1e-2 against a full decode (up to 0.025, with a 96 px model); at 3x none did (largest 0.009).
DRAFT_MARGIN = 3


def read_image(source: ImageLike, size: int | None = None) -> Image.Image:
    """A path, bytes, PIL image or array (HxW, HxWx3 RGB, HxWx4 RGBA; uint8, or float in 0..1) -> an upright RGB
    PIL image, transparency composited onto white.

    With `size`, a JPEG whose longer side is at least 2 * DRAFT_MARGIN * `size` is decoded with DCT scaling (draft
    mode) at 1/2, 1/4 or 1/8, never below DRAFT_MARGIN * `size`. The scale is noted in `image.info[DRAFT_INFO]`, so
    that `prepare` maps the picture onto the same square, to the sub-pixel, as a full decode does; probabilities
    then agree with a full decode to within 1e-2.

    Raises:
        BadImage: not an image, broken, or over the pixel limit.
        TypeError: not one of the types above.
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, np.ndarray):
        return to_rgb(_from_array(source))
    if isinstance(source, str | os.PathLike):
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise BadImage(f"cannot read ({e.strerror or e})", "unreadable") from None
    elif isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        raise TypeError(f"an image is a path, bytes, a PIL image or a numpy array, not {type(source).__name__}")
    if not size:
        return load_rgb(data)
    header = open_image(data)  # the header only: the full size, the format and the EXIF orientation
    full = header.size
    # A rotated or mirrored JPEG is decoded in full: the partial DCT block would move to another edge.
    if header.format != "JPEG" or header.getexif().get(EXIF_ORIENTATION, 1) != 1:
        return load_rgb(data)
    image = load_rgb(data, shrink_to=DRAFT_MARGIN * size)
    if image.size != full:
        scale = math.ceil(full[0] / image.width)
        if (math.ceil(full[0] / scale), math.ceil(full[1] / scale)) == image.size:
            image.info[DRAFT_INFO] = (full[0], full[1], scale, image.width, image.height)
    return image


def _from_array(a: np.ndarray) -> Image.Image:
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0  # floats in 0..1, as matplotlib and skimage give them
        a = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        return Image.fromarray(a, "L")
    if a.ndim == 3 and a.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(a), "RGB" if a.shape[2] == 3 else "RGBA")
    raise TypeError(f"an image array is HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA), not {a.shape}")


def prepare(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image -> [size, size, 3] float32 BGR in 0..255, as the WD taggers' published code does it: paste
    centred onto a white square as big as the longer side, then one bicubic resize to `size` (none when the square
    is already that size)."""
    draft = image.info.get(DRAFT_INFO)
    if draft is not None and tuple(draft[3:]) == image.size:
        square = _drafted_square(image, size, *draft[:3])
    else:
        w, h = image.size
        side = max(w, h)
        square = image
        if (w, h) != (side, side):
            square = Image.new("RGB", (side, side), (255, 255, 255))
            square.paste(image, ((side - w) // 2, (side - h) // 2))
        if side != size:
            square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


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
    return canvas.resize((size, size), Image.Resampling.BICUBIC, box=(x0, y0, x0 + s, y0 + s))


def load_batch(images: Any, size: int) -> np.ndarray:
    """Several images (or one) -> [N, size, size, 3] float32 BGR, the models' input; BadImage names a bad one."""
    if isinstance(images, str | os.PathLike | bytes | Image.Image) or (
        isinstance(images, np.ndarray) and images.ndim <= 3 and images.dtype != object
    ):
        images = [images]
    out = np.empty((len(images), size, size, 3), np.float32)
    for i, image in enumerate(images):
        try:
            out[i] = prepare(read_image(image, size), size)
        except BadImage as e:
            name = image if isinstance(image, str | os.PathLike) else f"image {i}"
            raise BadImage(f"{name}: {e}", e.reason) from None
    return out
