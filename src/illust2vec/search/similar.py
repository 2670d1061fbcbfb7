"""Similar-image queries over a VectorIndex: build one from `i2v embed` outputs, query by vector or id with tag
filters, and group near-duplicates.

Search never embeds an image: a caller with the model (`i2v similar`, `i2v serve`) computes the query vector, checks
the model against the index's with `check_model`, and hands the vector over.

Tag filters read the predicted tags stored with each vector: `"blue_hair -hat"` keeps images with blue_hair and
without hat. A row's tags are those above the model's thresholds in every head, plus its top rating class.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..formats.vectors import read_vectors
from ..util import storage
from .index import IndexParams, VectorIndex

# Cosine. Halved, re-encoded copies scored 0.9967 and up with the demo model (bench/search.py --quality), while
# 0.14% of pairs of distinct synthetic pictures (one character in one pose, alike by construction) scored above.
DEFAULT_DEDUP_THRESHOLD = 0.99
DEDUP_NEIGHBOURS = 16  # neighbours looked at per image; bigger groups still join through their members


@dataclass(frozen=True)
class Hit:
    """One result: the row, its id and path, and its similarity to the query (cosine; binary: bits agreeing)."""

    row: int
    id: str
    path: str
    score: float

    def to_json(self) -> dict:
        return {"path": self.path, "id": self.id, "score": round(self.score, 6)}


# ---- building


@dataclass(frozen=True)
class BuildSummary:
    """What `build_index` made: the index (saved in `out`), and the rows left out as repeated ids."""

    index: VectorIndex
    out: str
    duplicates: int
    seconds: float

    def line(self) -> str:
        """The one line `i2v index build` prints."""
        index = self.index
        note = f"; {self.duplicates} rows with an id seen before left out" if self.duplicates else ""
        return f"{self.out}: {index.kind} index of {len(index)} vectors ({index.dim}-d) in {self.seconds:.1f} s{note}"


def build_index(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, params: IndexParams) -> BuildSummary:
    """Vectors files of `i2v embed` (one per shard of a job array, or folders of them; paths or URLs) -> an index
    saved in `out` (a directory or a URL such as `s3://bucket/index`).

    Rows whose id was already in an earlier file are left out (and counted)."""
    t0 = time.perf_counter()
    out = storage.location(out, "--out", write=True)
    storage.check_writable_root(out)  # a missing bucket is named before the vectors are read
    v = read_vectors(inputs)
    if not v.ids:
        raise UserError("the vectors files hold no rows: nothing to index")
    index = VectorIndex.build(v.vectors, v.ids, v.paths, v.tags, params, model=v.meta.get("model", {}))
    index.save(out)
    return BuildSummary(index, storage.display(out), v.duplicates, time.perf_counter() - t0)


# ---- tag filters


def parse_tag_filter(text: str | None) -> tuple[frozenset[str], frozenset[str]]:
    """`"blue_hair -hat"` -> ({"blue_hair"}, {"hat"}); tags separated by spaces or commas."""
    include, exclude = set(), set()
    for token in (text or "").replace(",", " ").split():
        if token.startswith("-") and len(token) > 1:
            exclude.add(token[1:])
        elif token != "-":
            include.add(token)
    both = include & exclude
    if both:
        raise UserError(f"--tags asks for and against {', '.join(sorted(both))}")
    return frozenset(include), frozenset(exclude)


def row_tags(tags_json: str) -> set[str]:
    """The tags a row is filtered by: every head's predicted tags, and the rating's top class only."""
    try:
        heads = json.loads(tags_json) if tags_json else {}
    except ValueError:
        return set()
    out: set[str] = set()
    for head, tags in heads.items():
        if not tags:
            continue
        if head == "rating":
            out.add(max(tags, key=tags.get))
        else:
            out.update(tags)
    return out


def tag_mask(index: VectorIndex, text: str | None) -> np.ndarray | None:
    """Rows that pass the filter, or None for no filter. A wanted tag that no image in the index has is an error
    (most likely a typo), not an empty result."""
    include, exclude = parse_tag_filter(text)
    if not include and not exclude:
        return None
    sets = [row_tags(t) for t in index.tags]
    missing = sorted(t for t in include if not any(t in s for s in sets))
    if missing:
        raise UserError(f"--tags: no image in the index has {', '.join(missing)} among its predicted tags")
    return np.array([include <= s and not (exclude & s) for s in sets], dtype=bool)


# ---- queries


@dataclass(frozen=True)
class SimilarConfig:
    """What `i2v similar` was asked: an image (its vector computed by the caller) or an id in the index."""

    index: str
    image: str | None = None
    id: str | None = None
    k: int = 10
    tags: str | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.id is None):
            raise UserError("give an IMAGE or --id ID (one of them)")
        if not isinstance(self.k, int) or self.k < 1:
            raise UserError("-k must be at least 1")


def similar(cfg: SimilarConfig, index: VectorIndex | None = None, query: np.ndarray | None = None) -> list[Hit]:
    """The k images most similar to the query, best first; the query itself first when it is in the index.

    Args:
        cfg: the query; `index` is opened from `cfg.index` unless given.
        index: the opened index, if the caller has it.
        query: for an image query, its feature vector from the index's model (see `check_model`).
    """
    index = VectorIndex.load(cfg.index) if index is None else index
    if cfg.id is not None:
        row = index.rows_by_id().get(cfg.id)
        if row is None:
            raise UserError(f"--id {cfg.id}: not in the index {cfg.index}")
        query, self_row = index.vector(cfg.id), row
    elif query is None:
        raise UserError(f"{cfg.image}: a query image needs its vector, from the model the index was built with")
    else:
        self_row = _row_of_path(index, cfg.image)
    return search_hits(index, np.asarray(query), cfg.k, tag_mask(index, cfg.tags), self_row)


def search_hits(
    index: VectorIndex, query: np.ndarray, k: int, allow: np.ndarray | None = None, self_row: int | None = None
) -> list[Hit]:
    """The k best rows for one query (a vector, or a packed code for a binary index). When `self_row` (the query's
    own row) is allowed, it comes first, whether or not an approximate search found it."""
    first = self_row is not None and (allow is None or bool(allow[self_row]))
    scores, rows = index.search_rows(query[None], k + int(first), allow)
    found = [(int(r), float(s)) for r, s in zip(rows[0], scores[0], strict=True) if r >= 0 and r != self_row]
    if first:
        found.insert(0, (self_row, float(index.scores(query, np.array([self_row]))[0])))
    return [Hit(r, index.ids[r], index.paths[r], s) for r, s in found[:k]]


def check_model(index: VectorIndex, model: dict[str, Any], name: str | None = None) -> None:
    """Vectors from two models do not compare: the dimension, the vocabulary and the weights must match the index's
    (`i2v similar` and `i2v serve` both check with this before they embed a query).

    Args:
        index: the index to be searched.
        model: the query model's metadata, as vectors files store it (formats.vectors.model_meta).
        name: how to name the model in an error (default: its source).
    """
    name = name or str(model.get("source", "the model"))
    want, dim = index.model, model.get("feature_dim")
    if dim != index.dim:
        raise UserError(f"{name}: gives {dim}-d vectors, the index holds {index.dim}-d vectors")
    same = [k for k in ("vocab_hash", "weights") if want.get(k)]
    if any(model.get(k) != want[k] for k in same):
        raise UserError(f"{name}: not the model the index was built with ({want.get('source', 'another model')})")


def _row_of_path(index: VectorIndex, image: str) -> int | None:
    target = str(Path(image).resolve())
    for row, path in enumerate(index.paths):
        if path == target:
            return row
    return None


# ---- near-duplicates


@dataclass(frozen=True)
class DedupConfig:
    """What `i2v dedup` was asked: the index, and the similarity at which two images count as copies."""

    index: str
    threshold: float | None = None  # None: DEFAULT_DEDUP_THRESHOLD
    neighbours: int = DEDUP_NEIGHBOURS

    def __post_init__(self) -> None:
        if self.threshold is None:
            object.__setattr__(self, "threshold", DEFAULT_DEDUP_THRESHOLD)
        if not isinstance(self.threshold, int | float) or not -1.0 <= self.threshold <= 1.0:
            raise UserError(f"--threshold is a cosine similarity, between -1 and 1, not {self.threshold}")
        if not isinstance(self.neighbours, int) or self.neighbours < 1:
            raise UserError(f"neighbours must be at least 1, not {self.neighbours!r}")


@dataclass(frozen=True)
class DedupSummary:
    """The groups of near-duplicates `dedup` found, among how many images, at which threshold."""

    groups: list[list[Hit]]
    images: int
    threshold: float

    @property
    def copies(self) -> int:
        return sum(len(g) - 1 for g in self.groups)

    def as_json(self) -> list[list[dict]]:
        """What `i2v dedup --format json` prints: a list of groups, each a list of {path, id, score}."""
        return [[h.to_json() for h in g] for g in self.groups]

    def line(self) -> str:
        return (
            f"{len(self.groups)} groups, {self.copies} copies among {self.images} images (threshold {self.threshold})"
        )


def dedup(cfg: DedupConfig, index: VectorIndex | None = None) -> DedupSummary:
    """The near-duplicate groups of an index (`index` is opened from `cfg.index` unless given)."""
    index = VectorIndex.load(cfg.index) if index is None else index
    groups = find_duplicates(index, cfg.threshold, cfg.neighbours)
    return DedupSummary(groups, len(index), cfg.threshold)


def find_duplicates(
    index: VectorIndex, threshold: float = DEFAULT_DEDUP_THRESHOLD, neighbours: int = DEDUP_NEIGHBOURS
) -> list[list[Hit]]:
    """Groups of near-duplicates: images joined when their similarity is at least `threshold`, transitively
    (single linkage over each image's nearest neighbours). Each group lists its first row first; a member's score is
    its similarity to that first one. Groups come in the order of their first rows."""
    n = len(index)
    parent = np.arange(n)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    k = min(neighbours + 1, n)
    for start in range(0, n, 4096):
        rows = np.arange(start, min(n, start + 4096))
        scores, found = index.search_rows(index.vectors(rows), k)
        for r, srow, frow in zip(rows, scores, found, strict=True):
            for s, f in zip(srow, frow, strict=True):
                if f >= 0 and f != r and s >= threshold:
                    a, b = find(int(r)), find(int(f))
                    if a != b:
                        parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for r in range(n):
        groups.setdefault(find(r), []).append(r)
    out = []
    for members in sorted((m for m in groups.values() if len(m) > 1), key=lambda m: m[0]):
        scores = index.scores(index.vectors(np.array(members[:1]))[0], np.array(members))
        out.append([Hit(r, index.ids[r], index.paths[r], float(s)) for r, s in zip(members, scores, strict=True)])
    return out
