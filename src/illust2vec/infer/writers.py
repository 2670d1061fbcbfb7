"""Output formats of `i2v tag`: a table for people; json, jsonl and csv records on stdout; txt captions beside images.

A record is one image's tags per head with their scores, highest first:
`{"path": ..., "rating": {tag: score}, "general": {...}, "character": {...}, "copyright": {...}}`
(plus "artist" when the model has that head). Caption options rename tags in every format.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TextIO

from ..errors import UserError
from ..util import storage

FORMATS = ("table", "json", "jsonl", "csv", "txt", "xmp", "hydrus")  # xmp, hydrus: infer/sidecars.py
BESIDE_FORMATS = ("txt", "xmp", "hydrus")  # written beside each image (or into it): a failed write fails that image
RECORD_FORMATS = ("json", "jsonl", "csv")  # what --out FILE takes: machine-readable records
RECORD_HEADS = ("rating", "general", "character", "copyright")  # always in a record, empty when the model lacks one
CSV_COLUMNS = ("path", "rating", "rating_score", "general", "character", "copyright")
CAPTION_EXT = ".txt"  # what sd-scripts and kohya_ss read beside each image (their tagger's default)
SEPARATOR = ", "  # between tags in captions and csv cells, as sd-scripts writes and reads them
# Danbooru tags whose underscores are part of the face, never spaces: the WD Space's list (SmilingWolf/wd-tagger).
KAOMOJIS = frozenset(
    {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o", "@_@", "^_^"}
    | {"o_o", "u_u", "x_x", "|_|", "||_||"}
)

Record = dict  # {"path": str, head: {tag: score}, ...}


@dataclass(frozen=True)
class CaptionOptions:
    """How tag names are written, and the caption's order."""

    replace_underscores: bool = False  # long_hair -> long hair, kaomojis kept
    escape_brackets: bool = False  # ( -> \(, as prompts for Stable Diffusion UIs need
    rating_first: bool = False  # captions start with the top rating tag (otherwise they carry no rating)

    def name(self, tag: str) -> str:
        if self.replace_underscores and tag not in KAOMOJIS:
            tag = tag.replace("_", " ")
        if self.escape_brackets:
            tag = tag.replace("(", "\\(").replace(")", "\\)")
        return tag


def make_record(path: str, tags: Mapping[str, Mapping[str, float]], options: CaptionOptions) -> Record:
    """One image's record: its path, then each head's tags (renamed by the options) with scores rounded to 6 places."""
    record: Record = {"path": path}
    for head in (*RECORD_HEADS, *(h for h in tags if h not in RECORD_HEADS)):
        record[head] = {options.name(t): round(float(s), 6) for t, s in tags.get(head, {}).items()}
    return record


def caption(record: Record, rating_first: bool = False) -> str:
    """The caption of one image: [fixed tags (--add),] [top rating,] characters, copyrights, then general tags, each
    highest first."""
    tags = list(record.get("added", ()))
    if rating_first and record.get("rating"):
        tags.append(next(iter(record["rating"])))
    for head in ("character", "copyright", "artist", "general"):
        tags.extend(record.get(head, {}))
    return SEPARATOR.join(dict.fromkeys(tags))  # a fixed tag the model chose too, once


def caption_path(image: Path) -> Path:
    """Where an image's caption goes: beside it, its suffix replaced (a.png -> a.txt; a file without one: a.txt)."""
    return image.with_suffix(CAPTION_EXT) if image.suffix else image.with_name(image.name + CAPTION_EXT)


class Writer(Protocol):
    """Writes records as they come; `close` ends the output (json's closing bracket, the table)."""

    def write(self, record: Record, image: Path) -> None: ...

    def close(self) -> None: ...


class JsonWriter:
    """A JSON list, streamed one record at a time so that memory does not grow with the folder."""

    def __init__(self, out: TextIO):
        self.out, self.n = out, 0

    def write(self, record: Record, image: Path) -> None:
        self.out.write(("[\n" if self.n == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
        self.n += 1

    def close(self) -> None:
        self.out.write("[]\n" if self.n == 0 else "\n]\n")
        self.out.flush()


class JsonlWriter:
    def __init__(self, out: TextIO):
        self.out = out

    def write(self, record: Record, image: Path) -> None:
        self.out.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.out.flush()


class CsvWriter:
    """path, rating (the top class), rating_score, then the tags of each head joined by ", ", highest score first."""

    def __init__(self, out: TextIO, heads: Iterable[str]):
        extra = tuple(h for h in heads if h not in CSV_COLUMNS)
        self.columns = (*CSV_COLUMNS, *extra)
        self.out = out
        self.csv = csv.writer(out, lineterminator="\n")
        self.csv.writerow(self.columns)

    def write(self, record: Record, image: Path) -> None:
        rating = next(iter(record["rating"].items()), ("", ""))
        cells = {"path": record["path"], "rating": rating[0], "rating_score": rating[1]}
        row = [cells.get(c, SEPARATOR.join(record.get(c, {}))) for c in self.columns]
        self.csv.writerow(row)

    def close(self) -> None:
        self.out.flush()


class TxtWriter:
    """One caption file beside each image, written whole under a temporary name and renamed (never half a file)."""

    def __init__(self, rating_first: bool):
        self.rating_first = rating_first

    def write(self, record: Record, image: Path) -> None:
        path = caption_path(image)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(caption(record, self.rating_first) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def close(self) -> None:
        pass


class TableWriter:
    """A table for people, printed when all images are done: file, top rating, characters, copyrights, general."""

    def __init__(self, out: TextIO):
        self.out, self.rows = out, []

    def write(self, record: Record, image: Path) -> None:
        def scored(head: str) -> str:
            return "\n".join(f"{t} {s:.2f}" for t, s in record.get(head, {}).items())

        rating = next(iter(record["rating"].items()), None)
        top = f"{rating[0]} {rating[1]:.2f}" if rating else ""
        general = SEPARATOR.join(record["general"])
        self.rows.append((record["path"], top, scored("character"), scored("copyright"), general))

    def close(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(show_lines=True)
        for name in ("file", "rating", "character", "copyright", "general"):
            table.add_column(name, overflow="fold")
        for row in self.rows:
            table.add_row(*row)
        console = Console(file=self.out, width=None if self.out.isatty() else 160, highlight=False)
        if self.rows:
            console.print(table)
        self.out.flush()


def check_output(path: str) -> None:
    """Where `--out` records go: a file in a folder that exists, or a URL in a bucket that exists and can be written
    (checked when the run starts), UserError if not."""
    if storage.is_remote(path):
        storage.check_writable_root(storage.location(path, "--out", write=True))
        return
    out = storage.local_path(path)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as tags.jsonl")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no such folder {out.parent}")


@contextlib.contextmanager
def output(path: str | None, default: TextIO) -> Iterator[TextIO]:
    """Where records go: `default` (stdout) without a path; else the file, written whole as `PATH.tmp` and renamed
    to PATH once the run has finished, so a crash or Ctrl-C never leaves a file that looks complete (a stopped
    run removes its .tmp; only kill -9 leaves one, under that name). A URL: the same file in a local temporary
    folder, uploaded when the run has finished (an object appears whole or not at all)."""
    if path is None:
        yield default
        return
    if storage.is_remote(path):
        with tempfile.TemporaryDirectory(prefix="i2v-out-") as tmp:
            local = Path(tmp) / storage.name(path)
            with output(str(local), default) as f:
                yield f
            storage.upload(local, path)
        return
    target = storage.local_path(path)
    tmp = target.with_name(target.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)


def open_writer(fmt: str, out: TextIO, heads: Iterable[str], options: CaptionOptions) -> Writer:
    """The writer of one format; json, jsonl, csv and table write to `out` (stdout), txt beside each image."""
    if fmt == "json":
        return JsonWriter(out)
    if fmt == "jsonl":
        return JsonlWriter(out)
    if fmt == "csv":
        return CsvWriter(out, heads)
    if fmt == "txt":
        return TxtWriter(options.rating_first)
    if fmt == "table":
        return TableWriter(out)
    raise ValueError(f"unknown format {fmt!r}")
