"""The batch-inference engine of `i2v tag` and `i2v embed`: find the files, decode them in threads while the model
runs, hand the consumer whole batches in order, and count what could not be used, by one vocabulary of reasons.

WebDataset tar shards (`*.tar`, named or found in a folder: a crawl's `images/*.tar`, img2dataset's output) are read
in place: each of their members is an item named `SHARD/MEMBER`, read by its offset (`formats.shards`) in the same
read-ahead, never unpacked to disk. A member cut short or undecodable is a bad item; a shard that cannot be listed at
all is one bad item, named. Walking the inputs into items (`discover`, `Item`) is `formats/inputs.py`'s, which
`i2v quantize` shares for its calibration images; the names stay importable from here.

Inputs may be URLs (`util.storage`): every file under an `s3://` or `gs://` prefix (its subfolders with
`recursive`), a single `http(s)://` file, and tar shards at any of them. An item's path is then the URL as given,
and its bytes are read in the same read-ahead (one request per file; a member of a remote shard is one ranged read).

Images are recognised by their content, in any format Pillow reads, whatever their name. A file that cannot be
used is named on stderr with its reason, counted and skipped; the summary says how many. Files met in a folder
that are not images at all (captions, JSON, videos...) are counted apart, quietly (-v lists them): they are not
failures.

Pillow releases the GIL while it decodes and resizes, so a few threads keep the model fed; a bounded read-ahead
keeps memory flat on folders of any size. Nothing here imports torch. `i2v serve` decodes its uploads with
`decode`, the same function the engine's workers call.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import Progress

from ..errors import UserError
from ..formats.inputs import SHARD_SUFFIX, Item, Loc, discover, is_shard, shard_items, suffix, why  # noqa: F401
from ..formats.shards import read_member
from ..util import storage
from ..util.cores import cores
from ..util.images import DRAFT_INFO, BadImage
from ..util.progress import progress_bar as util_progress_bar
from ..util.shard import check_shard
from .autobatch import AUTO, GPU_BATCH, AutoBatch, resolve_batch_size  # noqa: F401 - re-exported
from .preprocess import ImageLike, prepare, read_image
from .tagger import BACKENDS, PRECISIONS
from .writers import caption_path

log = logging.getLogger(__name__)

# Why a file was not used: the words of the summary line (underscores shown as spaces) and of `failed`'s keys.
# A BadImage's reason passes through, except "not_image": that is `util.images`' word for bytes Pillow cannot
# decode, and here (a file named on the command line, or one with an image's suffix) it is "undecodable": "not an
# image" is what a file in a folder that is no image at all is, which is passed over, not a failure.
REASONS = ("undecodable", "empty", "too_large", "corrupt", "unreadable", "caption_clash", "unwritable", "unsupported")


def reason_of(e: BadImage) -> str:
    return "undecodable" if e.reason == "not_image" else e.reason


SNIFF = 1 << 20  # bytes of a remote file without an image suffix read to tell whether it is an image at all


def shown(loc: Loc) -> str:
    """How an item's path appears in records and messages: a local path as given, a URL without any secret."""
    return storage.display(loc)


def full_path(loc: Loc) -> str:
    """An item's path made absolute (embed's `path` column): a local path resolved, a URL as shown."""
    return storage.display(loc) if storage.is_remote(loc) else str(Path(loc).resolve())


@dataclass
class BatchSummary:
    """What a batch job (`i2v tag`, `i2v embed`) did; `line()` is the summary printed on stderr."""

    verb: str  # "tagged", "embedded"
    done: int = 0  # images the model ran on and whose output was written
    failed: Counter = field(default_factory=Counter)  # reason (REASONS) -> count
    not_images: int = 0  # files in folders that are not images: passed over, not failures
    captions_kept: int = 0  # txt without --overwrite: images skipped because their caption exists
    already: int = 0  # embed: done by an earlier run (resume)
    unchanged: int = 0  # tag: tagged by an earlier run as they are (the catalogue), not tagged again
    device: str = ""  # where the model ran: the device and the backend or execution provider
    files: int = 0  # in this shard
    subfolders_skipped: int = 0  # folders not entered without --recursive
    rows: int | None = None  # embed: rows in the output when finished
    seconds: float = 0.0
    batch: str = ""  # the batch size the model ran at: "8", or "1 (auto)" when timed (`autobatch`)

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    def line(self) -> str:
        rate = self.done / self.seconds if self.seconds > 0 else 0.0
        parts = [f"{self.verb} {_count(self.done, 'image')} in {self.seconds:.1f} s ({rate:.1f} images/s)"]
        if self.device:
            parts[0] += f" on {self.device}"
        if self.batch:
            parts[0] += f", batch {self.batch}"
        if self.unchanged:
            parts.append(f"{self.unchanged} unchanged since tagged (--overwrite tags them again)")
        if self.already:
            parts.append(f"{self.already} done before (resumed)")
        if self.failed:
            reasons = ", ".join(f"{n} {r.replace('_', ' ')}" for r, n in self.failed.most_common())
            parts.append(f"{self.n_failed} failed ({reasons})")
        if self.not_images:
            parts.append(f"{_count(self.not_images, 'non-image file')} passed over (-v lists them)")
        if self.captions_kept:
            parts.append(f"{self.captions_kept} skipped: caption exists (--overwrite replaces)")
        if self.subfolders_skipped:
            parts.append(f"{_count(self.subfolders_skipped, 'subfolder')} not entered (--recursive)")
        if self.rows is not None:
            parts.append(f"{self.rows} rows in the output")
        return "; ".join(parts)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class RayOptions:
    """`--ray`: run a batch job as a Ray Data pipeline (`infer/distributed.py`) that writes parts under `--out`."""

    address: str | None = None  # --ray-address (or RAY_ADDRESS); None: a local cluster for this run
    actors: int | None = None  # model actors; None: util.cluster.default_actors
    gpus_per_actor: float | None = None  # None: 1 on a cluster with GPUs, else 0
    part_size: int = 1024  # records per part: the most a stopped run redoes

    def __post_init__(self) -> None:
        if self.actors is not None and (not isinstance(self.actors, int) or self.actors < 1):
            raise UserError(f"--actors must be at least 1, not {self.actors!r}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise UserError(f"--gpus-per-actor must be at least 0, not {self.gpus_per_actor!r}")
        if not isinstance(self.part_size, int) or self.part_size < 1:
            raise UserError(f"--part-size must be at least 1, not {self.part_size!r}")


def check_job(cfg: Any) -> None:
    """The options every batch job's config shares (`paths`, `shard`, `batch_size`, `workers`, `backend`): checked
    alike, UserError naming the option; `paths` made a tuple and `shard` ("I/N" or (I, N)) a pair of ints, in place
    (for frozen dataclasses, from their `__post_init__`)."""
    name = type(cfg).__name__
    if isinstance(cfg.paths, str | os.PathLike):
        raise UserError(f"{name}.paths: a sequence of paths, not one path")
    object.__setattr__(cfg, "paths", tuple(str(p) for p in cfg.paths))
    object.__setattr__(cfg, "shard", check_shard(cfg.shard))
    if isinstance(cfg.batch_size, str) and cfg.batch_size.isdigit():
        object.__setattr__(cfg, "batch_size", int(cfg.batch_size))
    if cfg.batch_size != AUTO and (not isinstance(cfg.batch_size, int) or cfg.batch_size < 1):
        raise UserError(f"--batch-size must be auto or at least 1, not {cfg.batch_size!r}")
    if cfg.workers is not None and (not isinstance(cfg.workers, int) or cfg.workers < 1):
        raise UserError(f"--workers must be at least 1, not {cfg.workers!r}")
    if cfg.backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, not {cfg.backend!r}")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {cfg.precision!r}")


# ---- decoding


def image_extensions() -> frozenset[str]:
    """Every suffix Pillow reads (".jpg", ".webp", ...): a file so named that does not decode is an error."""
    return frozenset(ext.lower() for ext in Image.registered_extensions())


class NotImage(Exception):
    """A file found in a folder that is not an image at all: counted, not a failure."""


class CaptionExists(Exception):
    """txt without --overwrite: the image has its caption already, so it is not decoded."""


@dataclass(frozen=True)
class Decoded:
    """One image as the model takes it, and the picture's size (before a JPEG's draft decoding shrank it)."""

    x: np.ndarray  # [size, size, 3] float32 BGR
    width: int
    height: int


def decode(source: ImageLike, size: int) -> Decoded:
    """A path, bytes, PIL image or array -> the model's input for it: the one decoding of tag, embed and serve.

    Raises:
        BadImage: not an image, broken, or over the pixel limit.
    """
    image = read_image(source, size)
    draft = image.info.get(DRAFT_INFO)  # a big JPEG decoded at a fraction of its size knows its full size
    width, height = tuple(draft[:2]) if draft else image.size
    return Decoded(prepare(image, size), width, height)


Decoder = Callable[[ImageLike, int], Any]  # (a path or bytes, the model's side) -> what the consumer gets


def model_input(source: ImageLike, size: int) -> np.ndarray:
    """The default decoder: the model's input for an image (`decode`'s `x`)."""
    return decode(source, size).x


def load(
    item: Item, size: int, image_exts: frozenset[str], keep_captions: bool = False, decoder: Decoder = model_input
) -> Any:
    """One file -> the model's input for it (or what `decoder` makes of it). Runs in a worker thread.

    Raises:
        NotImage: a file met in a folder, without an image suffix, that Pillow does not recognise.
        CaptionExists: with `keep_captions`, an image whose caption file exists.
        BadImage: anything else that does not decode.
    """
    if item.member is not None or item.error is not None:
        return _load_member(item, size, image_exts, decoder)
    if storage.is_remote(item.path):
        return _load_remote(item, size, image_exts, decoder)
    if not item.named and item.path.suffix.lower() not in image_exts:
        # Sniff the header before reading the whole file: a folder may hold large videos or archives.
        try:
            with Image.open(item.path):
                pass
        except (UnidentifiedImageError, ValueError) as e:
            raise NotImage(str(e)) from None
        except Image.DecompressionBombError:
            pass  # an image after all; read_image names the problem
        except OSError as e:
            raise BadImage(f"cannot read ({e.strerror or e})", "unreadable") from None
    if keep_captions and caption_path(item.path).exists():
        raise CaptionExists()
    return decoder(item.path, size)


def _load_remote(item: Item, size: int, image_exts: frozenset[str], decoder: Decoder = model_input) -> Any:
    """A file at a URL -> the model's input for it. One without an image suffix met under a prefix is first sniffed
    from its first SNIFF bytes, so that a bucket's videos and archives are not fetched whole to be passed over."""
    try:
        if not item.named and suffix(item.path) not in image_exts:
            head = storage.read_range(item.path, 0, SNIFF)
            _sniff(head)
            data = head if len(head) < SNIFF else storage.read_bytes(item.path)
        else:
            data = storage.read_bytes(item.path)
    except (OSError, UserError) as e:
        raise BadImage(f"cannot read ({why(e, item.path)})", "unreadable") from None
    return decoder(data, size)


def _sniff(data: bytes) -> None:
    """NotImage unless Pillow recognises the bytes' header (a broken or too large image passes: decode names it)."""
    try:
        with Image.open(io.BytesIO(data)):
            pass
    except (UnidentifiedImageError, ValueError) as e:
        raise NotImage(str(e)) from None
    except (Image.DecompressionBombError, OSError):
        pass  # an image after all; decode names the problem


def _load_member(item: Item, size: int, image_exts: frozenset[str], decoder: Decoder = model_input) -> Any:
    """A tar shard's member -> the model's input for it, read by its offset (the shard is never unpacked). A member
    without an image suffix that Pillow does not recognise (a sample's .json, .txt) is passed over as NotImage."""
    if item.error is not None:
        raise BadImage(*item.error)
    member = item.member
    try:
        data = read_member(member)
    except (OSError, UserError) as e:
        raise BadImage(f"cannot read ({why(e, member.shard)})", "unreadable") from None
    if len(data) < member.size:  # the shard ends inside this member: a half-copied file, a broken stream
        raise BadImage(f"cut short: {len(data)} of {member.size} bytes in the shard", "corrupt")
    if suffix(item.path) not in image_exts:
        _sniff(data)
    return decoder(data, size)


def read_ahead(
    items: Sequence[Item], work, pool: ThreadPoolExecutor, ahead: int | Callable[[], int]
) -> Iterator[tuple[Item, Future]]:
    """Submit work on up to `ahead` items beyond the one being consumed; yield (item, future) in order. `ahead` may
    be a function, asked again at each item (the read-ahead follows a batch size that changes)."""
    limit = ahead if callable(ahead) else (lambda: ahead)
    pending: deque[tuple[Item, Future]] = deque()
    queue = iter(items)

    def fill() -> None:
        while len(pending) < limit():
            nxt = next(queue, None)
            if nxt is None:
                return
            pending.append((nxt, pool.submit(work, nxt)))

    fill()
    while pending:
        item, future = pending.popleft()
        fill()
        yield item, future


def progress_bar(console: Console, label: str) -> Progress:
    """The bar of a batch job over images: count, images/s, time left."""
    return util_progress_bar(console, label, "{task.fields[rate]:.1f} images/s", eta=True)


# ---- the engine


def batch_note(batch_size: int | AutoBatch) -> str:
    """How the summary names the batch size: "8"; "1 (auto: 1: 0.41 s, 2: 0.52 s per image)" when timed; and
    "2 (auto, still timing)" for a job that ended before the choice was made (the fastest size so far)."""
    if not isinstance(batch_size, AutoBatch):
        return str(batch_size)
    if batch_size.chosen is not None:
        return f"{batch_size.chosen} (auto: {batch_size.describe()})"
    timed = {n for n, t in batch_size.timings.items() if len(t) >= batch_size.trials}
    return f"{batch_size.best() if timed else batch_size.size()} (auto, still timing when the job ended)"


Batch = list[tuple[Item, np.ndarray]]


@dataclass
class Engine:
    """Runs a consumer over every image of a list of files, in order, a batch at a time.

    The consumer gets each batch of (item, model input) pairs and runs the model; it counts what it wrote in
    `summary.done` and reports a file it could not finish with `fail`. `accept`, when given, may turn an item away
    after it decoded (counted by the caller, e.g. as a failure).
    """

    summary: BatchSummary
    size: int  # the model's input side
    console: Console
    batch_size: int | AutoBatch = 32  # a number, or an AutoBatch that times the first batches to choose one
    workers: int | None = None  # decoding threads; None: one per core
    keep_captions: bool = False  # txt without --overwrite: an image whose caption exists is skipped, not decoded
    accept: Callable[[Item], bool] | None = None
    decoder: Decoder = model_input  # what each image becomes (i2v distill: the teacher's input and the student's)

    def fail(self, item: Item, message: str, reason: str) -> None:
        """The one bad-item policy: the file is named on stderr with the message, and counted by its reason."""
        self.summary.failed[reason] += 1
        self.console.print(f"{shown(item.path)}: {message}", highlight=False, markup=False, soft_wrap=True)

    def run(self, items: Sequence[Item], consume: Callable[[Batch], None], label: str) -> None:
        """Decode `items` ahead in threads and feed `consume` whole batches (the last one shorter), in order."""
        workers = self.workers or cores()
        exts = image_extensions()
        work = lambda item: load(item, self.size, exts, self.keep_captions, self.decoder)  # noqa: E731
        chooser = self.batch_size if isinstance(self.batch_size, AutoBatch) else None
        size = chooser.size if chooser else lambda: self.batch_size
        batch: Batch = []
        t0 = time.perf_counter()
        pool = ThreadPoolExecutor(workers, thread_name_prefix="i2v-decode")
        try:
            with progress_bar(self.console, label) as progress:
                task = progress.add_task(label, total=len(items), rate=0.0)
                # Two batches ahead: the next one decodes while the model runs on this one; memory stays bounded.
                # While auto times its sizes, the read-ahead follows the size timed, so that the decoding beside each
                # timed batch is what it would be for the whole job at that size.
                for item, future in read_ahead(items, work, pool, ahead=lambda: 2 * size() + workers):
                    progress.advance(task)
                    x = self._take(item, future)
                    if x is None or (self.accept is not None and not self.accept(item)):
                        continue
                    batch.append((item, x))
                    if len(batch) >= size():
                        self._consume(consume, batch, chooser)
                        batch = []
                        progress.update(task, rate=self.summary.done / (time.perf_counter() - t0))
                if batch:
                    self._consume(consume, batch, chooser)
                self.summary.seconds = time.perf_counter() - t0
                progress.update(task, rate=self.summary.done / self.summary.seconds if self.summary.seconds else 0)
        finally:
            # On Ctrl-C or a failed write, drop the read-ahead instead of decoding it to the end.
            pool.shutdown(wait=True, cancel_futures=True)
        self.summary.batch = batch_note(self.batch_size)

    @staticmethod
    def _consume(consume: Callable[[Batch], None], batch: Batch, chooser: AutoBatch | None) -> None:
        """One batch through the consumer; timed while `--batch-size auto` is still choosing."""
        if chooser is None or chooser.chosen is not None:
            consume(batch)
            return
        t0 = chooser.clock()
        consume(batch)
        chooser.record(len(batch), chooser.clock() - t0)

    def _take(self, item: Item, future: Future) -> np.ndarray | None:
        """A worker's prepared image, or None for a file passed over (counted) or failed (counted and reported)."""
        try:
            return future.result()
        except NotImage as e:
            self.summary.not_images += 1
            log.debug("%s: not an image (%s)", item.path, e)
        except CaptionExists:
            self.summary.captions_kept += 1
        except BadImage as e:
            self.fail(item, str(e), reason_of(e))
        return None
