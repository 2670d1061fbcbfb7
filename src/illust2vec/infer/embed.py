"""Feature vectors (`i2v embed`): one forward pass per image gives its L2-normalised feature vector and its tags,
written as rows of the vectors Parquet (`formats/vectors.py`: id, path, vector, tags, and the model's metadata, so
`i2v index build` refuses to mix vectors of different models).

Resumable: rows are written as they come, in parts under `OUT.parts/` (each part renamed into place when whole);
a rerun skips every id already in OUT or in a part, and the end of a run merges the parts into OUT. A job array
runs `--shard I/N` on each machine (the same paths everywhere; files are dealt out by a hash of their path relative
to the folder given, as `i2v tag` deals them) and `i2v index build` takes all the outputs together.

Inputs and `--out` may be URLs (`s3://`, `gs://`): the parts and the merged file are then objects, each written
whole. With `ray` (`--ray`), the job runs on a Ray cluster (`distributed.py`) and `--out` is a folder or prefix of
parts `part-NNNNN.parquet`, which `i2v index build` reads as they are.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from ..errors import UserError
from ..formats.vectors import PartWriter, check_same_model, done_ids, file_metadata, model_meta, tags_json
from ..util import storage
from ..util.shard import in_shard
from .backends import describe
from .engine import (
    Batch,
    BatchSummary,
    Engine,
    Item,
    RayOptions,
    check_job,
    discover,
    full_path,
    is_shard,
    resolve_batch_size,
)
from .tagger import Tagger

log = logging.getLogger(__name__)

ID_KINDS = ("path", "stem")


@dataclass(frozen=True)
class EmbedConfig:
    """What `i2v embed` was asked to do."""

    paths: tuple[str, ...]
    model: str
    out: str
    recursive: bool = False
    ids: str = "path"  # path: relative path (default); stem: file name without suffix, e.g. a board's post id
    batch_size: int | str = "auto"  # a number, or auto (engine.resolve_batch_size: by device and input size)
    part_size: int = 4096  # rows per part written while running: the most a crash can make us redo
    shard: tuple[int, int] = (0, 1)  # part I of N of the files, for job arrays ("I/N" is taken too)
    device: str = "auto"
    backend: str = "auto"
    precision: str = "auto"  # auto (int8 on a CPU where model.int8.onnx exists), fp32 or int8
    workers: int | None = None  # decoding threads; None: one per core
    ray: RayOptions | None = None  # --ray: a Ray Data pipeline writing parts under `out`, a folder or prefix

    def __post_init__(self) -> None:
        check_job(self)
        object.__setattr__(self, "out", str(self.out))
        if self.ids not in ID_KINDS:
            raise UserError(f"--ids must be one of {', '.join(ID_KINDS)}, not {self.ids!r}")
        if not isinstance(self.part_size, int) or self.part_size < 1:
            raise UserError(f"EmbedConfig.part_size must be at least 1, not {self.part_size!r}")
        storage.location(self.out, "--out", write=True)
        parquet = self.out.endswith(".parquet")
        if self.ray is None and not parquet:
            raise UserError(f"--out {self.out}: the output is a Parquet file; name it *.parquet")
        if self.ray is not None and parquet:
            raise UserError(f"--out {self.out}: --ray writes parts into a folder or prefix; give one, not *.parquet")


def _check_out(out: Path | str) -> None:
    """Where the output goes: checked when the run starts (the folder may be made after the config)."""
    if storage.is_remote(out):
        storage.check_writable_root(out)
        return
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as vectors.parquet")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no such folder {out.parent}")


def item_id(item: Item, ids: str) -> str:
    return key_id(item.key, ids)


def key_id(key: str, ids: str) -> str:
    """A row's id from an item's key (its path relative to the argument it was found under)."""
    return Path(key).stem if ids == "stem" else key


def embed_items(cfg: EmbedConfig, summary: BatchSummary, expand: bool = True) -> list[Item]:
    """This shard's files (tar shards whole, without `expand`); two that would share an id are the user's mistake."""
    found = discover(cfg.paths, cfg.recursive, summary, expand)
    items = [it for it in found if in_shard(it.key, cfg.shard) or is_shard(it)]  # members are dealt out later
    by_id: dict[str, Item] = {}
    for it in items:
        first = by_id.setdefault(item_id(it, cfg.ids), it)
        if first is not it:
            raise UserError(
                f"{it.path} and {first.path} would both have the id {item_id(it, cfg.ids)!r}; "
                "give their common parent folder (ids are paths relative to the folder given)"
            )
    return items


def embed_files(cfg: EmbedConfig, console: Console | None = None, tagger: Tagger | None = None) -> BatchSummary:
    """Embed every image under `cfg.paths` (this shard's part) into `cfg.out`; progress and reports on `console`.

    Returns the summary; `summary.n_failed` > 0 means some image could not be embedded (each is named on the console).
    """
    console = console or Console(stderr=True)
    if cfg.ray is not None:
        from .distributed import embed_on_ray

        return embed_on_ray(cfg, console)
    out = storage.location(cfg.out, "--out", write=True)
    _check_out(out)
    summary = BatchSummary("embedded")
    items = embed_items(cfg, summary)
    tagger = tagger or Tagger.load(cfg.model, backend=cfg.backend, device=cfg.device, precision=cfg.precision)
    if not tagger.feature_dim:
        raise UserError(f"{cfg.model}: this model gives no feature vector (a WD ONNX file gives tags only)")
    summary.device = describe(tagger.backend)
    meta = file_metadata(model_meta(tagger))
    check_same_model(out, meta)
    done = done_ids(out)
    todo = [it for it in items if item_id(it, cfg.ids) not in done]
    summary.files, summary.already = len(items), len(items) - len(todo)
    writer = PartWriter(out, meta, cfg.part_size)

    def consume(batch: Batch) -> None:
        probs, feats = tagger.run(np.stack([x for _, x in batch]))
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        for (item, _), p, f in zip(batch, probs, feats, strict=True):
            writer.add(item_id(item, cfg.ids), full_path(item.path), f, tags_json(tagger.select(p)))
        summary.done += len(batch)

    batch_size = resolve_batch_size(cfg.batch_size, tagger)
    Engine(summary, tagger.image_size, console, batch_size, cfg.workers).run(todo, consume, "embedding")
    t0 = time.perf_counter()
    summary.rows = writer.close()
    summary.seconds += time.perf_counter() - t0
    return summary
