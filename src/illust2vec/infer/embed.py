"""Feature vectors (`i2v embed`): one forward pass per image gives its L2-normalised feature vector and its tags,
written as rows of the vectors Parquet (`formats/vectors.py`: id, path, vector, tags, and the model's metadata, so
`i2v index build` refuses to mix vectors of different models).

Resumable: rows are written as they come, in parts under `OUT.parts/` (each part renamed into place when whole);
a rerun skips every id already in OUT or in a part, and the end of a run merges the parts into OUT. A job array
runs `--shard I/N` on each machine (the same paths everywhere; files are dealt out by a hash of their path relative
to the folder given, as `i2v tag` deals them) and `i2v index build` takes all the outputs together.
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
from ..util.shard import in_shard
from .engine import Batch, BatchSummary, Engine, Item, check_job, discover
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
    batch_size: int = 32
    part_size: int = 4096  # rows per part written while running: the most a crash can make us redo
    shard: tuple[int, int] = (0, 1)  # part I of N of the files, for job arrays ("I/N" is taken too)
    device: str = "auto"
    backend: str = "auto"
    workers: int | None = None  # decoding threads; None: one per core

    def __post_init__(self) -> None:
        check_job(self)
        object.__setattr__(self, "out", str(self.out))
        if self.ids not in ID_KINDS:
            raise UserError(f"--ids must be one of {', '.join(ID_KINDS)}, not {self.ids!r}")
        if not isinstance(self.part_size, int) or self.part_size < 1:
            raise UserError(f"EmbedConfig.part_size must be at least 1, not {self.part_size!r}")
        out = Path(self.out)
        if out.suffix != ".parquet":
            raise UserError(f"--out {out}: the output is a Parquet file; name it *.parquet")


def _check_out(out: Path) -> None:
    """Where the output goes: checked when the run starts (the folder may be made after the config)."""
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as vectors.parquet")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no such folder {out.parent}")


def item_id(item: Item, ids: str) -> str:
    return Path(item.key).stem if ids == "stem" else item.key


def _items(cfg: EmbedConfig, summary: BatchSummary) -> list[Item]:
    """This shard's files; two that would share an id are the user's mistake."""
    items = [it for it in discover(cfg.paths, cfg.recursive, summary) if in_shard(it.key, cfg.shard)]
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
    out = Path(cfg.out)
    _check_out(out)
    summary = BatchSummary("embedded")
    items = _items(cfg, summary)
    tagger = tagger or Tagger.load(cfg.model, backend=cfg.backend, device=cfg.device)
    if not tagger.feature_dim:
        raise UserError(f"{cfg.model}: this model gives no feature vector (a WD ONNX file gives tags only)")
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
            writer.add(item_id(item, cfg.ids), str(item.path.resolve()), f, tags_json(tagger.select(p)))
        summary.done += len(batch)

    Engine(summary, tagger.image_size, console, cfg.batch_size, cfg.workers).run(todo, consume, "embedding")
    t0 = time.perf_counter()
    summary.rows = writer.close()
    summary.seconds += time.perf_counter() - t0
    return summary
