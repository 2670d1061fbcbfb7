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
whole); `merge_parts` streams OUT and the parts into a new OUT and removes the parts. `i2v embed --ray` writes its
parts `part-NNNNN.parquet` straight under its `--out` folder or prefix and merges nothing: `read_vectors` reads such
a folder as it reads a file.

Every file here may be a URL (`s3://`, `gs://`; `util.storage`): parts and the merged file are written whole (one
PUT, or an upload of a finished local file), and are read in ranges (a Parquet footer, then its columns).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import UserError
from ..util import storage

Loc = Path | str  # a local path, or a URL

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


@contextlib.contextmanager
def _source(path: Loc) -> Iterator[Any]:
    """What pyarrow reads: a local path as it is, a URL as a file read in ranges through `util.storage`."""
    if storage.is_local(path):
        yield storage.local_path(path)
        return
    with storage.open_read(path) as f, storage.errors(path, "cannot read"):
        yield f


def file_meta(path: Loc) -> dict[str, Any]:
    """The `illust2vec` metadata of a vectors file; UserError when it is not one."""
    import pyarrow.parquet as pq

    try:
        with _source(path) as src:
            schema = pq.read_schema(src)
    except UserError:
        raise
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{storage.display(path)}: not a Parquet file ({str(e).splitlines()[0]})") from None
    raw = (schema.metadata or {}).get(META_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        meta = {}
    if meta.get("format") != FORMAT or "vector" not in schema.names:
        raise UserError(f"{storage.display(path)}: not a vectors file of `i2v embed`")
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


def vector_files(inputs: Sequence[str | os.PathLike]) -> list[Loc]:
    """Files given, and the *.parquet files in folders (or URL prefixes) given (e.g. a shard's unfinished
    `OUT.parts/`, or the parts of `i2v embed --ray`)."""
    files: list[Loc] = []
    for arg in inputs:
        p = storage.location(arg, "vectors")
        if storage.scheme(p) in storage.READ_ONLY:  # an http(s) URL is one file (such servers cannot be listed)
            files.append(p)
        elif storage.isdir(p):
            found = [q for q in storage.listing(p, "*.parquet") if not storage.name(q).startswith(".")]
            if not found:
                raise UserError(f"{storage.display(p)}: no .parquet files in this folder")
            files += found
        elif storage.exists(p):
            files.append(p)
        else:
            raise UserError(f"{storage.display(arg)}: no such file or folder")
    return files


def read_vectors(inputs: Sequence[str | os.PathLike]) -> Vectors:
    """Every row of the vectors files (or folders of them; local or URLs), in order, each id once (the first).

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
                f"{storage.display(f)}: vectors of another model than {storage.display(files[0])} "
                f"({describe_model(meta)} vs {describe_model(meta0)})"
            )
        with _source(f) as src:
            table = pq.read_table(src)
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


PARTS = "part-*.parquet"  # the parts in a folder or prefix


def parts_dir(out: Loc) -> Loc:
    """Where a run writing `out` keeps its parts."""
    return Path(out).with_name(Path(out).name + ".parts") if storage.is_local(out) else f"{out}.parts"


def written_files(out: Loc) -> list[Loc]:
    """`out` (when it exists) and its parts: every file a rerun resumes from."""
    return ([out] if storage.exists(out) else []) + storage.listing(parts_dir(out), PARTS)


def done_ids(out: Loc) -> set[str]:
    """The ids already written to `out` or its parts."""
    return ids_in(written_files(out))


def ids_in(files: Sequence[Loc]) -> set[str]:
    """The ids of these vectors files (each checked to be one)."""
    import pyarrow.parquet as pq

    done: set[str] = set()
    for f in files:
        file_meta(f)
        with _source(f) as src:
            done.update(pq.read_table(src, columns=["id"]).column("id").to_pylist())
    return done


def check_same_model(out: Loc, meta: dict, files: Sequence[Loc] | None = None) -> None:
    """A rerun must use the model of the rows already written (`out` and its parts, or `files`): vectors of two
    models do not compare."""
    for f in list(written_files(out) if files is None else files)[:2]:
        old = file_meta(f)
        if not same_model(old, meta):
            raise UserError(
                f"{storage.display(f)}: written with another model ({describe_model(old)}); choose another --out"
            )


def table_bytes(table: Any) -> bytes:
    """A table as the bytes of a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


class PartWriter:
    """Rows into numbered Parquet parts of `size` rows under `folder` (default `parts_dir(out)`), each written whole
    (a local file under a temporary name, then renamed; an object in one PUT); `close` writes the last part and
    merges everything into `out`, `finish` writes the last part only (`--ray`: the parts are the output)."""

    def __init__(self, out: Loc, meta: dict, size: int, folder: Loc | None = None, digits: int = 6):
        self.out, self.meta, self.size, self.digits = out, meta, size, digits
        self.folder = parts_dir(out) if folder is None else folder
        storage.makedirs(self.folder)
        numbers = [int(storage.name(p).split("-")[1].split(".")[0]) for p in storage.listing(self.folder, PARTS)]
        self.next = max(numbers, default=-1) + 1
        self.rows: list[tuple[str, str, np.ndarray, str]] = []

    def add(self, id_: str, path: str, vector: np.ndarray, tags: str) -> None:
        self.rows.append((id_, path, vector, tags))
        if len(self.rows) >= self.size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        ids, paths, vectors, tags = zip(*self.rows, strict=True)
        table = vectors_table(list(ids), list(paths), np.stack(vectors), list(tags), self.meta)
        storage.write_bytes(storage.join(self.folder, f"part-{self.next:0{self.digits}d}.parquet"), table_bytes(table))
        self.next += 1
        self.rows.clear()

    def finish(self) -> None:
        self.flush()

    def close(self) -> int:
        """Write the last part and merge the parts into `out`; returns the rows in `out`."""
        self.flush()
        return merge_parts(self.out, self.meta)


def merge_parts(out: Loc, meta: dict) -> int:
    """OUT (if any) and the parts -> a new OUT, streamed in batches; then the parts go. Returns its rows.

    A local OUT is written beside it under a temporary name and renamed; a remote one is written to a local temporary
    file and uploaded (an object appears whole), then its parts are removed."""
    import pyarrow.parquet as pq

    files = written_files(out)
    parts = files[1:] if files and files[0] == out else files
    if not parts and files:
        _remove_parts(out, parts)
        with _source(out) as src:
            return pq.ParquetFile(src).metadata.num_rows
    if storage.is_local(out):
        local = storage.local_path(out)
        tmp = local.with_name(f".{local.name}.tmp")
        rows = _merge_into(tmp, files, meta)
        os.replace(tmp, local)
    else:
        with tempfile.TemporaryDirectory(prefix="i2v-merge-") as folder:
            tmp = Path(folder) / storage.name(out)
            rows = _merge_into(tmp, files, meta)
            storage.upload(tmp, out)
    _remove_parts(out, parts)
    return rows


def _merge_into(tmp: Path, files: Sequence[Loc], meta: dict) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 0
    schema = vectors_schema(int(meta["model"]["feature_dim"]), meta)
    with pq.ParquetWriter(tmp, schema) as w:
        for f in files:
            with _source(f) as src:
                for batch in pq.ParquetFile(src).iter_batches(batch_size=65536):
                    w.write_table(pa.Table.from_batches([batch]).cast(schema))
                    rows += batch.num_rows
    return rows


def _remove_parts(out: Loc, parts: Sequence[Loc]) -> None:
    if storage.is_local(out):
        shutil.rmtree(parts_dir(out), ignore_errors=True)
        return
    for p in parts:
        storage.remove(p)
