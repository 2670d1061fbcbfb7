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

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from ..errors import UserError
from ..util.cores import cores
from ..util.images import BadImage
from .pipeline import Item, NotImage, _read_ahead, discover, image_extensions, in_shard, load, progress_bar
from .tagger import Tagger

log = logging.getLogger(__name__)

FORMAT = "illust2vec-vectors"
FORMAT_VERSION = 1
META_KEY = b"illust2vec"
ID_KINDS = ("path", "stem")
SCORE_DIGITS = 4  # tags' scores in the JSON: enough to rank and threshold, a third of the bytes of full floats


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


# ---- the file format


def vectors_schema(dim: int, meta: dict[str, Any]) -> Any:
    import pyarrow as pa

    fields = [
        pa.field("id", pa.string()),
        pa.field("path", pa.string()),
        pa.field("vector", pa.list_(pa.float32(), dim)),
        pa.field("tags", pa.string()),
    ]
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta).encode()})


def vectors_table(ids: list[str], paths: list[str], vectors: np.ndarray, tags: list[str], meta: dict) -> Any:
    import pyarrow as pa

    v = np.ascontiguousarray(vectors, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
    return pa.Table.from_arrays(
        [pa.array(ids, pa.string()), pa.array(paths, pa.string()), column, pa.array(tags)],
        schema=vectors_schema(v.shape[1], meta),
    )


def file_meta(path: Path) -> dict[str, Any]:
    """The `illust2vec` metadata of a vectors file; UserError when it is not one."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path}: not a Parquet file ({str(e).splitlines()[0]})") from None
    raw = (schema.metadata or {}).get(META_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        meta = {}
    if meta.get("format") != FORMAT or "vector" not in schema.names:
        raise UserError(f"{path}: not a vectors file of `i2v embed`")
    return meta


@dataclass
class Vectors:
    """Rows read from one or more vectors files."""

    ids: list[str]
    paths: list[str]
    vectors: np.ndarray  # [N, D] float32
    tags: list[str]
    meta: dict[str, Any]
    duplicates: int = 0  # ids met again in a later file, left out


def vector_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files given, and the *.parquet files in folders given (e.g. a shard's unfinished `OUT.parts/`)."""
    files: list[Path] = []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            found = sorted(q for q in p.glob("*.parquet") if not q.name.startswith("."))
            if not found:
                raise UserError(f"{p}: no .parquet files in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{arg}: no such file or folder")
    return files


def read_vectors(inputs: Sequence[str | os.PathLike]) -> Vectors:
    """Every row of the vectors files (or folders of them), in order, each id once (the first).

    Raises:
        UserError: a file that is not a vectors file, or files from different models.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = vector_files(inputs)
    if not files:
        raise UserError("no vectors files given")
    meta0 = file_meta(files[0])
    ids: list[str] = []
    paths: list[str] = []
    tags: list[str] = []
    chunks = []
    seen: set[str] = set()
    duplicates = 0
    for f in files:
        meta = file_meta(f)
        if _model_key(meta) != _model_key(meta0):
            raise UserError(f"{f}: vectors of another model than {files[0]} ({_describe(meta)} vs {_describe(meta0)})")
        table = pq.read_table(f)
        fid = table.column("id").to_pylist()
        keep = [i for i, x in enumerate(fid) if x not in seen and not seen.add(x)]
        duplicates += len(fid) - len(keep)
        if len(keep) != len(fid):
            table = table.take(pa.array(keep, pa.int64()))
            fid = [fid[i] for i in keep]
        ids += fid
        paths += table.column("path").to_pylist()
        tags += table.column("tags").to_pylist()
        column = table.column("vector").combine_chunks()
        dim = column.type.list_size
        chunks.append(column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim))
    vectors = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros((0, 0), np.float32)
    return Vectors(ids, paths, vectors, tags, meta0, duplicates)


def _model_key(meta: dict) -> tuple:
    m = meta.get("model", {})
    return (m.get("feature_dim"), m.get("vocab_hash"), m.get("weights"))


def _describe(meta: dict) -> str:
    m = meta.get("model", {})
    return f"dimension {m.get('feature_dim')}, vocabulary {str(m.get('vocab_hash'))[:12]}"


def model_meta(tagger: Tagger) -> dict[str, Any]:
    """What identifies the vectors' model: its source, kind, vector dimension and vocabulary hash."""
    vocab_hash = None
    config = Path(tagger.source) / "config.json"
    if tagger.kind == "bundle" and config.is_file():
        vocab_hash = json.loads(config.read_text()).get("vocab_hash")
    if vocab_hash is None:  # a WD tagger: the hash of its tag names stands for its vocabulary
        import hashlib

        vocab_hash = hashlib.sha256("\n".join(tagger.labels.names).encode()).hexdigest()
    return {
        "source": tagger.source,
        "kind": tagger.kind,
        "feature_dim": tagger.feature_dim,
        "vocab_hash": vocab_hash,
        "weights": weights_hash(Path(tagger.source)),
    }


def weights_hash(root: Path) -> str | None:
    """sha256 of a model directory's weights: the same vocabulary retrained (a new demo, another epoch) gives other
    vectors, and a resumed embedding or an index query must not mix them."""
    import hashlib

    for name in ("model.safetensors", "model.onnx"):
        path = root / name
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            return digest.hexdigest()
    return None


# ---- embedding


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _done_ids(out: Path) -> set[str]:
    import pyarrow.parquet as pq

    done: set[str] = set()
    files = ([out] if out.is_file() else []) + sorted(parts_dir(out).glob("part-*.parquet"))
    for f in files:
        file_meta(f)
        done.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    return done


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
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model_meta(tagger)}
    _check_same_model(out, meta)
    done = _done_ids(out)
    todo = [it for it in items if item_id(it, cfg.ids) not in done]
    summary.files, summary.already = len(items), len(items) - len(todo)
    parts = parts_dir(out)
    parts.mkdir(exist_ok=True)
    writer = _PartWriter(parts, meta, cfg.part_size)
    workers = cfg.workers or cores()
    image_exts = image_extensions()
    batch: list[tuple[Item, np.ndarray]] = []

    def flush() -> None:
        if not batch:
            return
        probs, feats = tagger.run(np.stack([x for _, x in batch]))
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        for (item, _), p, f in zip(batch, probs, feats, strict=True):
            tags = {h: {t: round(s, SCORE_DIGITS) for t, s in v.items()} for h, v in tagger.select(p).items()}
            writer.add(item_id(item, cfg.ids), str(item.path.resolve()), f, json.dumps(tags))
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
    writer.close()
    summary.rows = merge_parts(out, meta)
    summary.seconds = time.perf_counter() - t0
    return summary


def _check_same_model(out: Path, meta: dict) -> None:
    """A rerun must use the model of the rows already written: vectors of two models do not compare."""
    for f in ([out] if out.is_file() else []) + sorted(parts_dir(out).glob("part-*.parquet"))[:1]:
        old = file_meta(f)
        if _model_key(old) != _model_key(meta):
            raise UserError(f"{f}: written with another model ({_describe(old)}); choose another --out")


class _PartWriter:
    """Rows into numbered Parquet parts of `size` rows, each written under a temporary name and renamed."""

    def __init__(self, folder: Path, meta: dict, size: int):
        self.folder, self.meta, self.size = folder, meta, size
        numbers = [int(p.stem.split("-")[1]) for p in folder.glob("part-*.parquet")]
        self.next = max(numbers, default=-1) + 1
        self.rows: list[tuple[str, str, np.ndarray, str]] = []

    def add(self, id_: str, path: str, vector: np.ndarray, tags: str) -> None:
        self.rows.append((id_, path, vector, tags))
        if len(self.rows) >= self.size:
            self.flush()

    def flush(self) -> None:
        import pyarrow.parquet as pq

        if not self.rows:
            return
        ids, paths, vectors, tags = zip(*self.rows, strict=True)
        table = vectors_table(list(ids), list(paths), np.stack(vectors), list(tags), self.meta)
        final = self.folder / f"part-{self.next:06d}.parquet"
        tmp = self.folder / f".{final.name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        self.next += 1
        self.rows.clear()

    def close(self) -> None:
        self.flush()


def merge_parts(out: Path, meta: dict) -> int:
    """OUT (if any) and the parts -> a new OUT, streamed in batches; then the parts go. Returns its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = parts_dir(out)
    files = sorted(parts.glob("part-*.parquet"))
    if not files and out.is_file():
        shutil.rmtree(parts, ignore_errors=True)
        return pq.ParquetFile(out).metadata.num_rows
    sources = ([out] if out.is_file() else []) + files
    dim = int(meta["model"]["feature_dim"])
    tmp = out.with_name(f".{out.name}.tmp")
    rows = 0
    schema = vectors_schema(dim, meta)
    with pq.ParquetWriter(tmp, schema) as w:
        for f in sources:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65536):
                w.write_table(pa.Table.from_batches([batch]).cast(schema))
                rows += batch.num_rows
    os.replace(tmp, out)
    shutil.rmtree(parts, ignore_errors=True)
    return rows
