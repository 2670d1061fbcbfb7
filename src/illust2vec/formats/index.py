"""The index directory of `i2v index build`: `index.faiss`, `meta.parquet` and `index.json`, written and read here.

    index.faiss   faiss's own format (faiss.write_index / write_index_binary: no pickle)
    meta.parquet  id, path, tags (a JSON string) per row, in the index's row order
    index.json    format, format_version, kind, dim, count, metric, params (how it is built and searched),
                  model (where the vectors came from), center (binary kind: the per-dimension threshold)

Each file is written under a temporary name and renamed into place, index.json last: its presence says the other
two are whole. The directory may be a URL (`s3://bucket/index`, `gs://...`): the files are written locally and
uploaded, index.json last, after the old index.json (if any) was removed. The vector index itself (building,
searching) is search/index.py's; this module only stores it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..util import storage

FORMAT = "illust2vec-index"
FORMAT_VERSION = 1
FILES = ("index.faiss", "meta.parquet", "index.json")
META_COLUMNS = ("id", "path", "tags")
BINARY = "binary"  # the kind stored as a faiss binary index (Hamming distance); every other kind compares cosines


@dataclass
class StoredIndex:
    """What an index directory holds: the faiss index and, per row, an id, a path and predicted tags (JSON)."""

    kind: str
    dim: int
    faiss_index: Any
    ids: list[str]
    paths: list[str]
    tags: list[str]
    params: dict[str, Any] = field(default_factory=dict)  # the search stage's IndexParams, as a dict
    model: dict[str, Any] = field(default_factory=dict)  # source, kind, feature_dim, vocab_hash, weights
    center: np.ndarray | None = None  # binary kind: per-dimension threshold of the codes

    def info(self) -> dict[str, Any]:
        """The contents of index.json."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "count": len(self.ids),
            "metric": "hamming" if self.kind == BINARY else "cosine",
            "params": self.params,
            "model": self.model,
            "center": None if self.center is None else [float(c) for c in self.center],
        }


def import_faiss() -> Any:
    """faiss, imported when first needed (the CLI starts fast), without its loader's INFO lines on stderr."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    import faiss

    return faiss


def is_index(path: str | os.PathLike) -> bool:
    """Whether a path (or URL) is an index directory (it has index.json)."""
    if storage.is_remote(path):
        return storage.exists(storage.join(path, "index.json"))
    return (storage.local_path(path) / "index.json").is_file()


def write_index(path: str | os.PathLike, stored: StoredIndex) -> storage.Location:
    """Write the index directory (or URL); each file replaced atomically, index.json last.

    Raises:
        UserError: the path is a file, or a non-empty directory that is not an index (nothing is overwritten).
    """
    out = storage.location(path, "--out", write=True)
    if storage.is_local(out):
        return _write_files(out, stored)
    if storage.listing(out) and not is_index(out):
        raise UserError(f"{storage.display(out)}: a non-empty prefix that is not an index; choose another --out")
    storage.check_writable_root(out)
    storage.remove(storage.join(out, "index.json"))  # until the new one is up, this is not an index
    with storage.staged_dir(out, last=("index.json",)) as local:
        _write_files(local, stored)
    return out


def _write_files(out: Path, stored: StoredIndex) -> Path:
    """The three files into a local directory, each under a temporary name and renamed, index.json last."""
    faiss = import_faiss()
    import pyarrow as pa
    import pyarrow.parquet as pq

    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not is_index(out):
        raise UserError(f"{out}: a non-empty directory that is not an index; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    tmp = {name: out / f".{name}.tmp" for name in FILES}
    write = faiss.write_index_binary if stored.kind == BINARY else faiss.write_index
    write(stored.faiss_index, str(tmp["index.faiss"]))
    pq.write_table(pa.table({"id": stored.ids, "path": stored.paths, "tags": stored.tags}), tmp["meta.parquet"])
    tmp["index.json"].write_text(json.dumps(stored.info(), indent=1))
    for name in FILES:  # index.json last: its presence says the other two are whole
        os.replace(tmp[name], out / name)
    return out


def read_index(path: str | os.PathLike) -> StoredIndex:
    """Open an index directory written by `write_index`.

    Raises:
        UserError: not an index, an index of a newer format, or files that cannot be read or do not agree.
    """
    faiss = import_faiss()
    import pyarrow.parquet as pq

    root = Path(path)
    if not is_index(root):
        raise UserError(f"{root}: not an index (no index.json; build one with `i2v index build`)")
    info = _read_info(root)
    kind, dim = str(info["kind"]), int(info["dim"])
    try:
        reader = faiss.read_index_binary if kind == BINARY else faiss.read_index
        fx = reader(str(root / "index.faiss"))
        meta = pq.read_table(root / "meta.parquet", columns=list(META_COLUMNS))
    except (RuntimeError, OSError) as e:
        raise UserError(f"{root}: cannot read the index ({str(e).splitlines()[0]})") from None
    if fx.ntotal != meta.num_rows or fx.d != dim:
        raise UserError(f"{root}: index.faiss ({fx.ntotal} x {fx.d}) does not match its metadata")
    center = info.get("center")
    return StoredIndex(
        kind=kind,
        dim=dim,
        faiss_index=fx,
        ids=meta.column("id").to_pylist(),
        paths=meta.column("path").to_pylist(),
        tags=meta.column("tags").to_pylist(),
        params=dict(info.get("params") or {}),
        model=dict(info.get("model") or {}),
        center=None if center is None else np.asarray(center, np.float32),
    )


def _read_info(root: Path) -> dict[str, Any]:
    """index.json, checked: this format, a version this illust2vec reads, a kind and a dimension."""
    try:
        info = json.loads((root / "index.json").read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"format {info.get('format')!r}")
        if int(info["format_version"]) > FORMAT_VERSION:
            raise ValueError(f"format version {info['format_version']} is newer than this illust2vec's")
        info["kind"], info["dim"] = str(info["kind"]), int(info["dim"])
        if not isinstance(info.get("params", {}), dict):
            raise ValueError("params is not an object")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{root}/index.json: not an illust2vec index ({e})") from None
    return info
