"""The vocabulary files: `selected_tags.csv` (WD's columns tag_id,name,category,count) and tag alias CSVs.

Each is read from and written to a local path or a URL (`s3://...`, `gs://...`; `https://...` for reading), through
`util/storage`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

from ..errors import UserError
from ..util import storage
from .categories import CATEGORY_CODES, CATEGORY_NAMES, HEAD_ORDER, RATING_IDS, RATING_TAGS

HEADER = ("tag_id", "name", "category", "count")
ALIASES_HEADER = ("old", "new")


@dataclass(frozen=True)
class Vocab:
    """The selected tags, in the order of the model's outputs (selected_tags.csv)."""

    tag_ids: tuple[int, ...]
    names: tuple[str, ...]
    categories: tuple[int, ...]
    counts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.tag_ids) == len(self.names) == len(self.categories) == len(self.counts):
            raise ValueError("tag_ids, names, categories and counts differ in length")
        problem = _first_problem(self.names, self.categories)
        if problem:
            raise ValueError(f"row {problem[0] + 1}: {problem[1]}")

    def __len__(self) -> int:
        return len(self.names)

    @cached_property
    def hash(self) -> str:
        """sha256 of the (name, category) sequence: what the model's outputs mean. Counts and ids leave it alone."""
        rows = [[n, c] for n, c in zip(self.names, self.categories, strict=True)]
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()

    @cached_property
    def heads(self) -> dict[str, tuple[int, ...]]:
        """Head name -> its rows in the vocabulary; non-empty heads only, in HEAD_ORDER, which is the file's order."""
        rows: dict[str, list[int]] = {}
        for i, c in enumerate(self.categories):
            rows.setdefault(CATEGORY_NAMES[c], []).append(i)
        return {h: tuple(rows[h]) for h in HEAD_ORDER if h in rows}

    def head_names(self, head: str) -> tuple[str, ...]:
        """The tag names of one head, in the order of its outputs."""
        return tuple(self.names[i] for i in self.heads[head])

    @cached_property
    def _positions(self) -> dict[str, dict[str, int]]:
        # Built once: encode runs for every post of a multi-million-post build.
        return {h: {name: i for i, name in enumerate(self.head_names(h))} for h in self.heads}

    def encode(self, rating: str, tags: Mapping[str, Sequence[str]]) -> dict[str, list[int]]:
        """One post's labels: head -> sorted positions, within that head, of its tags in the vocabulary.

        Args:
            rating: the post's rating code, 'g', 's', 'q' or 'e'; anything else sets no rating.
            tags: category name ("general", "character", "copyright", "artist") -> the post's tags.
        """
        labels: dict[str, list[int]] = {}
        for head, positions in self._positions.items():
            if head == "rating":
                pos = positions.get(RATING_TAGS.get(rating, ""))
                labels[head] = [] if pos is None else [pos]
            else:
                labels[head] = sorted({positions[t] for t in tags.get(head, ()) if t in positions})
        return labels


def _first_problem(names: Sequence[str], categories: Sequence[int]) -> tuple[int, str] | None:
    """The first row (index, why) that breaks the vocabulary's rules, or None: one rule set for files and code."""
    rank = {CATEGORY_CODES[h]: i for i, h in enumerate(HEAD_ORDER)}
    seen: set[tuple[str, int]] = set()
    last = 0
    for i, (name, category) in enumerate(zip(names, categories, strict=True)):
        if category not in rank:
            known = ", ".join(f"{CATEGORY_CODES[h]} {h}" for h in HEAD_ORDER)
            return i, f"category {category} is not a head's (known: {known})"
        if not name:
            return i, "empty tag name"
        if (name, category) in seen:
            return i, f"{name!r} (category {category}) is listed twice"
        if category == CATEGORY_CODES["rating"] and name not in RATING_IDS:
            return i, f"{name!r} is not a rating tag (those are {', '.join(RATING_IDS)})"
        if rank[category] < last:
            order = ", ".join(HEAD_ORDER)
            return i, f"{name!r} (category {category}) comes after {HEAD_ORDER[last]} tags; rows go by head: {order}"
        seen.add((name, category))
        last = rank[category]
    return None


def tag_id(name: str) -> int:
    """A stable id for a tag that the board named but did not number."""
    # Posts carry tag names, not ids. The first 6 bytes of sha1 give the same id on every machine and crawl; 48 bits
    # stay exact in a float64 (pandas reads selected_tags.csv into floats when a column has a gap), and they land far
    # above Danbooru's real ids (under 10**7) and WD's rating ids (all but about one in 3*10**7 of them).
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:6], "big")


def write_vocab(vocab: Vocab, path: storage.Location) -> None:
    """Write selected_tags.csv (a path or URL) with exactly WD's columns tag_id,name,category,count; whole or not at
    all (a local file through a temporary name and a rename, an object in one PUT)."""
    _write_csv(path, HEADER, zip(vocab.tag_ids, vocab.names, vocab.categories, vocab.counts, strict=True))


def read_vocab(path: storage.Location) -> Vocab:
    """Read selected_tags.csv (ours or a WD tagger's; a path or URL), checking it; a UserError names the file and
    line of a fault."""
    rows = _read_csv(path)
    where = storage.display(path)
    if not rows:
        raise UserError(f"{where}: empty file; expected the header {','.join(HEADER)}")
    line, header = rows[0]
    if tuple(c.strip() for c in header) != HEADER:
        raise UserError(f"{where}:{line}: the header must be {','.join(HEADER)}, not {','.join(header)}")
    columns: tuple[list, ...] = ([], [], [], [])
    lines = []
    for line, row in rows[1:]:
        if len(row) != len(HEADER):
            raise UserError(f"{where}:{line}: {len(row)} fields where {','.join(HEADER)} are 4")
        try:
            values = (int(row[0]), row[1], int(row[2]), int(row[3]))
        except ValueError:
            raise UserError(f"{where}:{line}: tag_id, category and count must be integers: {','.join(row)}") from None
        for column, value in zip(columns, values, strict=True):
            column.append(value)
        lines.append(line)
    if problem := _first_problem(columns[1], columns[2]):
        raise UserError(f"{where}:{lines[problem[0]]}: {problem[1]}")
    return Vocab(*(tuple(c) for c in columns))


def write_aliases(aliases: Mapping[str, str], path: storage.Location) -> None:
    """Write tag renames as a CSV with the header old,new (what `read_aliases` reads); atomically."""
    _write_csv(path, ALIASES_HEADER, aliases.items())


def read_aliases(path: storage.Location) -> dict[str, str]:
    """Old tag name -> new from a CSV: two columns old,new, or Danbooru's tag_aliases export; a header is optional.

    In Danbooru's export (columns antecedent_name, consequent_name, status, ...) only active and retired aliases
    apply: deleted ones were undone and pending ones never took effect.
    """
    rows = _read_csv(path)
    where = storage.display(path)
    aliases: dict[str, str] = {}
    if not rows:
        return aliases
    first = [c.strip().lower() for c in rows[0][1]]
    old, new, status = 0, 1, None
    if "antecedent_name" in first and "consequent_name" in first:
        old, new = first.index("antecedent_name"), first.index("consequent_name")
        status = first.index("status") if "status" in first else None
        rows = rows[1:]
    elif tuple(first) == ALIASES_HEADER:
        rows = rows[1:]
    width = max(old, new, -1 if status is None else status) + 1
    for line, row in rows:
        if len(row) < width or (status is None and len(row) != 2):
            raise UserError(f"{where}:{line}: expected {'two columns old,new' if status is None else width} fields")
        if status is not None and row[status].strip() not in ("active", "retired"):
            continue
        a, b = row[old].strip(), row[new].strip()
        if not a or not b:
            raise UserError(f"{where}:{line}: empty tag name")
        if aliases.get(a, b) != b:
            raise UserError(f"{where}:{line}: {a!r} is aliased to both {aliases[a]!r} and {b!r}")
        aliases[a] = b
    return aliases


def _write_csv(path: storage.Location, header: Sequence[str], rows) -> None:
    """A CSV file with this header, never half a file: locally written to a temporary name, synced and renamed;
    remotely one PUT, which makes the object appear whole or not at all."""
    if storage.is_remote(path):
        text = io.StringIO(newline="")
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        storage.write_text(path, text.getvalue())
        return
    path = storage.local_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_csv(path: storage.Location) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a CSV file (a path or URL) with their line numbers; a UserError for a file that cannot
    be read."""
    shown = storage.display(path)
    try:
        if storage.is_remote(path):
            if not storage.exists(path):
                storage.check_readable_root(path)  # a missing bucket or wrong credentials, named as such
                raise UserError(f"{shown}: no such file")
            f = io.StringIO(storage.read_bytes(path).decode("utf-8-sig"), newline="")
        else:
            f = open(storage.local_path(path), newline="", encoding="utf-8-sig")  # noqa: SIM115
        with f:
            reader = csv.reader(f, strict=True)
            return [(reader.line_num, row) for row in reader if any(cell.strip() for cell in row)]
    except FileNotFoundError:
        raise UserError(f"{shown}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{shown}: is a directory, not a CSV file") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{shown}: not a readable CSV file ({e})") from None
