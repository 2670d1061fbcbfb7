"""Feature vectors (`i2v embed`): one forward pass per image gives its L2-normalised feature vector and its tags.

The output is one Parquet file with a row per image:

- `id` (string): stable across machines: the path relative to the folder argument it was found under (a file
  named on the command line: its name), or with `ids="stem"` the name without its suffix (a board's post id);
- `path` (string): the absolute path the image was read from;
- `vector` (fixed_size_list<float32>[D]): the pooled feature vector, unit L2 norm;
- `tags` (string): JSON `{head: {tag: score}}` of the predicted tags (the model's thresholds; rating: all classes).

The schema's metadata (`illust2vec` key) names the format, the model and the vector dimension, so `i2v index build`
refuses to mix vectors of different models.

Resumable: rows are written as they come, in parts under `OUT.parts/` (each part renamed into place when whole);
a rerun skips every id already in OUT or in a part, and the end of a run merges the parts into OUT. A job array
runs `--shard I/N` on each machine (the same paths everywhere; files are dealt out by a hash of their path relative
to the folder given, as `i2v tag` deals them) and `i2v index build` takes all the outputs together.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from ..errors import UserError
from ..formats.vectors import PartWriter, check_same_model, done_ids, file_metadata, model_meta, tags_json
from ..util.cores import cores
from ..util.images import BadImage
from .pipeline import Item, NotImage, _read_ahead, discover, image_extensions, in_shard, load, progress_bar
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
    shard: tuple[int, int] = (0, 1)  # part I of N of the files, for job arrays
    device: str = "auto"
    backend: str = "auto"
    workers: int | None = None  # decoding threads; None: one per core


@dataclass
class EmbedSummary:
    embedded: int = 0
    already: int = 0  # done by an earlier run (resume)
    failed: Counter = field(default_factory=Counter)  # reason -> count
    not_images: int = 0
    files: int = 0  # in this shard
    rows: int = 0  # in the output when finished
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return sum(self.failed.values())

    def line(self) -> str:
        rate = self.embedded / self.seconds if self.seconds > 0 else 0.0
        parts = [f"embedded {self.embedded} images in {self.seconds:.1f} s ({rate:.1f} images/s)"]
        if self.already:
            parts.append(f"{self.already} done before (resumed)")
        if self.failed:
            reasons = ", ".join(f"{n} {r}" for r, n in self.failed.most_common())
            parts.append(f"{self.n_failed} failed ({reasons})")
        if self.not_images:
            parts.append(f"{self.not_images} files not images")
        return "; ".join(parts) + f"; {self.rows} rows in the output"


# ---- embedding


def _check(cfg: EmbedConfig, out: Path) -> None:
    if cfg.ids not in ID_KINDS:
        raise UserError(f"--ids must be one of {', '.join(ID_KINDS)}, not {cfg.ids!r}")
    if cfg.batch_size < 1 or cfg.part_size < 1:
        raise UserError("--batch-size must be at least 1")
    if out.suffix != ".parquet":
        raise UserError(f"--out {out}: the output is a Parquet file; name it *.parquet")
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name such as vectors.parquet")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: no such folder {out.parent}")


def item_id(item: Item, ids: str) -> str:
    return Path(item.key).stem if ids == "stem" else item.key


def embed_files(cfg: EmbedConfig, console: Console | None = None, tagger: Tagger | None = None) -> EmbedSummary:
    """Embed every image under `cfg.paths` (this shard's part) into `cfg.out`; progress and reports on `console`.

    Returns the summary; `summary.n_failed` > 0 means some image could not be embedded (each is named on the console).
    """
    console = console or Console(stderr=True)
    out = Path(cfg.out)
    _check(cfg, out)
    summary = EmbedSummary()
    items = [it for it in discover(cfg.paths, cfg.recursive) if in_shard(it.key, cfg.shard)]
    by_id: dict[str, Item] = {}
    for it in items:
        first = by_id.setdefault(item_id(it, cfg.ids), it)
        if first is not it:
            raise UserError(
                f"{it.path} and {first.path} would both have the id {item_id(it, cfg.ids)!r}; "
                "give their common parent folder (ids are paths relative to the folder given)"
            )
    tagger = tagger or Tagger.load(cfg.model, backend=cfg.backend, device=cfg.device)
    if not tagger.feature_dim:
        raise UserError(f"{cfg.model}: this model gives no feature vector (a WD ONNX file gives tags only)")
    meta = file_metadata(model_meta(tagger))
    check_same_model(out, meta)
    done = done_ids(out)
    todo = [it for it in items if item_id(it, cfg.ids) not in done]
    summary.files, summary.already = len(items), len(items) - len(todo)
    writer = PartWriter(out, meta, cfg.part_size)
    workers = cfg.workers or cores()
    image_exts = image_extensions()
    batch: list[tuple[Item, np.ndarray]] = []

    def flush() -> None:
        if not batch:
            return
        probs, feats = tagger.run(np.stack([x for _, x in batch]))
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        for (item, _), p, f in zip(batch, probs, feats, strict=True):
            writer.add(item_id(item, cfg.ids), str(item.path.resolve()), f, tags_json(tagger.select(p)))
        summary.embedded += len(batch)
        batch.clear()

    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="i2v-embed")
    with pool, progress_bar(console, "embedding") as progress:
        task = progress.add_task("embed", total=len(todo), rate=0.0)
        work = lambda item: load(item, tagger.image_size, image_exts)  # noqa: E731
        for item, future in _read_ahead(todo, work, pool, ahead=2 * cfg.batch_size + workers):
            try:
                batch.append((item, future.result()))
            except NotImage:
                summary.not_images += 1
            except BadImage as e:
                summary.failed[e.reason] += 1
                progress.console.print(f"{item.path}: {e}", highlight=False, markup=False)
            if len(batch) >= cfg.batch_size:
                flush()
                elapsed = time.perf_counter() - t0
                progress.update(task, rate=summary.embedded / elapsed if elapsed else 0.0)
            progress.advance(task)
        flush()
    summary.rows = writer.close()
    summary.seconds = time.perf_counter() - t0
    return summary
