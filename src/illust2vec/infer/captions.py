"""Caption rules of `i2v tag`, for every output format: exclude tags (either spelling, `*` wildcards), replace or merge
tags, keep the highest-scoring few, put fixed tags first, and merge into caption files that exist.

Tags are compared as the model names them: underscores for spaces, brackets unescaped (`long hair`, `long_hair` and
`long\\_hair` are one tag; `\\(` is `(`), so a rule may be written as a caption shows the tag or as the model does.
The rules work on one image's selected tags, head -> {tag: score}, before `writers.CaptionOptions` renames them.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

Tags = dict[str, dict[str, float]]  # head -> {tag: score}, highest first


def spelling(tag: str) -> str:
    """A tag as the model names it: `long hair` -> `long_hair`, `\\(` -> `(`, surrounding spaces dropped."""
    tag = tag.strip().replace("\\(", "(").replace("\\)", ")")
    return "_".join(tag.split())


def split_tags(text: str | None) -> tuple[str, ...]:
    """A comma-separated list of tags -> its tags in order, empty ones dropped (as written: not respelled)."""
    if not text:
        return ()
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _pattern(tag: str) -> re.Pattern[str]:
    """`*_background` -> a regular expression matching the whole spelling; `*` is any run of characters."""
    return re.compile(".*".join(re.escape(part) for part in spelling(tag).split("*")), re.DOTALL)


@dataclass(frozen=True)
class CaptionRules:
    """What `--exclude`, `--replace`, `--max-tags`, `--add` and `--append` ask for.

    Attributes:
        exclude: tags never written, either spelling; `*` matches any run of characters (`*_background`).
        replace: (old, new) pairs: a tag `old` is written as `new`, and merged with `new` if the model chose that
            too (the higher score stays); an empty `new` drops the tag.
        max_tags: keep the N highest-scoring tags of all heads but rating (None: all).
        add: fixed tags (a trigger word) written first, as given, in every output.
        append: txt and hydrus: merge into the caption file that exists, keeping its tags, with no duplicates.
    """

    exclude: tuple[str, ...] = ()
    replace: tuple[tuple[str, str], ...] = ()
    max_tags: int | None = None
    add: tuple[str, ...] = ()
    append: bool = False
    _exclude: tuple[re.Pattern[str], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_tags is not None and (not isinstance(self.max_tags, int) or self.max_tags < 1):
            raise UserError(f"--max-tags must be at least 1, not {self.max_tags!r}")
        object.__setattr__(self, "exclude", tuple(t for t in (spelling(t) for t in self.exclude) if t))
        object.__setattr__(self, "add", tuple(dict.fromkeys(t.strip() for t in self.add if t.strip())))
        pairs = []
        for pair in self.replace:
            if len(pair) != 2 or not spelling(pair[0]):
                raise UserError(f"--replace: expected old=new, not {pair!r}")
            pairs.append((spelling(pair[0]), spelling(pair[1])))
        object.__setattr__(self, "replace", tuple(pairs))
        object.__setattr__(self, "_exclude", tuple(_pattern(t) for t in self.exclude))

    @property
    def exact_excludes(self) -> frozenset[str]:
        """The excluded tags without a wildcard: those the model's vocabulary can be checked for."""
        return frozenset(t for t in self.exclude if "*" not in t)

    def excluded(self, tag: str) -> bool:
        name = spelling(tag)
        return any(p.fullmatch(name) for p in self._exclude)

    def apply(self, tags: Mapping[str, Mapping[str, float]]) -> Tags:
        """One image's selected tags -> those to write: excluded ones dropped, replacements made (and merged),
        then at most `max_tags` of them (rating, one class, is not counted); each head highest first."""
        table = dict(self.replace)
        out: Tags = {}
        for head, scored in tags.items():
            kept: dict[str, float] = {}
            for tag, score in scored.items():
                if head != "rating" and self.excluded(tag):
                    continue
                name = table.get(spelling(tag), tag) if head != "rating" else tag
                if name and (name not in kept or kept[name] < score):
                    kept[name] = score
            out[head] = dict(sorted(kept.items(), key=lambda kv: -kv[1]))
        if self.max_tags is not None:
            out = _top(out, self.max_tags)
        return out


def _top(tags: Tags, n: int) -> Tags:
    """The `n` highest-scoring tags of every head but rating, each head keeping its order (ties: heads' order)."""
    ranked = sorted(((s, h, t) for h, d in tags.items() if h != "rating" for t, s in d.items()), key=lambda x: -x[0])
    keep = {(h, t) for _, h, t in ranked[:n]}
    return {h: (d if h == "rating" else {t: s for t, s in d.items() if (h, t) in keep}) for h, d in tags.items()}


def parse_replace(text: str | None) -> tuple[tuple[str, str], ...]:
    """`--replace "completely_nude=nude, 1girl=girl"`, or `--replace FILE.csv` (rows old,new; a header row
    `old,new` is skipped) -> (old, new) pairs. UserError naming a pair without `=` or a file that cannot be read."""
    if not text:
        return ()
    path = Path(text)
    if text.lower().endswith(".csv") or path.is_file():
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
        except OSError as e:
            raise UserError(f"--replace {text}: cannot read ({e.strerror or e})") from None
        except UnicodeDecodeError:
            raise UserError(f"--replace {text}: not UTF-8 text") from None
        if rows and [c.strip().lower() for c in rows[0]] == ["old", "new"]:
            rows = rows[1:]
        bad = next((r for r in rows if len(r) != 2), None)
        if bad is not None:
            raise UserError(f"--replace {text}: each row is old,new; found {','.join(bad)!r}")
        return tuple((old, new) for old, new in rows)
    pairs = []
    for item in split_tags(text):
        if "=" not in item:
            raise UserError(f"--replace: expected old=new (or a .csv file), not {item!r}")
        old, new = item.split("=", 1)
        pairs.append((old, new))
    return tuple(pairs)


def with_added(record: dict, add: Iterable[str]) -> dict:
    """A record with the fixed tags (`--add`) as its "added" list, right after its path (none: unchanged)."""
    add = list(add)
    if not add:
        return record
    return {"path": record["path"], "added": add, **{k: v for k, v in record.items() if k != "path"}}


def merge_caption(existing: Iterable[str], ours: Iterable[str], ours_before: Iterable[str] = ()) -> list[str]:
    """`--append`: the tags of a caption file that exists, less those this tool added to it earlier
    (`ours_before`), then ours that it lacks; two spellings of one tag are one (the file's is kept)."""
    before = {spelling(t) for t in ours_before}
    merged = [t for t in dict.fromkeys(t.strip() for t in existing) if t and spelling(t) not in before]
    seen = {spelling(t) for t in merged}
    for tag in ours:
        if spelling(tag) not in seen:
            seen.add(spelling(tag))
            merged.append(tag)
    return merged
