"""`i2v vocab` (stage 2): count the posts' tags and keep the most frequent of each category, in WD's order."""

from __future__ import annotations

import heapq
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import UserError
from ..formats.categories import CATEGORY_CODES, HEAD_ORDER, RATING_IDS, RATING_TAGS
from ..formats.posts import STATUSES, post_files, read_part
from ..formats.vocab import Vocab, tag_id
from ..util import storage

log = logging.getLogger(__name__)

DEFAULT_TOP = 512  # the seed's size of every head
TAGGED = ("general", "character", "copyright", "artist")  # the categories counted from the posts' tag columns


@dataclass(frozen=True)
class VocabConfig:
    """Which tags `build_vocab` counts and keeps; it checks itself, so a mistake is one UserError line."""

    top: Mapping[str, int] = field(default_factory=dict)  # category -> how many tags to keep; default_top elsewhere
    default_top: int = DEFAULT_TOP
    min_count: int = 1  # a tag on fewer posts is left out, whatever `top` says (the rating tags never are)
    artist: bool = False  # give artists a head too; without it artist tags are not counted
    aliases: Mapping[str, str] = field(default_factory=dict)  # old tag name -> new, applied before counting
    statuses: tuple[str, ...] = ("ok",)  # the posts counted, by crawl status: by default those with a stored image

    def __post_init__(self) -> None:
        # None for "none given", as a caller passing on an optional argument would.
        object.__setattr__(self, "top", dict(self.top or {}))
        object.__setattr__(self, "aliases", dict(self.aliases or {}))
        object.__setattr__(self, "statuses", tuple(self.statuses))
        for category, n in self.top.items():
            if category not in TAGGED:
                raise UserError(f"top: {category!r} is not one of {', '.join(TAGGED)}")
            if not isinstance(n, int) or n < 0:
                raise UserError(f"top[{category!r}] must be a whole number >= 0, not {n!r}")
        if "artist" in self.top and not self.artist:
            raise UserError("--top-artist needs --artist")
        if not isinstance(self.default_top, int) or self.default_top < 0:
            raise UserError(f"--top must be a whole number >= 0, not {self.default_top!r}")
        if not isinstance(self.min_count, int) or self.min_count < 0:
            raise UserError(f"--min-count must be a whole number >= 0, not {self.min_count!r}")
        if bad := set(self.statuses) - set(STATUSES):
            raise UserError(f"unknown statuses {sorted(bad)}; known: {', '.join(STATUSES)}")

    @property
    def limits(self) -> dict[str, int]:
        """Head -> how many tags it keeps, for the heads counted."""
        heads = [h for h in TAGGED if h != "artist" or self.artist]
        return {h: self.top.get(h, self.default_top) for h in heads}


def build_vocab(dirs: Sequence[storage.Location], cfg: VocabConfig | None = None, **options) -> Vocab:
    """The vocabulary of crawled posts: the most frequent tags of each category, in WD's order.

    Args:
        dirs: crawl directories that `i2v crawl` wrote: local paths or URLs (`s3://bucket/crawl`).
        cfg: what to keep; or give VocabConfig's fields as keywords (`build_vocab(dirs, top={"general": 100})`).

    Each count is the number of posts carrying the tag. Ties go by name, so the same posts give the same file.
    Meta tags are never kept; the four rating tags always are, with their post counts.
    """
    if cfg is not None and options:
        raise TypeError("build_vocab takes a VocabConfig or its fields as keywords, not both")
    cfg = cfg or VocabConfig(**options)
    limits = cfg.limits
    resolved = {a: _resolve(a, cfg.aliases) for a in cfg.aliases}
    counts = {h: Counter() for h in limits}
    ratings: Counter = Counter()
    posts = seen = 0
    columns = ["rating", "status", *[f"tags_{h}" for h in limits]]
    # One file at a time, so memory holds one file's posts, not a whole multi-million-post crawl.
    for path in post_files(dirs):
        table = read_part(path, columns)
        seen += table.num_rows
        table = table.filter(pc.is_in(table["status"], value_set=pa.array(list(cfg.statuses), pa.string())))
        posts += table.num_rows
        for code, n in _value_counts(table["rating"]).items():
            if code in RATING_TAGS:
                ratings[RATING_TAGS[code]] += n
        for h in limits:
            counts[h].update(_count_tags(table[f"tags_{h}"], resolved))
    log.info("counted %d of %d posts (status %s)", posts, seen, ", ".join(cfg.statuses))
    if not posts:
        where = " ".join(storage.display(d) for d in dirs)
        raise UserError(f"{where}: no posts with status {' or '.join(cfg.statuses)} to count tags on")

    rows = [(RATING_IDS[name], name, CATEGORY_CODES["rating"], ratings[name]) for name in RATING_IDS]
    for h in HEAD_ORDER:
        if h not in limits:
            continue
        kept = heapq.nsmallest(limits[h], ((-n, name) for name, n in counts[h].items() if n >= cfg.min_count))
        rows += [(tag_id(name), name, CATEGORY_CODES[h], -neg) for neg, name in kept]
    return Vocab(*(tuple(column) for column in zip(*rows, strict=True)))


def _resolve(tag: str, aliases: Mapping[str, str]) -> str:
    seen, name = {tag}, tag
    while name in aliases:
        name = aliases[name]
        if name in seen:  # a cycle names no final tag: keep the one the post has rather than pick an arbitrary one
            return tag
        seen.add(name)
    return name


def apply_aliases(tags: Iterable[str], aliases: Mapping[str, str]) -> list[str]:
    """The tags renamed through the aliases (following chains a -> b -> c), duplicates dropped, order kept.

    A tag whose chain runs in a cycle is left as it is.
    """
    return list(dict.fromkeys(_resolve(t, aliases) for t in tags))


def _value_counts(values: pa.ChunkedArray) -> dict[str, int]:
    counted = pc.value_counts(values.drop_null()).to_pylist()
    return {c["values"]: c["counts"] for c in counted}


def _count_tags(lists: pa.ChunkedArray, aliases: Mapping[str, str]) -> dict[str, int]:
    """Tag -> number of posts carrying it, for one tag column; renamed through `aliases` first."""
    lists = lists.combine_chunks() if lists.num_chunks != 1 else lists.chunk(0)
    flat = pc.list_flatten(lists)
    parents = pc.list_parent_indices(lists)
    keep = pc.and_(pc.is_valid(flat), pc.not_equal(flat, ""))
    flat, parents = flat.filter(keep), parents.filter(keep)
    if not len(flat):
        return {}
    encoded = pc.dictionary_encode(flat)
    names = encoded.dictionary.to_pylist()
    index = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    if aliases:
        # Rename the distinct names, not every occurrence; two old names may now share one index.
        renamed = [aliases.get(n, n) for n in names]
        names = list(dict.fromkeys(renamed))
        at = {n: i for i, n in enumerate(names)}
        index = np.array([at[n] for n in renamed], dtype=np.int64)[index]
    # A post counts once per tag, even when aliases (or the board) give it the same tag twice.
    # Sorting and dropping repeats is several times faster here than np.unique, which hashes.
    pairs = np.sort(parents.to_numpy(zero_copy_only=False).astype(np.int64) * len(names) + index)
    first = np.ones(len(pairs), dtype=bool)
    first[1:] = pairs[1:] != pairs[:-1]
    per_tag = np.bincount(pairs[first] % len(names), minlength=len(names))
    return {name: int(n) for name, n in zip(names, per_tag, strict=True) if n}
