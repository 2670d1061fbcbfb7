"""The training data loader: a WebDataset pipeline over a built dataset's shards, feeding a torch DataLoader.

Stages over sample dicts, each testable alone: shards -> this reader's part -> tar samples -> (shuffle) -> decode the
image and the labels -> (augment) -> targets.

Shards are local files or URLs (`s3://`, `gs://`, `https://`): each is opened through `util/storage.open_read` and
streamed, never copied whole; a connection lost mid-stream is reopened where it was, and a shard that still ends
early is counted in the bad samples, as a local shard cut short is.
"""

from __future__ import annotations

import io
import itertools
import multiprocessing
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from ..errors import UserError
from ..util import storage
from ..util.storage import ReadAhead
from .dataset import SPLITS, Dataset, Sample
from .teacher import SOFT, soft_targets


@dataclass(frozen=True)
class LoaderConfig:
    """How batches are made; the augmentation is for training only."""

    batch_size: int = 64
    workers: int = 2
    shuffle_buffer: int = 2000  # samples mixed across shards before batching (training)
    seed: int = 0
    crop_scale: tuple[float, float] = (0.8, 1.0)  # light random crop, resized back to the image size
    jitter: float = 0.1  # brightness, contrast and saturation; never hue: colours are labels (aqua_hair vs blue_hair)
    flip: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_scale", tuple(self.crop_scale))
        if self.batch_size < 1:
            raise UserError(f"batch_size must be at least 1, not {self.batch_size}")
        if self.workers < 0:
            raise UserError(f"workers must be 0 (read in the main process) or more, not {self.workers}")
        if self.shuffle_buffer < 1:
            raise UserError(f"shuffle_buffer must be at least 1, not {self.shuffle_buffer}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise UserError(f"crop_scale must be two fractions 0 < low <= high <= 1, not {self.crop_scale}")
        if not 0 <= self.jitter < 1:
            raise UserError(f"jitter must be in [0, 1), not {self.jitter}")
        if not 0 <= self.flip <= 1:
            raise UserError(f"flip must be a probability in [0, 1], not {self.flip}")


_BUFFER = re.compile(r" <_io\.BytesIO object at 0x[0-9a-f]+>")  # in Pillow's messages, naming nothing


class BadSamples:
    """Counts the samples a loader could not read and skipped, across its worker processes (a shared counter), and
    keeps the first one's description. Its `handler` is webdataset's handler: given to the pipeline's stages (opening,
    tar reading, grouping, decoding), it counts the error and returns True, "go on"; the stage skips what failed (a
    member cut short ends its shard's reading, a corrupt image drops its sample). Whoever iterates the batches
    compares `count` with a limit: an exception raised in a loader worker would reach the user as a traceback."""

    def __init__(self) -> None:
        self._count = multiprocessing.Value("q", 0)
        self._first = multiprocessing.Array("c", 400)

    @property
    def count(self) -> int:
        return self._count.value

    @property
    def first(self) -> str:
        return self._first.value.decode(errors="replace")

    def handler(self, exn: Exception) -> bool:
        with self._count.get_lock():
            self._count.value += 1
            if self._count.value == 1:
                self._first.value = _describe(exn).encode()[: len(self._first) - 1]
        return True


def _describe(exn: Exception) -> str:
    """One line for a read error: webdataset appends the stream and the URL to the exception's arguments."""
    args = [str(a) for a in exn.args if a is not None and isinstance(a, str | int)]
    url = next((a for a in reversed(args) if a.endswith(".tar")), "")
    text = args[0] if args else type(exn).__name__
    return f"{url}: {text}" if url and url not in text else text


class BadSample(ValueError):
    """A sample that was read but cannot be used: its image does not decode, its labels are not JSON, a member is
    missing."""


def decode_image(data: bytes) -> torch.Tensor:
    """A shard's image bytes -> uint8 [3, S, S]."""
    # Pillow, not torchvision.io: the latter's decoders are deprecated from torchvision 0.29 on.
    array = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def make_targets(labels: Mapping[str, Sequence[int]], heads: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """One multi-hot float vector per head, and the rating as a class index (-1 when unknown)."""
    targets = {}
    for head, n in heads.items():
        positions = list(labels.get(head, []))
        if head == "rating":
            targets[head] = torch.tensor(positions[0] if positions else -1, dtype=torch.long)
        else:
            vec = torch.zeros(n, dtype=torch.float32)
            vec[positions] = 1.0
            targets[head] = vec
    return targets


def augmentation(size: int, cfg: LoaderConfig) -> v2.Transform:
    """Flip, a light random crop and scale, a small colour jitter: on uint8 CHW tensors."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(cfg.flip),
            v2.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=(0.9, 1.1), antialias=True),
            v2.ColorJitter(cfg.jitter, cfg.jitter, cfg.jitter),
        ]
    )


def _reader() -> tuple[int, int]:
    """This reader's index among all readers (DDP ranks x loader workers), and how many there are."""
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    workers = max(1, workers)
    return rank * workers + worker, world * workers


def _splitters(n_shards: int):
    """Pipeline stages that give each reader its own part of the split: whole shards when there are at least as many
    shards as readers (the usual case: no reader reads another's data), else every reader reads every shard and
    keeps every n-th sample, so that a small dataset of one shard still feeds 8 workers on 2 GPUs, not one."""

    def shards(src):
        index, readers = _reader()
        yield from itertools.islice(src, index, None, readers) if n_shards >= readers else src

    def samples(src):
        index, readers = _reader()
        yield from src if n_shards >= readers else itertools.islice(src, index, None, readers)

    return shards, samples


def open_shards(src: Iterable[dict], handler) -> Iterator[dict]:
    """webdataset's url_opener through `util/storage`: each {"url": ...} given an open `stream`, closed once its tar
    has been read. A local shard is a file; a remote one is read ahead in a background thread (`ReadAhead`), and the
    next remote shard is opened while this one is read, so the network's latency hides behind decoding. A shard
    that cannot be opened or read goes to the handler, which counts it and goes on."""
    ahead = opened = None
    try:
        for sample in itertools.chain(src, [None]):
            opened = None if sample is None else _open(sample, handler)
            if ahead is not None:
                yield ahead
                ahead["stream"].close()
            ahead, opened = opened, None
    finally:  # also when the reader stops early (a short epoch): no stream, and no thread, is left behind
        for left in (ahead, opened):
            if left is not None:
                left["stream"].close()


def _open(sample: dict, handler) -> dict | None:
    url = sample["url"]
    try:
        stream = storage.open_read(url) if storage.is_local(url) else ReadAhead(url)
    except Exception as exn:  # a local file that is missing: counted, and the next shard
        exn.args = (*exn.args, url)
        if handler(exn):
            return None
        raise
    return {**sample, "stream": _Named(stream, url)}


class _Named:
    """A shard's stream whose repr names the shard: webdataset puts the stream's repr in the errors of a tar cut
    short, and a remote stream's own repr would name nothing."""

    def __init__(self, stream, url: str):
        self._stream, self._url = stream, url

    def read(self, n: int = -1) -> bytes:
        return self._stream.read(n)

    def close(self) -> None:
        self._stream.close()

    def __repr__(self) -> str:
        return f"<{storage.display(self._url)}>"


def tar_samples(handler):
    """Stage: shard URLs -> samples ({"__key__", "__url__", ext: bytes}), every read error given to `handler`."""

    def stage(src: Iterable[dict]) -> Iterator[dict]:
        files = wds.tariterators.tar_file_expander(open_shards(src, handler), handler=handler)
        return wds.tariterators.group_by_keys(files, handler=handler)

    return stage


def make_pipeline(
    ds: Dataset, split: str, cfg: LoaderConfig, train: bool, epoch: int = 0, bad: BadSamples | None = None
) -> wds.DataPipeline:
    """Shards -> samples -> (image uint8 [3,S,S], targets). Each DDP rank and each worker reads other shards.

    Training shuffles the shard order (a new order each epoch, from the seed) and samples in a buffer; evaluation
    reads in order, so its results are the same every time. A sample that cannot be read (a member cut short, a
    corrupt image) is skipped and counted in `bad` (a new counter when None).
    """
    handler = (bad or BadSamples()).handler
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    urls = ds.shards(split)
    if not urls:
        raise UserError(f"{ds.root}: the {split} split is empty")
    if train:
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(urls)
    heads = {h: len(ix) for h, ix in ds.vocab.heads.items()}
    ext = ds.info.image_format
    augment = augmentation(ds.image_size, cfg) if train else None

    def to_example(sample: dict):
        try:
            image = decode_image(sample[ext])
            labels = Sample.from_json(sample["json"]).labels
            # A teacher cache's sample (i2v distill) also holds the teacher's probabilities: soft targets.
            soft = soft_targets(sample[SOFT], heads) if SOFT in sample else {}
        except Exception as e:  # a corrupt image or labels, a member missing: the handler counts and skips it
            where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}"
            why = (
                f"no .{e.args[0]} member (cut short?)"
                if isinstance(e, KeyError)
                else f"{type(e).__name__}: {_BUFFER.sub('', str(e))}"
            )
            raise BadSample(f"{where}: {why}") from e
        if augment is not None:
            image = augment(image)
        targets = make_targets(labels, heads)
        targets.update({k: torch.from_numpy(v) for k, v in soft.items()})
        return image, targets

    shards, samples = _splitters(len(urls))
    stages = [wds.SimpleShardList(urls), shards, tar_samples(handler), samples]
    if train:
        stages.append(wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 200), seed=cfg.seed + epoch))
    stages.append(wds.map(to_example, handler=handler))
    return wds.DataPipeline(*stages)


def make_loader(
    ds: Dataset, split: str, cfg: LoaderConfig, train: bool, epoch: int = 0, bad: BadSamples | None = None
) -> DataLoader:
    """A torch DataLoader of (images, targets) batches; pinned memory when a GPU is there. Samples that cannot be
    read are skipped and counted in `bad` (see `BadSamples`)."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # worker seeds: exact resume
    return DataLoader(
        make_pipeline(ds, split, cfg, train, epoch, bad),
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=generator,
        drop_last=False,
    )
