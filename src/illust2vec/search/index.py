"""VectorIndex: feature vectors with their ids, paths and predicted tags, searched exactly or approximately (faiss).

    from illust2vec.search import VectorIndex
    index = VectorIndex(512, kind="flat")            # or hnsw, ivf, binary; VectorIndex.build picks by size (auto)
    index.add(vectors, ids, paths=paths, tags=tags)  # vectors [N, D] float32; tags: JSON strings, see embed.py
    index.search(queries, k=10)                      # per query [(id, score), ...], cosine, highest first
    scores, rows = index.search_rows(queries, k=10)  # the same as arrays of row numbers (-1 where fewer)
    index.save("idx/"); VectorIndex.load("idx/")

Float kinds compare L2-normalised vectors by inner product, i.e. cosine similarity: `flat` is exact, `hnsw` a graph
and `ivf` an inverted file of k-means cells (approximate, for millions). `binary` keeps one bit per dimension (set
where the value is above the collection's median, like the original Illustration2Vec's extract_binary_feature) and
searches by Hamming distance; its score is the fraction of bits that agree.

On disk an index is a directory (index.faiss, meta.parquet, index.json), written and read by formats/index.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..formats.index import StoredIndex, import_faiss, read_index, write_index

KINDS = ("auto", "flat", "hnsw", "ivf", "binary")
EXACT_UP_TO = 100_000  # `auto`: exact search up to this many vectors (at 512-d, tens of ms a query on a CPU)


@dataclass(frozen=True)
class IndexParams:
    """How an index is built and searched. None means: chosen from the collection's size when it is built."""

    kind: str = "auto"
    nlist: int | None = None  # ivf: k-means cells; default about 4 sqrt(N)
    nprobe: int = 16  # ivf: cells visited per query (recall against speed; bench/search.py measures both)
    hnsw_m: int = 32  # hnsw: links per node
    ef_construction: int = 80  # hnsw: candidates kept while building
    ef_search: int = 128  # hnsw: candidates kept while searching (recall against speed)
    train_size: int = 100_000  # ivf: vectors that train k-means (at least 40 per cell, as faiss asks)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise UserError(f"--kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        counts = {
            "--nlist": self.nlist,
            "--nprobe": self.nprobe,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "--ef-search": self.ef_search,
            "train_size": self.train_size,
        }
        for name, value in counts.items():
            if value is None and name == "--nlist":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name} must be a whole number of at least 1, not {value!r}")

    def resolved(self, n: int) -> IndexParams:
        """`auto` made concrete for a collection of n vectors: exact up to EXACT_UP_TO, an inverted file above."""
        kind = self.kind if self.kind != "auto" else ("flat" if n <= EXACT_UP_TO else "ivf")
        nlist = self.nlist
        if kind == "ivf" and nlist is None:
            nlist = max(1, min(int(4 * math.sqrt(max(n, 1))), n // 39 or 1))
        return replace(self, kind=kind, nlist=nlist)


@dataclass
class VectorIndex:
    """Vectors searchable by similarity, with an id, a path and predicted tags (a JSON string) per row.

    Rows are numbered in the order they were added; `ids[row]`, `paths[row]`, `tags[row]` describe row `row`.
    """

    dim: int
    kind: str = "flat"
    params: IndexParams = field(default_factory=IndexParams)
    model: dict[str, Any] = field(default_factory=dict)  # where the vectors came from (source, vocabulary hash)
    center: np.ndarray | None = None  # binary: per-dimension threshold, fixed by the first add
    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    faiss_index: Any = None
    _rows_by_id: dict[str, int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.kind == "auto":
            raise UserError(f"index kind must be one of flat, hnsw, ivf, binary, not {self.kind!r}")
        self.params = replace(self.params, kind=self.kind)
        if self.faiss_index is None:
            self.faiss_index = _new_faiss(self.dim, self.params)

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: list[str],
        paths: list[str] | None = None,
        tags: list[str] | None = None,
        params: IndexParams = IndexParams(),
        model: dict[str, Any] | None = None,
    ) -> VectorIndex:
        """A whole collection at once; `params.kind="auto"` chooses by its size (see IndexParams.resolved)."""
        p = params.resolved(len(vectors))
        index = cls(int(np.shape(vectors)[1]), p.kind, p, dict(model or {}))
        index.add(vectors, ids, paths, tags)
        return index

    def __len__(self) -> int:
        return len(self.ids)

    # ---- adding

    def add(
        self, vectors: np.ndarray, ids: list[str], paths: list[str] | None = None, tags: list[str] | None = None
    ) -> None:
        """Append rows. Vectors are L2-normalised here (cosine similarity); an untrained ivf index trains its
        cells on the first vectors it gets, and a binary one takes its centre (per-dimension medians) from them."""
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise UserError(f"vectors of shape {x.shape} do not fit an index of dimension {self.dim}")
        n = len(x)
        if len(ids) != n or (paths is not None and len(paths) != n) or (tags is not None and len(tags) != n):
            raise ValueError("ids, paths and tags need one entry per vector")
        known = self.rows_by_id()
        clash = next((i for i in ids if i in known), None)
        if clash is not None or len(set(ids)) != n:
            raise UserError(f"duplicate id {clash or _first_duplicate(ids)!r}: ids must be unique in an index")
        if n == 0:
            return
        x = _normalise(x)
        if self.kind == "binary":
            if self.center is None:
                self.center = np.median(x, axis=0).astype(np.float32)
            self.faiss_index.add(self.encode(x))
        else:
            if not self.faiss_index.is_trained:
                self._train(x)
            self.faiss_index.add(x)
        self.ids.extend(ids)
        self.paths.extend(paths if paths is not None else [""] * n)
        self.tags.extend(tags if tags is not None else ["{}"] * n)
        self._rows_by_id = None

    def _train(self, x: np.ndarray) -> None:
        nlist = self.faiss_index.nlist
        if len(x) < nlist:
            raise UserError(f"an ivf index with {nlist} cells needs at least {nlist} vectors to train, got {len(x)}")
        sample = x
        size = max(self.params.train_size, 40 * nlist)  # faiss asks for 39 vectors per cell at least
        if len(x) > size:
            pick = np.random.default_rng(0).choice(len(x), size, replace=False)
            sample = x[np.sort(pick)]
        self.faiss_index.train(sample)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Binary kind: normalised vectors -> packed bits [N, ceil(D/8)] uint8, set above the centre."""
        return np.packbits(x > self.center[None], axis=1)

    # ---- searching

    def search(
        self, queries: np.ndarray, k: int = 10, allow: np.ndarray | None = None
    ) -> list[list[tuple[str, float]]]:
        """The k most similar images of each query: per query a list of (id, score), highest score first (fewer
        than k when fewer rows qualify). Arguments as for `search_rows`."""
        scores, rows = self.search_rows(queries, k, allow)
        return [
            [(self.ids[r], float(s)) for r, s in zip(row, score, strict=True) if r >= 0]
            for row, score in zip(rows, scores, strict=True)
        ]

    def search_rows(
        self, queries: np.ndarray, k: int = 10, allow: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k most similar rows of each query, highest score first.

        Args:
            queries: [Q, D] float vectors (normalised here), or for a binary index [Q, ceil(D/8)] packed codes.
            k: results per query.
            allow: optional bool mask [len(self)]: only these rows may be returned (a tag filter).

        Returns:
            (scores [Q, k] float32, rows [Q, k] int64); where fewer than k rows qualify, rows are -1 and scores -inf.
        """
        q = self._as_queries(queries)
        k = max(1, min(int(k), len(self))) if len(self) else 1
        if len(self) == 0 or len(q) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        search_params = self._search_params(allow)
        if self.kind == "binary":
            dist, rows = self.faiss_index.search(q, k, params=search_params)
            scores = np.where(rows >= 0, 1.0 - dist / self.dim, -np.inf).astype(np.float32)
        else:
            scores, rows = self.faiss_index.search(q, k, params=search_params)
            scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        return scores, rows.astype(np.int64)

    def _as_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None]
        if self.kind == "binary" and q.dtype == np.uint8 and q.shape[1] == (self.dim + 7) // 8:
            return np.ascontiguousarray(q)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise UserError(f"query vectors of shape {q.shape} do not fit an index of dimension {self.dim}")
        q = _normalise(np.ascontiguousarray(q, dtype=np.float32))
        return self.encode(q) if self.kind == "binary" else q

    def _search_params(self, allow: np.ndarray | None) -> Any:
        faiss = import_faiss()

        sel = None
        if allow is not None:
            mask = np.asarray(allow, dtype=bool)
            if mask.shape != (len(self),):
                raise ValueError(f"allow must be a bool mask of {len(self)} rows, not {mask.shape}")
            # A bitmap selector costs one bit per row, and faiss skips disallowed rows inside its scan, so a
            # filtered search still returns k results whenever k rows qualify (exact kinds; hnsw and ivf
            # return those they reach).
            bits = np.packbits(mask, bitorder="little")
            sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
            sel.bits_ref = bits  # keep the buffer alive as long as the selector
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.params.nprobe)
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=self.params.ef_search)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def scores(self, query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact similarity of one query (as `search` takes it) to the given rows, in `search`'s units."""
        q = self._as_queries(query)[0]
        stored = self.vectors(rows)
        if self.kind == "binary":
            differ = np.unpackbits(np.bitwise_xor(stored, q[None]), axis=1).sum(axis=1)
            return (1.0 - differ / self.dim).astype(np.float32)
        return (stored @ q).astype(np.float32)

    def vector(self, id: str) -> np.ndarray:
        """What is stored for one id, in a form `search` accepts: the unit vector, or the packed code (binary)."""
        row = self.rows_by_id().get(id)
        if row is None:
            raise KeyError(id)
        return self.vectors(np.array([row]))[0]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored vectors (or packed codes) of several rows."""
        if self.kind == "ivf" and self.faiss_index.direct_map.type == 0:  # NoMap: rows not yet addressable
            self.faiss_index.make_direct_map()
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and rows.max() - rows.min() + 1 == len(rows) and np.all(np.diff(rows) == 1):
            return self.faiss_index.reconstruct_n(int(rows[0]), len(rows))
        return np.stack([self.faiss_index.reconstruct(int(r)) for r in rows])

    def items(self) -> list[tuple[str, str]]:
        """(id, path) of every row, in row order."""
        return list(zip(self.ids, self.paths, strict=True))

    def rows_by_id(self) -> dict[str, int]:
        """id -> row."""
        if self._rows_by_id is None:
            self._rows_by_id = {i: r for r, i in enumerate(self.ids)}
        return self._rows_by_id

    # ---- files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index directory (formats/index.py); each file replaced atomically."""
        stored = StoredIndex(
            kind=self.kind,
            dim=self.dim,
            faiss_index=self.faiss_index,
            ids=self.ids,
            paths=self.paths,
            tags=self.tags,
            params=asdict(self.params),
            model=self.model,
            center=self.center,
        )
        return write_index(path, stored)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VectorIndex:
        """Open an index directory written by `save` (or `i2v index build`)."""
        stored = read_index(path)
        try:
            return cls(
                dim=stored.dim,
                kind=stored.kind,
                params=IndexParams(**stored.params),
                model=stored.model,
                center=stored.center,
                ids=stored.ids,
                paths=stored.paths,
                tags=stored.tags,
                faiss_index=stored.faiss_index,
            )
        except (TypeError, UserError) as e:  # params of another version, or out of range
            raise UserError(f"{Path(path)}/index.json: not an illust2vec index ({e})") from None


def _new_faiss(dim: int, p: IndexParams) -> Any:
    faiss = import_faiss()

    if p.kind == "flat":
        return faiss.IndexFlatIP(dim)
    if p.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, p.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p.ef_construction
        index.hnsw.efSearch = p.ef_search
        return index
    if p.kind == "ivf":
        nlist = p.nlist or 1
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = p.nprobe
        # 10 k-means iterations, not faiss's 25: on a CPU the build is mostly k-means (recall: bench/search.py)
        index.cp.niter = 10
        index.cp.max_points_per_centroid = max(40, p.train_size // nlist)  # faiss would subsample otherwise
        return index
    if p.kind == "binary":
        return faiss.IndexBinaryFlat(8 * ((dim + 7) // 8))
    raise UserError(f"index kind must be one of flat, hnsw, ivf, binary, not {p.kind!r}")


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _first_duplicate(ids: list[str]) -> str:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return ""
