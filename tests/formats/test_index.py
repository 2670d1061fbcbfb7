"""The index directory round-trips: the files written, then read back with the same rows, metadata and neighbours, for
every kind; and what is not an index (or one of a newer format, or with files that disagree) is one clear error."""

import json

import numpy as np
import pytest

from illust2vec.errors import UserError
from illust2vec.formats.index import FILES, FORMAT_VERSION, StoredIndex, import_faiss, read_index, write_index
from illust2vec.search import IndexParams, VectorIndex


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((30, dim))
    return (centers[rng.integers(0, 30, n)] + 0.4 * rng.standard_normal((n, dim))).astype(np.float32)


def test_stored_index_round_trip(tmp_path):
    faiss = import_faiss()
    x = clustered(50, 8)
    fx = faiss.IndexFlatIP(8)
    fx.add(x)
    stored = StoredIndex(
        kind="flat",
        dim=8,
        faiss_index=fx,
        ids=[f"i{n}" for n in range(50)],
        paths=[f"/p/{n}.png" for n in range(50)],
        tags=['{"general": {"hat": 0.9}}'] * 50,
        params={"kind": "flat", "nprobe": 3},
        model={"source": "m", "vocab_hash": "h"},
    )
    write_index(tmp_path / "idx", stored)
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted(FILES)  # no temporary file left
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert info["format_version"] == FORMAT_VERSION and info["count"] == 50 and info["metric"] == "cosine"
    back = read_index(tmp_path / "idx")
    assert (back.kind, back.dim, back.ids, back.paths, back.tags) == ("flat", 8, stored.ids, stored.paths, stored.tags)
    assert back.params == stored.params and back.model == stored.model and back.center is None
    np.testing.assert_array_equal(back.faiss_index.reconstruct_n(0, 50), x)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "binary"])
def test_vector_index_save_open_same_neighbours_and_metadata(tmp_path, kind):
    base = clustered(2000, dim=40)
    ids = [f"img{i:05d}" for i in range(2000)]
    paths = [f"/data/{i}.png" for i in ids]
    tags = [json.dumps({"general": {f"t{i % 3}": 0.9}}) for i in range(2000)]
    model = {"source": "bundle", "feature_dim": 40, "vocab_hash": "abc"}
    index = VectorIndex.build(base, ids, paths, tags, IndexParams(kind=kind, nlist=20, nprobe=4), model)
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.faiss", "index.json", "meta.parquet"]
    loaded = VectorIndex.load(tmp_path / "idx")
    assert (loaded.kind, loaded.dim, loaded.ids, loaded.paths, loaded.tags) == (kind, 40, ids, paths, tags)
    assert loaded.model == model and loaded.params == index.params
    if kind == "binary":
        np.testing.assert_array_equal(loaded.center, index.center)
    queries = clustered(10, dim=40, seed=3)
    for a, b in zip(index.search_rows(queries, 7), loaded.search_rows(queries, 7), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.vector("img00010"), index.vector("img00010"))


def test_saving_again_replaces_the_index(tmp_path):
    VectorIndex.build(clustered(30, 8), [str(i) for i in range(30)]).save(tmp_path / "idx")
    VectorIndex.build(clustered(12, 8, seed=1), [f"b{i}" for i in range(12)]).save(tmp_path / "idx")
    loaded = VectorIndex.load(tmp_path / "idx")
    assert len(loaded) == 12 and loaded.ids[0] == "b0"


def test_what_is_not_an_index_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="not an index"):
        read_index(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "index.json").write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="not an illust2vec index"):
        VectorIndex.load(tmp_path / "x")

    VectorIndex.build(clustered(20, 8), [str(i) for i in range(20)]).save(tmp_path / "idx")
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    (tmp_path / "idx" / "index.json").write_text(json.dumps({**info, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(UserError, match="newer"):
        read_index(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").write_text(json.dumps({**info, "params": {"nprobe": 0}}))
    with pytest.raises(UserError, match="not an illust2vec index.*--nprobe"):
        VectorIndex.load(tmp_path / "idx")
    (tmp_path / "idx" / "index.json").write_text(json.dumps({**info, "dim": 9}))
    with pytest.raises(UserError, match="does not match its metadata"):
        read_index(tmp_path / "idx")

    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an index"):
        VectorIndex.build(clustered(20, 8), [str(i) for i in range(20)]).save(tmp_path / "y")
    assert (tmp_path / "y" / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        VectorIndex.build(clustered(20, 8), [str(i) for i in range(20)]).save(tmp_path / "file")


def test_stored_index_written_to_object_storage_reads_back(bucket, tmp_path):
    from illust2vec.formats.index import is_index
    from illust2vec.util import storage

    x = clustered(20, 4)
    index = VectorIndex.build(x, [f"i{n}" for n in range(20)], [""] * 20, ["{}"] * 20, IndexParams(kind="flat"))
    assert not is_index(f"{bucket}/idx")
    assert index.save(f"{bucket}/idx") == f"{bucket}/idx"
    assert is_index(f"{bucket}/idx")
    assert [storage.name(p) for p in storage.listing(f"{bucket}/idx")] == sorted(FILES)
    for name in FILES:
        storage.download(f"{bucket}/idx/{name}", tmp_path / name)
    back = read_index(tmp_path)
    assert back.ids == index.ids
    np.testing.assert_array_equal(back.faiss_index.reconstruct_n(0, 20), x / np.linalg.norm(x, axis=1, keepdims=True))
    index.save(f"{bucket}/idx")  # saving again replaces it
    assert is_index(f"{bucket}/idx")
