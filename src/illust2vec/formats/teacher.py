"""The soft-target cache of `i2v distill` (by default `RUN/teacher/`): a teacher's outputs on unlabelled images,
computed once, and the student-size images they belong to.

The cache is a built dataset (`formats/dataset.py`) that `i2v train`'s loader reads as it is, plus what a distilled
student needs besides labels:

- `teacher.json`: the teacher's identity (its source, kind and weights hash, its input size, its thresholds and the
  activation of each head), the student's image size, the held-out fraction, and the list of images it was started
  on (how many and a hash of their paths), so that a rerun against another teacher, size or image list is refused;
- `selected_tags.csv`: the teacher's vocabulary with its categories (the student's heads);
- the parts: the images in discovery order, `part_size` at a time; part K is `train-K.tar` and `val-K.tar` (either
  may be absent when the part put nothing in that split) and, written last, `parts/part-K.json`, its record. A part
  without a record is unfinished: a resumed pass removes its shards and does it again, so a killed pass continues
  after the last finished part, and no image is written twice;
- `dataset.json`, written when every part is finished: its presence says the cache is whole.

Each sample is `{key}.jpg` (the image padded and resized to the student's size, as `i2v build` makes them:
`util.images.pad_resize`), `{key}.json` (the dataset's sample record, whose labels are the teacher's decisions at its
thresholds, plus the image's path) and `{key}.npy` (the teacher's probabilities over the whole vocabulary as float16,
read with allow_pickle=False). Keeping the small images with the targets is deliberate: the student's epochs read
them instead of decoding the originals again every epoch.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .bundle import Thresholds
from .dataset import INFO, VOCAB, DatasetInfo, SplitInfo, shard_pattern, write_info
from .shards import TMP, ShardInfo, ShardWriter, sample_json
from .vocab import Vocab, read_vocab, write_vocab

FORMAT_VERSION = 1
IDENTITY = "teacher.json"
PARTS = "parts"
SOFT = "npy"  # the member holding the teacher's probabilities
IMAGE = "jpg"
SPLITS = ("train", "val")
# What must match for a rerun to continue a cache: the teacher, the student's size, the split, the parts, the images.
SAME = ("source", "weights", "image_size", "size", "val_fraction", "part_size", "items", "items_hash", "vocab_hash")
AGREEMENT = "agreement"  # in a distilled run: agreement/epoch-NNN.json, the thresholds matched to the teacher


@dataclass(frozen=True)
class TeacherInfo:
    """teacher.json: who the teacher is and how the cache was made."""

    source: str  # what --teacher named (a directory, a hub id)
    kind: str  # bundle, wd-timm or wd-onnx
    weights: str | None  # sha256 of its weights file, when it has one
    image_size: int  # the teacher's input side
    size: int  # the student's image side, the size of the cached images
    vocab_hash: str
    activations: dict[str, str]  # head -> the teacher's activation
    thresholds: dict  # the teacher's thresholds (`Thresholds.to_json`)
    val_fraction: float
    part_size: int
    items: int  # images (and other files) the pass was started on
    items_hash: str  # sha256 of their paths, in order
    format_version: int = FORMAT_VERSION

    def teacher_thresholds(self) -> Thresholds:
        return Thresholds.from_json(self.thresholds)

    def differences(self, other: TeacherInfo) -> list[str]:
        """What differs between two caches' identities, in words ("size", "teacher weights", "image list")."""
        words = {"items": "image list", "items_hash": "image list", "weights": "teacher weights"}
        words |= {"vocab_hash": "vocabulary", "image_size": "teacher input size", "val_fraction": "val fraction"}
        found = [words.get(k, k.replace("_", " ")) for k in SAME if getattr(self, k) != getattr(other, k)]
        return list(dict.fromkeys(found))


@dataclass(frozen=True)
class PartRecord:
    """parts/part-K.json: what part K wrote."""

    index: int
    items: int  # files in the part's range of the listing
    samples: dict[str, int]  # split -> samples written
    shards: dict[str, dict] = field(default_factory=dict)  # split -> {name, bytes, sha256}
    tag_counts: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # split -> head -> decisions per tag

    @property
    def written(self) -> int:
        return sum(self.samples.values())


def items_hash(paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def sample_key(path: str) -> str:
    """A sample's key in the shards: from its path (the same path, the same key, in every run), without dots."""
    return hashlib.sha1(path.encode()).hexdigest()[:24]


def split_of(key: str, val_fraction: float) -> str:
    """The held-out split of a sample, decided by its key alone: a resumed or repeated pass splits alike."""
    return "val" if int(key[:8], 16) / 16**8 < val_fraction else "train"


def encode_probs(probs: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(probs, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def decode_probs(data: bytes) -> np.ndarray:
    """A sample's `.npy` member -> float32 probabilities over the vocabulary (never unpickled)."""
    return np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32)


def split_heads(probs: np.ndarray, heads: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Probabilities over the vocabulary -> one array per head (the vocabulary's rows go head by head)."""
    out, at = {}, 0
    for head, n in heads.items():
        out[head] = probs[at : at + n]
        at += n
    if at != len(probs):
        raise ValueError(f"{len(probs)} probabilities for a vocabulary of {at} tags")
    return out


TARGET = "teacher:"  # the loader's targets: "teacher:general" beside "general", the teacher's probabilities


def soft_targets(data: bytes, heads: Mapping[str, int]) -> dict[str, np.ndarray]:
    """A sample's `.npy` member -> the loader's soft targets, one float32 array per head."""
    return {TARGET + h: p for h, p in split_heads(decode_probs(data), heads).items()}


def sample_members(image: bytes, record: dict, probs: np.ndarray) -> dict[str, bytes]:
    """A sample's members: the student-size image, its record (the dataset's fields and `path`), the probabilities."""
    return {IMAGE: image, "json": sample_json(record), SOFT: encode_probs(probs)}


# ---- the identity


def write_identity(root: Path, info: TeacherInfo, vocab: Vocab) -> None:
    root.mkdir(parents=True, exist_ok=True)
    write_vocab(vocab, root / VOCAB)
    _write_json(root / IDENTITY, asdict(info))


def read_identity(root: Path) -> TeacherInfo | None:
    """teacher.json, or None when the cache has not been started."""
    path = root / IDENTITY
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        if d.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path}: format version {d.get('format_version')}, this illust2vec reads {FORMAT_VERSION}")
        return TeacherInfo(**d)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: not a teacher cache's identity ({e})") from None


def read_vocab_of(root: Path) -> Vocab:
    return read_vocab(root / VOCAB)


# ---- the parts


def part_path(root: Path, index: int) -> Path:
    return root / PARTS / f"part-{index:06d}.json"


def finished_parts(root: Path) -> list[PartRecord]:
    """The records of the parts finished so far, in order; they run 0, 1, ... without a gap."""
    records = []
    for index in range(1 << 30):
        path = part_path(root, index)
        if not path.exists():
            break
        try:
            records.append(PartRecord(**json.loads(path.read_text())))
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: not a part record ({e})") from None
    return records


def clear_unfinished(root: Path, first: int) -> None:
    """Remove what parts from `first` on left behind (shards being written, shards without their record), and a
    dataset.json from before: the pass writes them again."""
    (root / INFO).unlink(missing_ok=True)
    for split in SPLITS:
        for path in root.glob(f"{split}-*.tar*"):
            digits = path.name[len(split) + 1 :].split(".")[0]
            if digits.isdigit() and (int(digits) >= first or path.name.endswith(TMP)):
                path.unlink()
    for path in (root / PARTS).glob("*.tmp"):
        path.unlink()


class PartWriter:
    """Writes one part: its samples into its train and val shards, then its record, last."""

    def __init__(self, root: Path, index: int, items: int, heads: Mapping[str, int]):
        self.root, self.index, self.items = root, index, items
        self.writers = {s: ShardWriter(root, shard_pattern(s), first_index=index) for s in SPLITS}
        self.counts = {s: {h: np.zeros(n, np.int64) for h, n in heads.items()} for s in SPLITS}
        self.samples = dict.fromkeys(SPLITS, 0)

    def add(self, key: str, split: str, members: dict[str, bytes], labels: Mapping[str, Sequence[int]]) -> None:
        self.writers[split].add(key, members)
        self.samples[split] += 1
        for head, positions in labels.items():
            self.counts[split][head][list(positions)] += 1

    def close(self) -> PartRecord:
        """Finish the shards (each renamed once whole), then write the record: the part is done."""
        shards = {}
        for split in SPLITS:
            info: ShardInfo | None = self.writers[split].close()
            if info is not None:
                shards[split] = {"name": info.name, "bytes": info.size, "sha256": info.sha256}
        record = PartRecord(
            self.index,
            self.items,
            {s: n for s, n in self.samples.items()},
            shards,
            {s: {h: c.tolist() for h, c in heads.items()} for s, heads in self.counts.items()},
        )
        _write_json(part_path(self.root, self.index), asdict(record))
        return record

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()


def finish(root: Path, info: TeacherInfo, vocab: Vocab, records: Sequence[PartRecord], sources: list[str]) -> None:
    """dataset.json from the parts' records: the cache becomes a dataset the training loader reads."""
    heads = {h: len(ix) for h, ix in vocab.heads.items()}
    splits = {}
    for split in SPLITS:
        shards = [r.shards[split] for r in records if split in r.shards]
        counts = {h: np.zeros(n, np.int64) for h, n in heads.items()}
        for r in records:
            for h, c in r.tag_counts.get(split, {}).items():
                counts[h] += np.asarray(c, np.int64)
        splits[split] = SplitInfo(
            samples=sum(r.samples.get(split, 0) for r in records),
            shards=[s["name"] for s in shards],
            tag_counts={h: c.tolist() for h, c in counts.items()},
            files={s["name"]: {"bytes": s["bytes"], "sha256": s["sha256"]} for s in shards},
        )
    dataset = DatasetInfo(
        image_size=info.size,
        image_format=IMAGE,
        vocab_hash=vocab.hash,
        heads=heads,
        splits=splits,
        sources=sources,
        config={"teacher": asdict(info)},
    )
    write_info(root, dataset)


def is_finished(root: Path) -> bool:
    return (root / INFO).exists()


# ---- a distilled run's thresholds, matched to the teacher


def agreement_path(run: Path, epoch: int) -> Path:
    """RUN/agreement/epoch-NNN.json: the thresholds that match the student's decisions to the teacher's, per epoch,
    and the agreement figures at them. `i2v export` takes its thresholds from here."""
    return Path(run) / AGREEMENT / f"epoch-{epoch:03d}.json"


def write_agreement(run: Path, epoch: int, thresholds: Thresholds, figures: Mapping[str, float]) -> None:
    finite = {k: (float(v) if math.isfinite(v) else None) for k, v in figures.items()}
    _write_json(agreement_path(run, epoch), {"thresholds": thresholds.to_json(), "figures": finite})


def read_agreement(run: Path, epoch: int) -> Thresholds | None:
    """The thresholds a distilled run matched to its teacher at that epoch; None for any other run."""
    path = agreement_path(run, epoch)
    if not path.exists():
        return None
    try:
        return Thresholds.from_json(json.loads(path.read_text())["thresholds"])
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{path}: not an agreement record ({e})") from None


def _write_json(path: Path, data: dict) -> None:
    """Whole or absent: written beside, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False))
    os.replace(tmp, path)
