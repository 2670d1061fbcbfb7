"""`i2v tag --ray` and `i2v embed --ray`: the batch job as a Ray Data pipeline, on a cluster or a local one.

    list the inputs (the driver; tar shards are not opened here)
      -> tar shards into their members (CPU tasks: `engine.shard_items`)
      -> read and decode (CPU tasks: `engine.load`, the engine's one decoding; images travel as uint8)
      -> the model on a pool of actors, each loading it once (`--actors`, `--gpus-per-actor`, `--batch-size`)
      -> the driver writes parts under `--out`: `part-NNNNN.jsonl` (tag: the records of `--format jsonl`) or
         `part-NNNNN.parquet` (embed: the vectors format, which `i2v index build` reads as a folder).

Exactly once: a part is written whole (a local file renamed into place, an object in one PUT) and counts once it is
there; a rerun reads the finished parts and skips their inputs. A model actor that dies is restarted and its batch
run again (Ray's `max_restarts`, `max_task_retries`); Ray Data hands the driver each batch's output once, so nothing
is lost or doubled. A bad item is named on stderr and counted by the engine's REASONS, as without `--ray`.

`I2V_FAULT_ACTOR_EXIT=N:MARKER` (for tests) makes a model actor exit after N batches, once: the first actor to get
there creates the file MARKER and dies.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from ..errors import UserError
from ..formats.shards import Member, split_name
from ..formats.vectors import PARTS, PartWriter, check_same_model, file_metadata, ids_in, model_meta, tags_json
from ..util import cluster, storage
from ..util.images import BadImage
from ..util.shard import in_shard
from .embed import EmbedConfig, embed_items, key_id
from .engine import (
    AUTO,
    GPU_BATCH,
    BatchSummary,
    Item,
    NotImage,
    RayOptions,
    discover,
    full_path,
    image_extensions,
    is_shard,
    load,
    progress_bar,
    reason_of,
    shard_items,
    shown,
)
from .pipeline import TagConfig
from .tagger import Tagger
from .thresholds import Selection
from .writers import CaptionOptions, make_record

log = logging.getLogger(__name__)

FAULT_ENV = "I2V_FAULT_ACTOR_EXIT"
JSONL_PARTS = "part-*.jsonl"
DIGITS = 5  # part-NNNNN
MAX_BLOCKS = 20_000  # blocks the listed inputs are cut into
DECODE_MEMORY = 256 << 20  # bytes a decoding task needs beside its batch: the largest picture it decodes, and more


@dataclass(frozen=True)
class Job:
    """What the tasks and actors need to know (shipped to them: small and picklable)."""

    kind: str  # "tag" or "embed"
    model: str
    backend: str
    device: str
    size: int  # the model's input side
    batch_size: int
    shard: tuple[int, int]
    selection: Selection | None = None  # tag
    caption: CaptionOptions = field(default_factory=CaptionOptions)  # tag
    ids: str = "path"  # embed
    precision: str = "auto"

    def done_key(self, path: str, key: str) -> str:
        """What finished parts hold of an input: tag's record path, embed's id."""
        return path if self.kind == "tag" else key_id(key, self.ids)


# ---- the steps of the pipeline (run in Ray's workers)


def expand(row: dict, job: Job, done: frozenset[str]) -> list[dict]:
    """A listed input -> its rows: a file is itself; a tar shard its members (this part's, and not in finished
    parts: those are one row counting them), and one failing row for a shard cut short or unreadable, as
    `engine.shard_items` gives them."""
    if not row["shard"]:
        return [_row(row)]
    shard = Item(_loc(row["src"]), row["key"], row["named"])
    rows, skipped = [], 0
    for item in shard_items(shard):
        sub = "/" + item.key[len(shard.key) + 1 :] if item.member is not None else ""
        if sub and not in_shard(item.key, job.shard):
            continue
        if sub and job.done_key(row["path"] + sub, item.key) in done:
            skipped += 1
            continue
        m = item.member
        rows.append(
            _row(
                row,
                path=row["path"] + sub,
                full=row["full"] + sub,
                key=item.key,
                offset=m.offset if m else -1,
                size=m.size if m else -1,
                error=item.error[0] if item.error else "",
                reason=item.error[1] if item.error else "",
            )
        )
    return rows + ([_row(row, skipped=skipped)] if skipped else [])


def _row(row: dict, **changes: Any) -> dict:
    base = {k: row[k] for k in ("src", "path", "full", "key", "named")}
    return {**base, "offset": -1, "size": -1, "error": "", "reason": "", "skipped": 0, **changes}


def _loc(src: str) -> Path | str:
    return src if storage.is_remote(src) else Path(src)


def _item(batch: dict[str, np.ndarray], i: int) -> Item:
    """Row `i` of a batch as the engine's Item: a file, a shard's member (read by its offset), or a failing shard."""
    src, path, key = _loc(str(batch["src"][i])), str(batch["path"][i]), str(batch["key"][i])
    if batch["error"][i]:
        return Item(src, key, True, error=(str(batch["error"][i]), str(batch["reason"][i])))
    if int(batch["offset"][i]) >= 0:
        member = Member(src, *split_name(storage.name(path)), int(batch["offset"][i]), int(batch["size"][i]))
        return Item(path, key, False, member=member)
    return Item(src, key, bool(batch["named"][i]))


def decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, Any]:
    """Read and decode a batch of rows (a CPU task): the model's inputs as uint8 (exactly its float input, in a quarter
    of the bytes), and each row's status: ok, not_image (passed over) or failed (with the message and reason)."""
    n = len(batch["path"])
    xs = np.zeros((n, size, size, 3), np.uint8)
    status, message, reason = ["ok"] * n, [""] * n, [""] * n
    exts = image_extensions()
    for i in range(n):
        if batch["skipped"][i]:
            status[i] = "done"
            continue
        try:
            xs[i] = load(_item(batch, i), size, exts)
        except NotImage:
            status[i] = "not_image"
        except BadImage as e:
            status[i], message[i], reason[i] = "failed", str(e), reason_of(e)
    keep = {k: batch[k] for k in ("path", "full", "key", "skipped")}
    return {**keep, "x": xs, "status": np.array(status), "message": np.array(message), "reason": np.array(reason)}


class ModelActor:
    """One of the pool: loads the model once, then runs it on batches of decoded rows."""

    def __init__(self, job: Job):
        self.job = job
        self.tagger = Tagger.load(job.model, backend=job.backend, device=job.device, precision=job.precision)
        self.batches = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        _fault(self.batches)
        self.batches += 1
        ok = np.asarray(batch["status"]) == "ok"
        out = {k: batch[k] for k in ("path", "full", "key", "skipped", "status", "message", "reason")}
        probs, feats = (None, None)
        if ok.any():
            probs, feats = self.tagger.run(np.asarray(batch["x"])[ok].astype(np.float32))
        rows = np.flatnonzero(ok)
        if self.job.kind == "tag":
            records = [""] * len(ok)
            for j, i in enumerate(rows):
                tags = self.tagger.select(probs[j], self.job.selection)
                records[i] = json.dumps(make_record(str(batch["path"][i]), tags, self.job.caption), ensure_ascii=False)
            return {**out, "record": np.array(records, dtype=object)}
        dim = self.tagger.feature_dim
        vectors, tags = np.zeros((len(ok), dim), np.float32), [""] * len(ok)
        if len(rows):
            vectors[rows] = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
            for j, i in enumerate(rows):
                tags[i] = tags_json(self.tagger.select(probs[j]))
        ids = [key_id(str(k), self.job.ids) for k in batch["key"]]
        return {**out, "id": np.array(ids, dtype=object), "vector": vectors, "tags": np.array(tags, dtype=object)}


def _fault(batches: int) -> None:
    """The test hook: with I2V_FAULT_ACTOR_EXIT=N:MARKER, the first actor to have run N batches dies, once."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    after, marker = spec.split(":", 1)
    if batches == int(after) and not os.path.exists(marker):
        with open(marker, "x"):
            pass
        os._exit(1)


# ---- the driver


class JsonlParts:
    """tag's records into `part-NNNNN.jsonl` under `out`, `size` a part, each written whole; the record paths of the
    parts already there are `done`."""

    def __init__(self, out: Path | str, size: int):
        self.out, self.size = out, size
        storage.makedirs(out)
        parts = storage.listing(out, JSONL_PARTS)
        self.done = {json.loads(line)["path"] for p in parts for line in storage.read_text(p).splitlines() if line}
        self.next = 1 + max((int(storage.name(p)[5 : 5 + DIGITS]) for p in parts), default=-1)
        self.lines: list[str] = []

    def add(self, row: dict) -> None:
        self.lines.append(row["record"])
        if len(self.lines) >= self.size:
            self.flush()

    def flush(self) -> None:
        if self.lines:
            data = "".join(line + "\n" for line in self.lines).encode("utf-8")
            storage.write_bytes(storage.join(self.out, f"part-{self.next:0{DIGITS}d}.jsonl"), data)
            self.next += 1
            self.lines = []


class VectorParts:
    """embed's rows into `part-NNNNN.parquet` under `out` (the vectors format); the ids already there are `done`."""

    def __init__(self, out: Path | str, size: int, meta: dict):
        storage.makedirs(out)
        parts = storage.listing(out, PARTS)
        check_same_model(out, meta, files=parts)
        self.done = ids_in(parts)
        self.writer = PartWriter(out, meta, size, folder=out, digits=DIGITS)

    def add(self, row: dict) -> None:
        self.writer.add(row["id"], row["full"], row["vector"], row["tags"])

    def flush(self) -> None:
        self.writer.finish()


def tag_on_ray(cfg: TagConfig, console: Console) -> BatchSummary:
    """`i2v tag --ray`: records of every image under `cfg.paths` into jsonl parts under `cfg.out`."""
    out = _out(cfg.out)
    tagger = Tagger.load(cfg.model, backend=cfg.backend, device="cpu", precision=cfg.precision)
    summary = BatchSummary("tagged")
    found = discover(cfg.paths, cfg.recursive, summary, expand=False)
    items = [it for it in found if in_shard(it.key, cfg.shard) or is_shard(it)]  # members are dealt out in the tasks
    size, model = tagger.image_size, _model(cfg.model)
    batch = GPU_BATCH if cfg.batch_size == AUTO else cfg.batch_size  # the actors' devices are not known here
    job = Job("tag", model, cfg.backend, cfg.device, size, batch, cfg.shard, cfg.selection, cfg.caption)
    job = replace(job, precision=cfg.precision)
    return _run(cfg.ray, job, items, JsonlParts(out, cfg.ray.part_size), summary, console)


def embed_on_ray(cfg: EmbedConfig, console: Console) -> BatchSummary:
    """`i2v embed --ray`: vectors of every image under `cfg.paths` into Parquet parts under `cfg.out`."""
    out = _out(cfg.out)
    tagger = Tagger.load(cfg.model, backend=cfg.backend, device="cpu", precision=cfg.precision)
    if not tagger.feature_dim:
        raise UserError(f"{cfg.model}: this model gives no feature vector (a WD ONNX file gives tags only)")
    summary = BatchSummary("embedded")
    items = embed_items(cfg, summary, expand=False)
    size, model = tagger.image_size, _model(cfg.model)
    batch = GPU_BATCH if cfg.batch_size == AUTO else cfg.batch_size  # the actors' devices are not known here
    job = Job("embed", model, cfg.backend, cfg.device, size, batch, cfg.shard, ids=cfg.ids)
    job = replace(job, precision=cfg.precision)
    sink = VectorParts(out, cfg.ray.part_size, file_metadata(model_meta(tagger)))
    return _run(cfg.ray, job, items, sink, summary, console)


def _out(out: str | None) -> Path | str:
    loc = storage.location(out, "--out", write=True)
    if storage.is_local(loc) and loc.is_file():
        raise UserError(f"--out {loc}: is a file; --ray writes parts into a folder (or a URL prefix)")
    return loc


def _model(model: str) -> str:
    """The model as the workers find it: a local path made absolute (their working folder is not ours)."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def _run(
    opts: RayOptions,
    job: Job,
    items: list[Item],
    sink: JsonlParts | VectorParts,
    summary: BatchSummary,
    console: Console,
) -> BatchSummary:
    """Skip what finished parts hold, run the pipeline, write the parts; the summary as without --ray."""
    rows = []
    for it in items:
        if not is_shard(it) and job.done_key(shown(it.path), it.key) in sink.done:
            summary.already += 1
            continue
        src = str(it.path) if storage.is_remote(it.path) else str(Path(it.path).resolve())
        row = {"src": src, "path": shown(it.path), "full": full_path(it.path), "key": it.key, "named": it.named}
        rows.append({**row, "shard": is_shard(it)})
    with cluster.connect(opts.address) as info:
        t0 = time.perf_counter()  # the pipeline's time: the cluster's start is logged apart
        gpus = cluster.gpus_per_actor(opts.gpus_per_actor, info)
        actors = cluster.default_actors(opts.actors, info, gpus)
        log.info("ray: %d model actors, %g GPUs each, on %s", actors, gpus, info.address)
        total = None if any(r["shard"] for r in rows) else len(rows)
        with progress_bar(console, "tagging" if job.kind == "tag" else "embedding") as progress:
            task = progress.add_task("ray", total=total, rate=0.0)
            for row in _results(rows, job, frozenset(sink.done), actors, gpus):
                progress.advance(task)
                _take(row, sink, summary, console)
                progress.update(task, rate=summary.done / max(time.perf_counter() - t0, 1e-9))
        sink.flush()
        summary.seconds = time.perf_counter() - t0
    summary.files = summary.done + summary.n_failed + summary.not_images + summary.already
    return summary


def _results(rows: list[dict], job: Job, done: frozenset[str], actors: int, gpus: float) -> Iterator[dict]:
    """The pipeline's output rows, as they come."""
    if not rows:
        return
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name, level in (("ray.data", logging.WARNING), ("ray.data._internal.progress", logging.ERROR)):
        logging.getLogger(name).setLevel(level)
    env = {FAULT_ENV: os.environ[FAULT_ENV]} if os.environ.get(FAULT_ENV) else {}
    # What a decoding task holds: a batch of inputs (uint8) and the picture being decoded. Saying so also keeps Ray
    # Data from fusing the decoding into the model's actors (ops fuse only when their resources match): decoding
    # stays in CPU tasks beside the actors, as many as the cluster has CPUs to spare.
    memory = job.batch_size * job.size * job.size * 3 + DECODE_MEMORY
    # A block per input up to MAX_BLOCKS: each shard is opened by a task of its own. Its members are then cut into
    # blocks of a batch, so that one shard's images are decoded by many tasks at once, not one after another.
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), MAX_BLOCKS))
    ds = ds.flat_map(expand, fn_kwargs={"job": job, "done": done})
    ds = ds.repartition(target_num_rows_per_block=job.batch_size)
    ds = ds.map_batches(
        decode_batch, fn_kwargs={"size": job.size}, batch_size=job.batch_size, batch_format="numpy", memory=memory
    )
    ds = ds.map_batches(
        ModelActor,
        fn_constructor_kwargs={"job": job},
        batch_size=job.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=gpus,
        # Ray Data's actors default to max_restarts=-1 and max_task_retries=-1: an actor that dies is started again
        # and the batch it held is run again on it. The fault test (tests/infer/test_ray.py) holds Ray to that.
        runtime_env={"env_vars": env} if env else None,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        names = list(batch)
        for i in range(len(batch["path"])):
            yield {k: batch[k][i] for k in names}


def _take(row: dict, sink: JsonlParts | VectorParts, summary: BatchSummary, console: Console) -> None:
    """One output row: written to a part, counted as passed over, or named and counted as failed."""
    status = str(row["status"])
    if status == "done":
        summary.already += int(row["skipped"])
    elif status == "ok":
        sink.add(row)
        summary.done += 1
    elif status == "not_image":
        summary.not_images += 1
        log.debug("%s: not an image", row["path"])
    else:
        summary.failed[str(row["reason"])] += 1
        console.print(f"{row['path']}: {row['message']}", highlight=False, markup=False, soft_wrap=True)
