"""Images to model input, the WD taggers' way: onto white, padded to a white square, bicubic resize, BGR, NHWC.

numpy and Pillow only: the ONNX path never imports torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import UserError
from ..util import storage
from ..util.images import BadImage, load_for_input, load_rgb, pad_resize, to_rgb

ImageLike = str | os.PathLike | bytes | Image.Image | np.ndarray


def read_image(source: ImageLike, size: int | None = None) -> Image.Image:
    """A path (or a URL: `s3://`, `gs://`, `http(s)://`), bytes, PIL image or array (HxW, HxWx3 RGB, HxWx4 RGBA;
    uint8, or float in 0..1) -> an upright RGB PIL image, transparency composited onto white.

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
    if isinstance(source, str) and storage.is_remote(source):
        try:
            data = storage.read_bytes(source)
        except UserError as e:
            raise BadImage(f"cannot read ({e})", "unreadable") from None
    elif isinstance(source, str | os.PathLike):
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise BadImage(f"cannot read ({e.strerror or e})", "unreadable") from None
    elif isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
    else:
        raise TypeError(f"an image is a path, bytes, a PIL image or a numpy array, not {type(source).__name__}")
    return load_for_input(data, size) if size else load_rgb(data)


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
    is already that size). The square is `util.images.pad_resize`, the one that `i2v build` makes training samples
    with."""
    return np.asarray(pad_resize(image, size), dtype=np.float32)[:, :, ::-1]


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
