"""The training data loader: a WebDataset pipeline over `i2v build`'s shards, feeding a torch DataLoader."""

from __future__ import annotations

import io
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from ..errors import UserError
from .build import FORMAT_VERSION, SPLITS
from .vocab import Vocab, read_vocab


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


@dataclass(frozen=True)
class Dataset:
    """A built dataset directory: its dataset.json, vocabulary and shards per split."""

    root: Path
    info: dict
    vocab: Vocab

    @property
    def image_size(self) -> int:
        return self.info["image_size"]

    def shards(self, split: str) -> list[str]:
        return [str(self.root / name) for name in self.info["splits"][split]["shards"]]

    def samples(self, split: str) -> int:
        return self.info["splits"][split]["samples"]


def open_dataset(root: Path) -> Dataset:
    """Read dataset.json and the vocabulary beside it, checking that they belong together."""
    path = Path(root) / "dataset.json"
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{root}: no dataset.json; is it a directory that `i2v build` wrote?") from None
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if info.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format version {info.get('format_version')}, this illust2vec reads {FORMAT_VERSION}")
    vocab = read_vocab(Path(root) / info["vocab"])
    if vocab.hash != info["vocab_hash"]:
        raise UserError(f"{root}: selected_tags.csv does not match the vocabulary the shards were built with")
    return Dataset(Path(root), info, vocab)


def _decode(sample: dict, ext: str) -> tuple[torch.Tensor, dict]:
    # Pillow, not torchvision.io: the latter's decoders are deprecated from torchvision 0.29 on.
    array = np.asarray(Image.open(io.BytesIO(sample[ext])).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1), json.loads(sample["json"])


def make_targets(meta: dict, heads: dict[str, int]) -> dict[str, torch.Tensor]:
    """One multi-hot float vector per head, and the rating as a class index (-1 when unknown)."""
    targets = {}
    for head, n in heads.items():
        positions = meta["labels"].get(head, [])
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


def make_pipeline(ds: Dataset, split: str, cfg: LoaderConfig, train: bool, epoch: int = 0) -> wds.DataPipeline:
    """Shards -> samples -> (image uint8 [3,S,S], targets). Each DDP rank and each worker reads other shards.

    Training shuffles the shard order (a new order each epoch, from the seed) and samples in a buffer; evaluation
    reads in order, so its results are the same every time.
    """
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    urls = ds.shards(split)
    if not urls:
        raise UserError(f"{ds.root}: the {split} split is empty")
    if train:
        random.Random(cfg.seed * 1_000_003 + epoch).shuffle(urls)
    heads = {h: len(ix) for h, ix in ds.vocab.heads.items()}
    ext = ds.info["image_format"]
    augment = augmentation(ds.image_size, cfg) if train else None

    def to_example(sample: dict):
        image, meta = _decode(sample, ext)
        if augment is not None:
            image = augment(image)
        return image, make_targets(meta, heads)

    shards, samples = _splitters(len(urls))
    stages = [wds.SimpleShardList(urls), shards, wds.tarfile_to_samples(), samples]
    if train:
        stages.append(wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 200), seed=cfg.seed + epoch))
    stages.append(wds.map(to_example))
    return wds.DataPipeline(*stages)


def make_loader(ds: Dataset, split: str, cfg: LoaderConfig, train: bool, epoch: int = 0) -> DataLoader:
    """A torch DataLoader of (images, targets) batches; pinned memory when a GPU is there."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)  # worker seeds: exact resume
    return DataLoader(
        make_pipeline(ds, split, cfg, train, epoch),
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=generator,
        drop_last=False,
    )
