"""What `i2v serve` holds while it runs: the model, the batcher in front of it, the index, and the thumbnails; and
how an upload becomes an answer (decoded as `i2v tag` decodes, thresholds as `Tagger.select` resolves them)."""

from __future__ import annotations

import io
import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import numpy as np
from fastapi import HTTPException
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..formats.vectors import model_meta
from ..infer.engine import Decoded, decode, reason_of
from ..infer.tagger import Tagger
from ..infer.thresholds import Selection, resolve
from ..infer.writers import CaptionOptions, make_record
from ..util.images import BadImage, load_rgb
from .batcher import Batcher

if TYPE_CHECKING:
    from ..search import VectorIndex

THUMB_SIZE = 256
THUMB_CACHE = 512  # thumbnails kept in memory (about 15 KB each)
# A refused upload's reason (infer.engine.REASONS) -> the HTTP status: a decompression bomb is "too large" (413),
# anything else that does not decode is not an image type we take (415).
STATUS_BY_REASON = {"too_large": 413}
MCUT = Selection(mcut_general=True, mcut_character=True)


def open_index(path: str, tagger: Tagger) -> VectorIndex:
    """The index of `i2v index build`, checked against the model: vectors of two models do not compare."""
    from ..search import VectorIndex, check_model

    index = VectorIndex.load(path)
    check_model(index, model_meta(tagger), tagger.source)
    return index


def model_name(tagger: Tagger) -> str:
    """How the page and the logs name the model: its directory, and its architecture when the bundle says."""
    root = Path(tagger.source)
    try:
        arch = json.loads((root / "config.json").read_text()).get("model", {}).get("name")
    except (OSError, ValueError, AttributeError):
        arch = None
    return f"{root.name} ({arch})" if isinstance(arch, str) and arch else root.name


@dataclass
class ServeState:
    """The loaded model behind its batcher, the index (if any), and a small cache of thumbnails."""

    tagger: Tagger
    batcher: Batcher
    index: VectorIndex | None = None
    name: str = ""
    thumbs: OrderedDict[str, bytes] = field(default_factory=OrderedDict)

    async def forward(self, data: bytes) -> tuple[np.ndarray, np.ndarray | None, Decoded]:
        """Upload bytes -> (probabilities, feature vector or None, the decoded image), batched with other requests."""
        decoded = await run_in_threadpool(decode_upload, data, self.tagger.image_size)
        probs, feats = await self.batcher.submit(decoded.x)
        return probs, feats, decoded

    def tag_answer(self, filename: str, probs: np.ndarray, decoded: Decoded, sel: Selection) -> dict:
        """The answer of /api/tag: the record of `i2v tag --format json`, the picture's size, every tag's score,
        the thresholds applied per head, MCut's (the page's MCut box), and the model's own."""
        t = self.tagger
        record = make_record(filename, t.select(probs, sel), CaptionOptions())
        record["model"] = self.name
        record["width"], record["height"] = decoded.width, decoded.height
        record["scores"] = {h: _rounded(s) for h, s in t.scores(probs).items()}
        record["thresholds"] = _head_values(t, probs, sel)
        record["mcut_thresholds"] = {h: v for h, v in _head_values(t, probs, MCUT).items() if MCUT.mcut(h)}
        record["model_thresholds"] = {"heads": t.thresholds.heads, "tags": t.thresholds.tags}
        return record

    def indexed_path(self, id: str) -> Path:
        # Only ids the index holds map to files; anything else, path-like or not, is unknown.
        row = self.index.rows_by_id().get(id) if self.index is not None else None
        if row is None:
            raise HTTPException(404, "no image with that id in the index")
        path = Path(self.index.paths[row])
        if not path.is_file():
            raise HTTPException(404, "the indexed image is no longer on disk")
        return path

    async def thumbnail(self, id: str) -> bytes:
        """An indexed image's thumbnail (JPEG), from the cache when it was asked for lately."""
        path = self.indexed_path(id)
        if id not in self.thumbs:
            self.thumbs[id] = await run_in_threadpool(_thumbnail, path)
            if len(self.thumbs) > THUMB_CACHE:
                self.thumbs.popitem(last=False)
        self.thumbs.move_to_end(id)
        return self.thumbs[id]


def decode_upload(data: bytes, size: int) -> Decoded:
    """Upload bytes -> the model's input, decoded as `i2v tag` decodes files; refusals as HTTP errors."""
    try:
        return decode(data, size)
    except BadImage as e:
        reason = reason_of(e)
        status = STATUS_BY_REASON.get(reason, 415)
        # The reason, not Pillow's message: that one names in-memory objects and says nothing more to a user.
        what = f"image refused: {e}" if status == 413 else f"not an image we can read ({reason})"
        raise HTTPException(status, what) from None


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {t: round(float(s), 6) for t, s in scores.items()}


def _head_values(tagger: Tagger, probs: np.ndarray, sel: Selection) -> dict[str, float]:
    """The head thresholds behind an answer: given, MCut's, or the model's (per-tag ones are in model_thresholds)."""
    resolved = resolve(tagger.labels.heads, tagger.labels.names, probs, tagger.thresholds, sel)
    return {head: round(th.value, 6) for head, th in resolved.items()}


def neighbours(index: VectorIndex, query: np.ndarray, k: int, tags: str | None, row: int | None) -> list[dict]:
    """The answer of /api/similar: the k nearest rows to `query` (not `row`, the query's own), with image URLs."""
    from ..search.similar import search_hits, tag_mask

    allow = tag_mask(index, tags)
    # With the query's own row given, search_hits puts it first: "more like this" leaves it out.
    hits = search_hits(index, query, k + (row is not None), allow, row)
    hits = [h for h in hits if h.row != row][:k]
    return [
        {
            "id": h.id,
            "score": round(h.score, 6) if math.isfinite(h.score) else None,
            "name": Path(h.path).name if h.path else None,
            "image": f"/api/image/{quote(h.id, safe='')}",  # ids may hold slashes (`i2v embed --ids path`)
            "thumb": f"/api/thumb/{quote(h.id, safe='')}",
        }
        for h in hits
    ]


def _thumbnail(path: Path) -> bytes:
    try:
        image = load_rgb(path.read_bytes(), shrink_to=THUMB_SIZE)
    except (BadImage, OSError) as e:
        raise HTTPException(404, f"the indexed image cannot be read ({e})") from None
    image.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()
