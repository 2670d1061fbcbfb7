"""The vectors Parquet of `i2v embed`: its schema, its writer (parts, then one merged file) and its reader.

One row per image:

- `id` (string): stable across machines: the path relative to the folder argument it was found under (a file
  named on the command line: its name), or with `ids="stem"` the name without its suffix (a board's post id);
- `path` (string): the absolute path the image was read from;
- `vector` (fixed_size_list<float32>[D]): the pooled feature vector, unit L2 norm;
- `tags` (string): JSON `{head: {tag: score}}` of the predicted tags (the model's thresholds; rating: all classes).

The schema's metadata (`illust2vec` key) names the format, the model and the vector dimension, so `i2v index build`
refuses to mix vectors of different models.

A run writes rows in parts under `OUT.parts/` (each part written under a temporary name and renamed into place when
whole); `merge_parts` streams OUT and the parts into a new OUT and removes the parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import UserError

FORMAT = "illust2vec-vectors"
FORMAT_VERSION = 1
META_KEY = b"illust2vec"
SCORE_DIGITS = 4  # tags' scores in the JSON: enough to rank and threshold, a third of the bytes of full floats


# ---- the model the vectors came from


class _Labels(Protocol):
    names: Sequence[str]


class Model(Protocol):
    """What `model_meta` reads of a loaded model (the runtime `illust2vec.Tagger`)."""

    source: str
    kind: str
    feature_dim: int | None
    labels: _Labels


def model_meta(model: Model) -> dict[str, Any]:
    """What identifies the vectors' model: its source, kind, vector dimension, vocabulary hash and weights hash."""
    vocab_hash = None
    config = Path(model.source) / "config.json"
    if model.kind == "bundle" and config.is_file():
        vocab_hash = json.loads(config.read_text()).get("vocab_hash")
    if vocab_hash is None:  # a WD tagger: the hash of its tag names stands for its vocabulary
        vocab_hash = hashlib.sha256("\n".join(model.labels.names).encode()).hexdigest()
    return {
        "source": model.source,
        "kind": model.kind,
        "feature_dim": model.feature_dim,
        "vocab_hash": vocab_hash,
        "weights": weights_hash(Path(model.source)),
    }


def weights_hash(root: Path) -> str | None:
    """sha256 of a model directory's weights: the same vocabulary retrained (a new demo, another epoch) gives other
    vectors, and a resumed embedding or an index query must not mix them."""
    for name in ("model.safetensors", "model.onnx"):
        path = root / name
        if path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            return digest.hexdigest()
    return None


def file_metadata(model: dict[str, Any]) -> dict[str, Any]:
    """The `illust2vec` metadata of a vectors file written from `model` (see `model_meta`)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": model}


def same_model(a: dict, b: dict) -> bool:
    """Whether two files' metadata name the same model (dimension, vocabulary and weights)."""
    return _model_key(a) == _model_key(b)


def describe_model(meta: dict) -> str:
    m = meta.get("model", {})
    return f"dimension {m.get('feature_dim')}, vocabulary {str(m.get('vocab_hash'))[:12]}"


def _model_key(meta: dict) -> tuple:
    m = meta.get("model", {})
    return (m.get("feature_dim"), m.get("vocab_hash"), m.get("weights"))


# ---- schema


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


def tags_json(tags: dict[str, dict[str, float]]) -> str:
    """A row's `tags` column: head -> {tag: score}, scores rounded to SCORE_DIGITS."""
    return json.dumps({h: {t: round(s, SCORE_DIGITS) for t, s in v.items()} for h, v in tags.items()})


# ---- reading


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
    out = Vectors([], [], np.zeros((0, 0), np.float32), [], meta0)
    chunks = []
    seen: set[str] = set()
    for f in files:
        meta = file_meta(f)
        if not same_model(meta, meta0):
            raise UserError(
                f"{f}: vectors of another model than {files[0]} ({describe_model(meta)} vs {describe_model(meta0)})"
            )
        table = pq.read_table(f)
        fid = table.column("id").to_pylist()
        keep = [i for i, x in enumerate(fid) if x not in seen and not seen.add(x)]
        out.duplicates += len(fid) - len(keep)
        if len(keep) != len(fid):
            table = table.take(pa.array(keep, pa.int64()))
            fid = [fid[i] for i in keep]
        out.ids += fid
        out.paths += table.column("path").to_pylist()
        out.tags += table.column("tags").to_pylist()
        column = table.column("vector").combine_chunks()
        chunks.append(column.flatten().to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size))
    if chunks:
        out.vectors = np.concatenate(chunks).astype(np.float32, copy=False)
    return out


# ---- writing: parts while running, one file at the end


def parts_dir(out: Path) -> Path:
    """Where a run writing `out` keeps its parts."""
    return out.with_name(out.name + ".parts")


def written_files(out: Path) -> list[Path]:
    """`out` (when it exists) and its parts: every file a rerun resumes from."""
    return ([out] if out.is_file() else []) + sorted(parts_dir(out).glob("part-*.parquet"))


def done_ids(out: Path) -> set[str]:
    """The ids already written to `out` or its parts."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for f in written_files(out):
        file_meta(f)
        done.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
    return done


def check_same_model(out: Path, meta: dict) -> None:
    """A rerun must use the model of the rows already written: vectors of two models do not compare."""
    for f in written_files(out)[:2]:
        old = file_meta(f)
        if not same_model(old, meta):
            raise UserError(f"{f}: written with another model ({describe_model(old)}); choose another --out")


class PartWriter:
    """Rows into numbered Parquet parts of `size` rows under `parts_dir(out)`, each written under a temporary name
    and renamed; `close` writes the last part and merges everything into `out`."""

    def __init__(self, out: Path, meta: dict, size: int):
        self.out, self.meta, self.size = out, meta, size
        self.folder = parts_dir(out)
        self.folder.mkdir(exist_ok=True)
        numbers = [int(p.stem.split("-")[1]) for p in self.folder.glob("part-*.parquet")]
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

    def close(self) -> int:
        """Write the last part and merge the parts into `out`; returns the rows in `out`."""
        self.flush()
        return merge_parts(self.out, self.meta)


def merge_parts(out: Path, meta: dict) -> int:
    """OUT (if any) and the parts -> a new OUT, streamed in batches; then the parts go. Returns its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = parts_dir(out)
    files = sorted(parts.glob("part-*.parquet"))
    if not files and out.is_file():
        shutil.rmtree(parts, ignore_errors=True)
        return pq.ParquetFile(out).metadata.num_rows
    tmp = out.with_name(f".{out.name}.tmp")
    rows = 0
    schema = vectors_schema(int(meta["model"]["feature_dim"]), meta)
    with pq.ParquetWriter(tmp, schema) as w:
        for f in written_files(out):
            for batch in pq.ParquetFile(f).iter_batches(batch_size=65536):
                w.write_table(pa.Table.from_batches([batch]).cast(schema))
                rows += batch.num_rows
    os.replace(tmp, out)
    shutil.rmtree(parts, ignore_errors=True)
    return rows
