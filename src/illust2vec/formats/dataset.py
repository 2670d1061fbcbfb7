"""A built dataset directory: training shards per split (`{split}-NNNNNN.tar`), `dataset.json`, `selected_tags.csv`.

`i2v build` writes it; the loader, `i2v train` and `i2v evaluate` read it. Each shard sample is a square RGB image
(`{md5}.jpg`, `.webp` or `.png`) and its labels (`{md5}.json`: id, md5, rating, labels, split), where `labels` maps a
head to the sorted positions of the post's tags within that head of the vocabulary.

The directory may be a URL (`s3://bucket/built`, `gs://...`; `https://...` for reading), through `util/storage`: the
readers here and the loader take it as they take a local path.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

from ..errors import UserError
from ..util import storage
from .shards import iter_samples, sample_json
from .vocab import Vocab, read_vocab

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
IMAGE_FORMATS = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}  # a shard image's extension -> Pillow's format name
INFO = "dataset.json"
VOCAB = "selected_tags.csv"
# How shards are checked against dataset.json before they are read: "sizes" always (a stat per shard), "checksums"
# always (sha256, reading every byte), "auto" checksums too when the shards checked are local and hold at most
# CHEAP_CHECKSUM bytes (remote shards' checksums would mean downloading all of them first).
VERIFY = ("auto", "sizes", "checksums")
CHEAP_CHECKSUM = 1 << 30  # 1 GiB: well under a second of sha256 on one core of a recent CPU (about 1.7 GB/s)


def shard_pattern(split: str) -> str:
    """The file names of a split's shards, for `ShardWriter`: train-000000.tar, train-000001.tar, ..."""
    return f"{split}-{{index:06d}}.tar"


def built_files(root: storage.Location) -> list[storage.Location]:
    """What a build leaves in `root` (its shards, their temporaries, dataset.json), dataset.json first: a rebuild
    removes them all, and removing dataset.json first means nothing left behind looks like a finished build."""
    found = [*storage.listing(root, "*-[0-9]*.tar"), *storage.listing(root, "*.tmp")]
    return [storage.join(root, INFO), *found]


@dataclass(frozen=True)
class Sample:
    """The labels of one training sample, as its `.json` member holds them."""

    id: int
    md5: str  # the sample's key in the shard
    rating: str  # the post's rating code (g, s, q, e) or ""
    labels: dict[str, list[int]]  # head -> sorted positions within that head
    split: str

    def members(self, image: bytes, image_format: str) -> dict[str, bytes]:
        """The sample's shard members, extension -> bytes: the encoded square image and the labels."""
        return {image_format: image, "json": sample_json(asdict(self))}

    @classmethod
    def from_json(cls, data: bytes) -> Sample:
        meta = json.loads(data)
        return cls(meta["id"], meta["md5"], meta["rating"], meta["labels"], meta["split"])


@dataclass(frozen=True)
class SplitInfo:
    """One split in dataset.json: how many samples, in which shards, and how often each tag occurs."""

    samples: int = 0
    shards: list[str] = field(default_factory=list)
    tag_counts: dict[str, list[int]] = field(default_factory=dict)  # head -> count per position
    # shard name -> {"bytes": the file's size, "sha256": its checksum}, as written; empty in dataset.json files
    # written before sizes were recorded, whose shards are then not checked.
    files: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetInfo:
    """dataset.json: what was built, from what, and how."""

    image_size: int
    image_format: str  # a key of IMAGE_FORMATS
    vocab_hash: str  # `Vocab.hash` of the selected_tags.csv beside it
    heads: dict[str, int]  # head -> number of tags
    splits: dict[str, SplitInfo]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> posts left out
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> a few of those posts
    sources: list[str] = field(default_factory=list)  # the crawl directories
    config: dict = field(default_factory=dict)  # the build's configuration, as JSON
    seconds: float = 0.0
    vocab: str = VOCAB
    format_version: int = FORMAT_VERSION

    def as_dict(self) -> dict:
        """dataset.json's content, keys in the file's order."""
        return {
            "format_version": self.format_version,
            "image_size": self.image_size,
            "image_format": self.image_format,
            "vocab": self.vocab,
            "vocab_hash": self.vocab_hash,
            "heads": self.heads,
            "splits": {s: asdict(info) for s, info in self.splits.items()},
            "skipped": self.skipped,
            "skipped_examples": self.skipped_examples,
            "sources": self.sources,
            "config": self.config,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> DatasetInfo:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known = SplitInfo.__dataclass_fields__
        fields["splits"] = {
            s: SplitInfo(**{k: v for k, v in info.items() if k in known}) for s, info in d["splits"].items()
        }
        return cls(**fields)


def write_info(root: storage.Location, info: DatasetInfo) -> storage.Location:
    """Write dataset.json into `root` (a directory or URL) whole: its presence means the build finished."""
    path = storage.join(root, INFO)
    storage.write_text(path, json.dumps(info.as_dict(), indent=1))
    return path


def read_info(root: storage.Location) -> DatasetInfo:
    """Read and check dataset.json; a UserError names the directory or file and what is wrong with it."""
    path = storage.join(root, INFO)
    where = storage.display(path)
    try:
        if storage.is_remote(path) and not storage.exists(path):
            storage.check_readable_root(root)  # a missing bucket or wrong credentials, named as such
            raise FileNotFoundError(path)
        d = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise UserError(f"{storage.display(root)}: no {INFO}; is it a directory that `i2v build` wrote?") from None
    except ValueError as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("format_version") != FORMAT_VERSION:
        version = d.get("format_version") if isinstance(d, dict) else None
        raise UserError(f"{where}: format version {version}, this illust2vec reads {FORMAT_VERSION}")
    try:
        return DatasetInfo.from_dict(d)
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{where}: not a dataset.json this illust2vec reads ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Dataset:
    """A built dataset directory (a local `Path`, or a URL as a string): its dataset.json, vocabulary and shards per
    split."""

    root: storage.Location
    info: DatasetInfo
    vocab: Vocab

    @property
    def name(self) -> str:
        """The directory's own name (the last part of its path or URL)."""
        return storage.name(self.root)

    @property
    def vocab_file(self) -> storage.Location:
        """Where its selected_tags.csv is."""
        return storage.join(self.root, self.info.vocab)

    @property
    def image_size(self) -> int:
        return self.info.image_size

    def shards(self, split: str) -> list[str]:
        """The split's shards as paths or URLs, what the loader opens."""
        return [str(storage.join(self.root, name)) for name in self.info.splits[split].shards]

    def samples(self, split: str) -> int:
        return self.info.splits[split].samples

    def tag_counts(self, split: str) -> dict[str, list[int]]:
        """Head -> how many of the split's samples carry each of its tags."""
        return self.info.splits[split].tag_counts

    def check_shards(self, splits: Iterable[str], verify: str = "auto") -> None:
        """Check that the splits' shards are the files the build wrote, before anything reads them: each one's size
        always, and its sha256 as `verify` says (see VERIFY). The first shard that differs is a UserError naming it.
        Shards of a dataset.json without sizes (written before they were recorded) are not checked. Remote shards
        are checked as local ones are: sizes from the store's listing, checksums by reading each object through."""
        if verify not in VERIFY:
            raise UserError(f"verify must be one of {', '.join(VERIFY)}, not {verify!r}")
        recorded = [(storage.join(self.root, n), rec) for s in splits for n, rec in self.info.splits[s].files.items()]
        present = {storage.name(p) for p in storage.listing(self.root, "*.tar")}  # one listing, not a request each
        for path, rec in recorded:
            if storage.name(path) not in present:
                raise UserError(f"{storage.display(path)}: missing, though {INFO} lists it")
            size = storage.size(path)
            if size != rec["bytes"]:
                raise UserError(
                    f"{storage.display(path)}: {size} bytes, {INFO} says {rec['bytes']} (a half-copied file?)"
                )
        total = sum(rec["bytes"] for _, rec in recorded)
        cheap = total <= CHEAP_CHECKSUM and storage.is_local(self.root)
        if verify == "sizes" or (verify == "auto" and not cheap):
            return
        for path, rec in recorded:
            if rec.get("sha256") and (digest := sha256(path)) != rec["sha256"]:
                raise UserError(
                    f"{storage.display(path)}: sha256 {digest[:16]}..., {INFO} says {rec['sha256'][:16]}... "
                    "(a corrupted copy?)"
                )

    def labels(self, split: str) -> Iterator[Sample]:
        """The split's samples in shard order, labels only (the images are not kept; remote shards are streamed)."""
        for _, files in iter_samples(self.shards(split), exts=("json",)):
            yield Sample.from_json(files["json"])


def sha256(loc: storage.Location) -> str:
    """The sha256 of a file or object, hex (what `sha256sum` prints), read through in blocks."""
    digest = hashlib.sha256()
    with storage.open_read(loc) as f, storage.errors(loc, "cannot read"):
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def open_dataset(root: storage.Location) -> Dataset:
    """Read dataset.json and the vocabulary beside it (in a directory or under a URL), checking that they belong
    together."""
    root = storage.location(root, "dataset")
    info = read_info(root)
    vocab = read_vocab(storage.join(root, info.vocab))
    if vocab.hash != info.vocab_hash:
        raise UserError(
            f"{storage.display(root)}: selected_tags.csv does not match the vocabulary the shards were built with"
        )
    return Dataset(root, info, vocab)
